// safetensors files (the format used by the Hugging Face ecosystem): an 8-byte little-endian header
// length, a JSON header naming each tensor's dtype, shape and byte range, then the raw data. muse
// stores parameters and optimizer state as F32 tensors.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace muse {

struct TensorRef {
  std::string name;
  std::vector<int64_t> shape;
  const float* data;  // numel(shape) floats
};

struct LoadedTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

struct SafetensorsContents {
  std::map<std::string, LoadedTensor> tensors;
  std::map<std::string, std::string> metadata;
};

int64_t numel(const std::vector<int64_t>& shape);
std::string shape_string(const std::vector<int64_t>& shape);

// Writes the file at `path` (not atomically: callers write inside a temporary checkpoint directory).
// Throws std::runtime_error on an I/O failure.
void write_safetensors(const std::string& path, const std::vector<TensorRef>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Reads and validates the whole file: header length and JSON, dtype (F32 only), shapes, byte ranges that
// lie inside the data and match the shapes, no overlaps. Throws std::runtime_error naming the file and
// the problem.
SafetensorsContents read_safetensors(const std::string& path);

}  // namespace muse
