#include "data/shards.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <stdexcept>

namespace muse {

namespace {

constexpr char kMagic[8] = {'M', 'U', 'S', 'E', 'T', 'O', 'K', 'S'};

template <typename T>
void put(unsigned char* p, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) p[i] = (uint64_t(v) >> (8 * i)) & 0xff;
}
template <typename T>
T get(const unsigned char* p) {
  uint64_t v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= uint64_t(p[i]) << (8 * i);
  return T(v);
}

}  // namespace

void write_shard(const std::string& path, const std::vector<int32_t>& ids, uint32_t vocab_size,
                 uint64_t tokenizer_fingerprint) {
  const uint32_t width = vocab_size <= 65536 ? 2 : 4;
  unsigned char header[kShardHeaderBytes] = {};
  std::memcpy(header, kMagic, 8);
  put<uint32_t>(header + 8, 1);
  put<uint32_t>(header + 12, width);
  put<uint64_t>(header + 16, ids.size());
  put<uint64_t>(header + 24, tokenizer_fingerprint);
  put<uint32_t>(header + 32, vocab_size);
  std::vector<unsigned char> body(ids.size() * width);
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || uint32_t(ids[i]) >= vocab_size)
      throw std::invalid_argument(path + ": token id " + std::to_string(ids[i]) + " outside the vocabulary of " +
                                  std::to_string(vocab_size));
    if (width == 2)
      put<uint16_t>(body.data() + 2 * i, uint16_t(ids[i]));
    else
      put<uint32_t>(body.data() + 4 * i, uint32_t(ids[i]));
  }
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error(path + ": cannot open for writing");
  out.write(reinterpret_cast<const char*>(header), kShardHeaderBytes);
  out.write(reinterpret_cast<const char*>(body.data()), body.size());
  out.flush();
  if (!out) throw std::runtime_error(path + ": write failed (disk full?)");
}

Shard::Shard(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw std::runtime_error(path + ": cannot open token shard");
  struct stat st {};
  ::fstat(fd, &st);
  const size_t bytes = size_t(st.st_size);
  if (bytes < kShardHeaderBytes) {
    ::close(fd);
    throw std::runtime_error(path + ": " + std::to_string(bytes) + " bytes is too short for a token shard header");
  }
  map_ = ::mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw std::runtime_error(path + ": mmap failed");
  }
  map_bytes_ = bytes;
  const auto* p = static_cast<const unsigned char*>(map_);
  auto fail = [&](const std::string& what) {
    ::munmap(map_, map_bytes_);
    map_ = nullptr;
    throw std::runtime_error(path + ": " + what);
  };
  if (std::memcmp(p, kMagic, 8) != 0) fail("not a muse token shard (bad magic; make shards with `muse prepare`)");
  header_.version = get<uint32_t>(p + 8);
  header_.bytes_per_token = get<uint32_t>(p + 12);
  header_.token_count = get<uint64_t>(p + 16);
  header_.tokenizer_fingerprint = get<uint64_t>(p + 24);
  header_.vocab_size = get<uint32_t>(p + 32);
  if (header_.version != 1) fail("unsupported shard version " + std::to_string(header_.version));
  if (header_.bytes_per_token != 2 && header_.bytes_per_token != 4)
    fail("bad token width " + std::to_string(header_.bytes_per_token));
  const uint64_t expect = kShardHeaderBytes + header_.token_count * header_.bytes_per_token;
  if (expect != bytes)
    fail("size " + std::to_string(bytes) + " bytes does not match its header (" + std::to_string(header_.token_count) +
         " tokens = " + std::to_string(expect) + " bytes): truncated or corrupt");
  tokens_ = p + kShardHeaderBytes;
}

Shard::Shard(std::string label, std::vector<int32_t> tokens, uint64_t tokenizer_fingerprint)
    : path_(std::move(label)), owned_(std::move(tokens)) {
  header_.bytes_per_token = 4;
  header_.token_count = owned_.size();
  header_.tokenizer_fingerprint = tokenizer_fingerprint;
  tokens_ = reinterpret_cast<const unsigned char*>(owned_.data());
}

Shard::~Shard() {
  if (map_) ::munmap(map_, map_bytes_);
}

}  // namespace muse
