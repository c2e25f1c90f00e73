#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "io/safetensors.h"

namespace muse::test {

namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("muse_test_" + std::to_string(::getpid()) + "_" + name)).string();
}

std::string error_of(const std::string& path) {
  try {
    read_safetensors(path);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST(safetensors_io, round_trip_with_metadata) {
  const std::string path = temp_path("rt.safetensors");
  std::vector<float> a = {1, 2, 3, 4, 5, 6}, b = {-0.5f};
  write_safetensors(path, {{"a", {2, 3}, a.data()}, {"b", {1}, b.data()}}, {{"step", "7"}});
  SafetensorsContents c = read_safetensors(path);
  ASSERT_EQ(c.tensors.size(), 2u);
  EXPECT_EQ(c.tensors["a"].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(c.tensors["a"].data, a);
  EXPECT_EQ(c.tensors["b"].data, b);
  EXPECT_EQ(c.metadata["step"], "7");
  std::filesystem::remove(path);
}

TEST(safetensors_io, refuses_truncated_and_garbage_files) {
  const std::string path = temp_path("trunc.safetensors");
  std::vector<float> a(100, 1.f);
  write_safetensors(path, {{"a", {10, 10}, a.data()}});
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 4);
  EXPECT_NE(error_of(path).find("truncated"), std::string::npos) << error_of(path);
  {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << "abc";
  }
  EXPECT_NE(error_of(path).find("truncated"), std::string::npos);
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    const char len[8] = {4, 0, 0, 0, 0, 0, 0, 0};
    out.write(len, 8);
    out << "nope";
  }
  EXPECT_NE(error_of(path).find("not a JSON object"), std::string::npos);
  EXPECT_NE(error_of(temp_path("missing")).find("cannot open"), std::string::npos);
  std::filesystem::remove(path);
}

}  // namespace muse::test
