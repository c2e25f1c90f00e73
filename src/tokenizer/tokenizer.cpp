#include "tokenizer/tokenizer.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <stdexcept>

#include "tokenizer/byte_tokenizer.h"

namespace muse {

uint64_t fnv1a64(const std::string& bytes, uint64_t seed) {
  uint64_t h = seed;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  throw std::invalid_argument("unknown tokenizer '" + spec + "' (available: byte)");
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir) {
  const std::string path = dir + "/tokenizer.json";
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": missing (every checkpoint carries its tokenizer)");
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("kind") || !j["kind"].is_string())
    throw std::runtime_error(path + ": not a tokenizer description (needs a \"kind\" string)");
  return make_tokenizer(j["kind"].get<std::string>());
}

}  // namespace muse
