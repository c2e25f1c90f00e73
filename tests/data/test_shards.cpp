#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "data/shards.h"

namespace muse::test {

TEST(shards_io, round_trip_narrow_and_wide) {
  const auto dir = std::filesystem::temp_directory_path();
  for (uint32_t vocab : {256u, 50257u, 100000u}) {
    const std::string path = (dir / ("muse_shard_" + std::to_string(::getpid()) + ".bin")).string();
    std::vector<int32_t> ids = {0, 1, int32_t(vocab - 1), 42, 7};
    write_shard(path, ids, vocab, 0xfeedULL);
    Shard s(path);
    EXPECT_EQ(s.header().bytes_per_token, vocab <= 65536 ? 2u : 4u);
    EXPECT_EQ(s.header().tokenizer_fingerprint, 0xfeedULL);
    ASSERT_EQ(s.size(), ids.size());
    for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(s[i], ids[i]);
    std::filesystem::remove(path);
  }
}

TEST(shards_io, refuses_bad_ids_truncation_and_foreign_files) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("muse_shard_bad_" + std::to_string(::getpid()))).string();
  EXPECT_THROW(write_shard(path, {1, 300}, 256, 1), std::invalid_argument);
  write_shard(path, {1, 2, 3}, 256, 1);
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 1);
  try {
    Shard s(path);
    FAIL() << "truncated shard accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
  { std::ofstream(path, std::ios::trunc) << std::string(80, 'x'); }
  EXPECT_THROW(Shard s(path), std::runtime_error);
  std::filesystem::remove(path);
}

}  // namespace muse::test
