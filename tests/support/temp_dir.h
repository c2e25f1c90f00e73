// A scratch directory under the system's temp dir, removed (with its contents) at the end of the test.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <string>

namespace muse::test {

struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& name)
      : path(std::filesystem::temp_directory_path() / ("muse_" + name + "_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string str(const std::string& sub = "") const { return (path / sub).string(); }
};

}  // namespace muse::test
