// GPT-2 byte-level BPE, bit-exact with OpenAI's GPT-2 encoder (encoder.py) and tiktoken's r50k_base.
//
// Encoding a text:
//  1. Every literal "<|endoftext|>" becomes the special token (id 50256); the text between is encoded
//     as below (as Hugging Face's GPT-2 tokenizer and tiktoken with allowed_special="all" do).
//  2. The text is cut into maximal runs of valid UTF-8 and maximal runs of bytes that are not part of
//     any valid UTF-8 sequence. Each valid run is pre-tokenised by GPT-2's pattern
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//     on its own (as if it were the whole text); each invalid run is one pre-token. Valid UTF-8 input
//     therefore encodes exactly as GPT-2 does, and any byte string still encodes and round-trips.
//     \s is Unicode's White_Space property, as in the Python `regex` module GPT-2 uses (U+0085 is
//     whitespace; U+FEFF and U+001C..U+001F are not); \p{L}, \p{N} come from PCRE2's Unicode tables.
//  3. Each pre-token's bytes, mapped to GPT-2's vocabulary symbols, are merged by rank: repeatedly the
//     adjacent pair with the lowest rank in vocab.bpe, all its occurrences left to right.
// Decoding concatenates the tokens' bytes, so it is exact for any id sequence (ids that split a UTF-8
// character give the split bytes).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace muse {

class Gpt2Tokenizer final : public Tokenizer {
 public:
  // Reads `dir`/encoder.json and `dir`/vocab.bpe; throws std::runtime_error naming the file and the
  // problem when they are missing or inconsistent.
  explicit Gpt2Tokenizer(const std::string& dir);
  ~Gpt2Tokenizer() override;

  std::string kind() const override { return "gpt2"; }
  int vocab_size() const override { return int(token_bytes_.size()); }
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string token_bytes(int32_t id) const override;
  uint64_t fingerprint() const override { return fingerprint_; }
  void save(const std::string& dir) const override;

  int32_t end_of_text_id() const { return end_of_text_id_; }
  // Step 2 above: the pre-tokens of `text` (views into it), without special-token handling.
  std::vector<std::string_view> pre_tokenize(std::string_view text) const;
  // Step 3 above for one pre-token.
  std::vector<int32_t> merge(std::string_view pre_token) const;
  // A merge's rank and the token it makes, or {-1, -1} when the pair is not a merge.
  std::pair<int32_t, int32_t> merge_of(int32_t left, int32_t right) const;
  // The token whose bytes are exactly `bytes`, or -1.
  int32_t token_id(std::string_view bytes) const;

 private:
  struct Pattern;
  void encode_ordinary(std::string_view text, std::vector<int32_t>& out,
                       std::unordered_map<std::string_view, std::pair<uint32_t, uint32_t>>& cache,
                       std::vector<int32_t>& cached_ids) const;

  std::string encoder_json_, vocab_bpe_;   // the files as read, for save()
  std::vector<std::string> token_bytes_;   // id -> bytes
  std::unordered_map<std::string, int32_t> id_of_bytes_;
  int32_t byte_token_[256];                // the token of each single byte
  // (left << 32 | right) -> (rank, merged token).
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
  int32_t end_of_text_id_ = -1;
  uint64_t fingerprint_ = 0;
  std::unique_ptr<Pattern> pattern_;
};

}  // namespace muse
