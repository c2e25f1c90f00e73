// The built-in byte tokenizer: token id = byte value (vocab 256), no files needed.
#pragma once
#include "tokenizer/tokenizer.h"

namespace muse {

class ByteTokenizer final : public Tokenizer {
 public:
  std::string kind() const override { return "byte"; }
  int vocab_size() const override { return 256; }
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string token_bytes(int32_t id) const override;
  uint64_t fingerprint() const override;
  void save(const std::string& dir) const override;
};

}  // namespace muse
