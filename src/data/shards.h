// Token shards: a 64-byte header then little-endian token ids, memory-mapped for training.
//
//   offset  size  field
//   0       8     magic "MUSETOKS"
//   8       4     version (1)
//   12      4     bytes per token: 2 (uint16) or 4 (uint32)
//   16      8     token count
//   24      8     tokenizer fingerprint
//   32      4     vocabulary size
//   36      28    zero
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace muse {

struct ShardHeader {
  uint32_t version = 1;
  uint32_t bytes_per_token = 2;
  uint64_t token_count = 0;
  uint64_t tokenizer_fingerprint = 0;
  uint32_t vocab_size = 0;
};

inline constexpr size_t kShardHeaderBytes = 64;

// Writes ids (all < vocab_size) with uint16 storage when the vocabulary allows it. Throws on I/O errors.
void write_shard(const std::string& path, const std::vector<int32_t>& ids, uint32_t vocab_size,
                 uint64_t tokenizer_fingerprint);

// A read-only memory map of a shard, validated on open (magic, version, width, size consistent with the
// token count). Throws std::runtime_error naming the file and the problem.
class Shard {
 public:
  explicit Shard(const std::string& path);
  // An in-memory shard over tokens already in hand (e.g. `muse eval --text`); label names it in errors.
  Shard(std::string label, std::vector<int32_t> tokens, uint64_t tokenizer_fingerprint);
  ~Shard();
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  const ShardHeader& header() const { return header_; }
  uint64_t size() const { return header_.token_count; }
  int32_t operator[](uint64_t i) const {
    return header_.bytes_per_token == 2 ? int32_t(reinterpret_cast<const uint16_t*>(tokens_)[i])
                                        : reinterpret_cast<const int32_t*>(tokens_)[i];
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  ShardHeader header_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const unsigned char* tokens_ = nullptr;
  std::vector<int32_t> owned_;
};

}  // namespace muse
