// The parameter table: every parameter tensor of a model as a named, shaped range of one flat array
// (so the optimizer, clipping, checkpoints and gradient checks treat them uniformly).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace muse {

struct ParamInfo {
  std::string name;             // e.g. "blocks.3.attn.w_q"
  std::vector<int64_t> shape;
  size_t offset = 0;
  size_t size = 0;
  bool decay = false;           // AdamW weight decay applies (2-D weight matrices, dense E and P)
};

// The module a tensor belongs to, for per-module counts and gradient norms:
// "blocks.3.attn.w_q" → "attn", "embed.htt_a" → "embed", "final_ln.gain" → "final_ln".
std::string param_module(const std::string& name);

class ParamTable {
 public:
  // Every tensor starts on a 64-float (256-byte) boundary of the flat array: GPU GEMMs and the bias epilogue
  // need 16-byte aligned operands for their fast kernels (cuBLASLt falls back to 4-byte-aligned ones, and
  // the bias to a separate pass, otherwise). The floats between tensors are padding: always zero, with zero
  // gradient, never saved.
  static constexpr size_t kAlignFloats = 64;

  // Appends a tensor and returns its offset in the flat array.
  size_t add(const std::string& name, std::vector<int64_t> shape, bool decay);
  const std::vector<ParamInfo>& entries() const { return entries_; }
  // Floats of the flat parameter (and gradient, moment) arrays, padding included.
  size_t total() const { return total_; }
  // Parameters: the sum of the tensors' sizes.
  size_t count() const { return count_; }
  // Throws std::out_of_range naming the tensor.
  const ParamInfo& find(const std::string& name) const;

 private:
  std::vector<ParamInfo> entries_;
  size_t total_ = 0;
  size_t count_ = 0;
};

}  // namespace muse
