#include "infer/cuda_generator.h"

#include <stdexcept>

#include "common/cuda_check.cuh"

namespace muse::cuda {

RecomputeGenerator::RecomputeGenerator(const muse::Model<float>& host)
    : model_(host.config()), logits_(host.config().padded_vocab()) {
  model_.set_inference_only(true);
  model_.upload_params(host.params().data());
}

const float* RecomputeGenerator::prefill(const int32_t* ids, int n) {
  if (n < 1) throw std::invalid_argument("prefill: the context is empty");
  context_.assign(ids, ids + n);
  return run();
}

const float* RecomputeGenerator::step(int32_t token) {
  context_.push_back(token);
  return run();
}

const float* RecomputeGenerator::run() {
  const int n = int(context_.size());
  model_.forward(context_.data(), 1, n);
  const size_t Vp = logits_.size();
  MUSE_CUDA_CHECK(cudaMemcpyAsync(logits_.data(), model_.logits() + size_t(n - 1) * Vp, Vp * sizeof(float),
                                  cudaMemcpyDeviceToHost, model_.stream()));
  MUSE_CUDA_CHECK(cudaStreamSynchronize(model_.stream()));
  return logits_.data();
}

}  // namespace muse::cuda
