// SentencePiece models (BPE or unigram), through the SentencePiece library: upstream's Japanese chat
// models use one, and `muse tokenizer train` makes new ones.
//
// Encoding and decoding are the library's. token_bytes(id) is the piece's surface text ("▁" as a
// space, byte pieces <0xAB> as the byte, control pieces empty), which is what the piece contributes
// to a decoded text except that decode() drops the space of the first piece's "▁" when the model adds
// a dummy prefix. Whether decode(encode(x)) == x depends on the model: models trained here keep every
// text (identity normalisation, byte fallback, whitespace kept); NFKC-normalising models do not.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace muse {

class SpmTokenizer final : public Tokenizer {
 public:
  // Loads a serialized SentencePiece model (.model); throws std::runtime_error naming the file.
  explicit SpmTokenizer(const std::string& model_path);
  ~SpmTokenizer() override;

  std::string kind() const override { return "spm"; }
  int vocab_size() const override;
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string token_bytes(int32_t id) const override;
  uint64_t fingerprint() const override { return fingerprint_; }
  // Writes spm.model and tokenizer.json.
  void save(const std::string& dir) const override;

 private:
  void check_id(int32_t id) const;

  std::string model_bytes_;
  uint64_t fingerprint_ = 0;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
};

struct SpmTrainOptions {
  std::vector<std::string> inputs;  // text files, one sentence per line
  int vocab_size = 8000;
  std::string model_type = "unigram";  // unigram | bpe
  std::string out_dir;
  double character_coverage = 0.9995;  // share of characters covered by pieces; the rest use byte pieces
  int threads = 1;
};

// Trains a model that keeps every text (identity normalisation, whitespace kept, byte fallback) and
// writes out_dir/spm.model and out_dir/spm.vocab. Returns the model's path. Throws
// std::runtime_error with the library's message when training fails (e.g. a vocabulary too large for
// the corpus).
std::string train_sentencepiece(const SpmTrainOptions& options);

}  // namespace muse
