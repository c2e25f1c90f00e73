#include "io/safetensors.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <stdexcept>

namespace muse {

using nlohmann::json;

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

void write_safetensors(const std::string& path, const std::vector<TensorRef>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const TensorRef& t : tensors) {
    const uint64_t bytes = uint64_t(numel(t.shape)) * sizeof(float);
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error(path + ": cannot open for writing");
  uint64_t length = text.size();
  unsigned char le[8];
  for (int i = 0; i < 8; ++i) le[i] = (length >> (8 * i)) & 0xff;
  out.write(reinterpret_cast<const char*>(le), 8);
  out.write(text.data(), text.size());
  for (const TensorRef& t : tensors)
    out.write(reinterpret_cast<const char*>(t.data), numel(t.shape) * sizeof(float));
  out.flush();
  if (!out) throw std::runtime_error(path + ": write failed (disk full?)");
}

SafetensorsContents read_safetensors(const std::string& path) {
  auto bad = [&](const std::string& what) { return std::runtime_error(path + ": " + what); };
  std::ifstream in(path, std::ios::binary);
  if (!in) throw bad("cannot open");
  in.seekg(0, std::ios::end);
  const uint64_t file_size = uint64_t(in.tellg());
  in.seekg(0);
  if (file_size < 8) throw bad("truncated: " + std::to_string(file_size) + " bytes, not a safetensors file");
  unsigned char le[8];
  in.read(reinterpret_cast<char*>(le), 8);
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t(le[i]) << (8 * i);
  if (header_len > file_size - 8 || header_len > (100u << 20))
    throw bad("header length " + std::to_string(header_len) + " exceeds the file (" + std::to_string(file_size) +
              " bytes): truncated or not a safetensors file");
  std::string text(header_len, '\0');
  in.read(text.data(), header_len);
  json header = json::parse(text, nullptr, false);
  if (header.is_discarded() || !header.is_object()) throw bad("header is not a JSON object");

  const uint64_t data_size = file_size - 8 - header_len;
  SafetensorsContents out;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) throw bad("__metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) throw bad("__metadata__." + m.key() + " is not a string");
        out.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const std::string& name = it.key();
    const json& e = *it;
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
      throw bad("tensor '" + name + "': entry needs dtype, shape and data_offsets");
    if (e["dtype"] != "F32") throw bad("tensor '" + name + "': dtype " + e["dtype"].dump() + " (muse stores F32)");
    LoadedTensor t;
    if (!e["shape"].is_array()) throw bad("tensor '" + name + "': shape is not an array");
    for (const json& d : e["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) throw bad("tensor '" + name + "': bad dimension " + d.dump());
      t.shape.push_back(d.get<int64_t>());
    }
    const json& off = e["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw bad("tensor '" + name + "': data_offsets must be two non-negative integers");
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    const uint64_t expect = uint64_t(numel(t.shape)) * sizeof(float);
    if (end < begin || end - begin != expect)
      throw bad("tensor '" + name + "': byte range [" + std::to_string(begin) + ", " + std::to_string(end) +
                ") does not match shape " + shape_string(t.shape));
    if (end > data_size)
      throw bad("tensor '" + name + "': data ends at byte " + std::to_string(end) + " but the file holds only " +
                std::to_string(data_size) + " data bytes (truncated)");
    t.data.resize(numel(t.shape));
    in.seekg(8 + header_len + begin);
    in.read(reinterpret_cast<char*>(t.data.data()), expect);
    if (!in) throw bad("tensor '" + name + "': read failed");
    ranges.push_back({begin, end});
    out.tensors.emplace(name, std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second) throw bad("tensor byte ranges overlap");
  return out;
}

}  // namespace muse
