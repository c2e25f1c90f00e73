// The tokenizer interface. A model is always used with the tokenizer it was trained with: checkpoints
// carry the tokenizer's files and token shards record its fingerprint.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace muse {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // "byte", "gpt2", "spm".
  virtual std::string kind() const = 0;
  virtual int vocab_size() const = 0;
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  // Exact for any id sequence; ids outside the vocabulary throw std::out_of_range naming the id.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // The bytes one token stands for (for bits-per-byte accounting and streaming).
  virtual std::string token_bytes(int32_t id) const = 0;
  // Identifies the tokenizer's exact behaviour (its kind and files): shards and models must agree.
  virtual uint64_t fingerprint() const = 0;
  // Writes the files needed to load this tokenizer into `dir` (tokenizer.json plus any model files).
  virtual void save(const std::string& dir) const = 0;
};

// Builds a tokenizer from a command-line spec:
//   "byte"        the byte tokenizer (vocab 256);
//   "gpt2"        GPT-2 BPE with encoder.json + vocab.bpe from gpt2_files_dir();
//   "gpt2:DIR"    the same with the files in DIR;
//   "spm:PATH"    the SentencePiece model file PATH;
//   a folder holding tokenizer.json (a checkpoint's or prepared data's tokenizer/): load_tokenizer().
// Throws std::invalid_argument on an unknown spec, std::runtime_error naming the file on bad files.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec);
// Loads the tokenizer saved (by Tokenizer::save) in a checkpoint's or data set's tokenizer/ directory,
// and checks that its files still have the fingerprint recorded at save time.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir);

// Where "gpt2" finds encoder.json and vocab.bpe: $MUSE_GPT2_DIR when set, else the folder
// scripts/setup-debian.sh fills (<source tree>/third_party/gpt2, fixed when muse is configured).
std::string gpt2_files_dir();

// Writes `dir`/tokenizer.json: the kind, vocabulary size and fingerprint (checked by load_tokenizer)
// plus `fields` (e.g. the name of a model file), for Tokenizer::save implementations.
void write_tokenizer_json(const std::string& dir, const Tokenizer& tokenizer,
                          const std::vector<std::pair<std::string, std::string>>& fields = {});

// The whole content of a file; throws std::runtime_error naming it when it cannot be read.
std::string read_file_bytes(const std::string& path);

// FNV-1a, 64-bit: the fingerprint hash (stable across platforms and versions).
uint64_t fnv1a64(const std::string& bytes, uint64_t seed = 0xcbf29ce484222325ULL);

}  // namespace muse
