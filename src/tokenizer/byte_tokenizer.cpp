#include "tokenizer/byte_tokenizer.h"

#include <stdexcept>

namespace muse {

std::vector<int32_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id > 255) throw std::out_of_range("byte tokenizer: token id " + std::to_string(id) + " is not in [0, 256)");
  return std::string(1, char(id));
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string text;
  text.reserve(ids.size());
  for (int32_t id : ids) text += token_bytes(id);
  return text;
}

uint64_t ByteTokenizer::fingerprint() const { return fnv1a64("muse-tokenizer:byte:v1"); }

void ByteTokenizer::save(const std::string& dir) const { write_tokenizer_json(dir, *this); }

}  // namespace muse
