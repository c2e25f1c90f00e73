// Generation on the GPU by recomputation: every new token re-runs the parallel forward of cuda::Model over
// the whole context and reads back the last row of logits. Exact (it is the model's forward), O(context)
// work per token; the recurrent GPU decoder with CUDA graphs is the faster path still to come (issue 8).
#pragma once
#include <cstdint>
#include <vector>

#include "model/cuda_model.h"
#include "model/model.h"

namespace muse::cuda {

class RecomputeGenerator {
 public:
  // Copies the weights of `host` to the device.
  explicit RecomputeGenerator(const muse::Model<float>& host);

  // Starts from ids (non-empty) and returns the logits [Vp] after them (valid until the next call).
  const float* prefill(const int32_t* ids, int n);
  // Appends one token and returns the logits after it.
  const float* step(int32_t token);

 private:
  const float* run();

  Model model_;
  std::vector<int32_t> context_;
  std::vector<float> logits_;
};

}  // namespace muse::cuda
