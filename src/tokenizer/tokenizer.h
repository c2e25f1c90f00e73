// The tokenizer interface. A model is always used with the tokenizer it was trained with: checkpoints
// carry the tokenizer's files and token shards record its fingerprint.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
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

// Builds a tokenizer from a command-line spec: "byte" (more kinds arrive with the tokenizer issue).
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec);
// Loads the tokenizer saved in a checkpoint's tokenizer/ directory.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir);

// FNV-1a, 64-bit: the fingerprint hash (stable across platforms and versions).
uint64_t fnv1a64(const std::string& bytes, uint64_t seed = 0xcbf29ce484222325ULL);

}  // namespace muse
