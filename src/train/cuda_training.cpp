#include "train/cuda_training.h"

#include "common/cuda_check.cuh"

namespace muse::cuda {

Training::Training(const ModelConfig& config, const float* host_params, const AdamWConfig& adam)
    : model_(config), adam_(model_.table(), adam) {
  model_.upload_params(host_params);
  MUSE_CUDA_CHECK(cudaMalloc(&norm_, sizeof(double)));
  MUSE_CUDA_CHECK(cudaMalloc(&partials_, kGradNormBlocks * sizeof(double)));
}

Training::~Training() {
  cudaFree(norm_);
  cudaFree(partials_);
}

Training::StepResult Training::step(const std::function<Batch()>& next_batch, int grad_accum, double lr,
                                    double max_norm, double label_smoothing) {
  cudaStream_t stream = model_.stream();
  model_.zero_grads();
  for (int a = 0; a < grad_accum; ++a) {
    const Batch batch = next_batch();
    model_.forward(batch.inputs.data(), batch.B, batch.N);
    model_.loss(batch.targets.data(), label_smoothing, 1.0 / grad_accum, /*with_gradient=*/true);
    model_.backward(1.0 / grad_accum);
  }
  grad_norm(norm_, model_.grads(), model_.size(), partials_, stream);
  // AdamW reads the norm on the device: it clips on the fly, and skips the update when the norm is not finite.
  adam_.step(model_.params(), model_.grads(), lr, stream, norm_, max_norm);
  model_.mark("grad norm + adamw");
  StepResult r;
  MUSE_CUDA_CHECK(cudaMemcpyAsync(&r.grad_norm, norm_, sizeof(double), cudaMemcpyDeviceToHost, stream));
  r.loss = model_.take_loss_sum();  // synchronises the stream
  return r;
}

void Training::download(float* host_params, muse::AdamW* host_optimizer) const {
  model_.download_params(host_params);
  if (!host_optimizer) return;
  const size_t bytes = model_.size() * sizeof(float);
  MUSE_CUDA_CHECK(cudaMemcpy(host_optimizer->first_moment_data(), adam_.first_moment_data(), bytes,
                             cudaMemcpyDeviceToHost));
  MUSE_CUDA_CHECK(cudaMemcpy(host_optimizer->second_moment_data(), adam_.second_moment_data(), bytes,
                             cudaMemcpyDeviceToHost));
  host_optimizer->set_steps_taken(adam_.steps_taken());
}

void Training::upload(const float* host_params, const muse::AdamW& host_optimizer) {
  model_.upload_params(host_params);
  const size_t bytes = model_.size() * sizeof(float);
  MUSE_CUDA_CHECK(cudaMemcpy(adam_.first_moment_data(), host_optimizer.first_moment_data(), bytes,
                             cudaMemcpyHostToDevice));
  MUSE_CUDA_CHECK(cudaMemcpy(adam_.second_moment_data(), host_optimizer.second_moment_data(), bytes,
                             cudaMemcpyHostToDevice));
  adam_.set_steps_taken(host_optimizer.steps_taken());
  // cudaMemcpy from pageable memory may return before the data lands, and the model's non-blocking stream
  // does not wait for the default stream: finish the copies before the next step reads the moments.
  MUSE_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace muse::cuda
