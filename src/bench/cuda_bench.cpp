#include <memory>

#include "bench/bench.h"
#include "common/cuda_check.cuh"
#include "common/rng.h"
#include "model/model.h"
#include "train/cuda_training.h"

namespace muse {

namespace {

// Device memory in use now (cudaMemGetInfo), in bytes.
size_t device_bytes_in_use() {
  size_t free_bytes = 0, total_bytes = 0;
  MUSE_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return total_bytes - free_bytes;
}

}  // namespace

BenchRecord run_cuda_bench(const BenchOptions& o, const ModelConfig& config) {
  MUSE_CUDA_CHECK(cudaFree(nullptr));  // create the context first, so the baseline excludes it
  const size_t baseline = device_bytes_in_use();
  Model<float> host(config);
  host.init(1);
  Rng rng(2);
  Batch batch;
  batch.B = o.batch;
  batch.N = o.seq;
  batch.inputs.resize(size_t(o.batch) * o.seq);
  batch.targets.resize(batch.inputs.size());
  for (auto& id : batch.inputs) id = int32_t(rng.below(config.vocab_size));
  for (auto& id : batch.targets) id = int32_t(rng.below(config.vocab_size));

  // train: the trainer's step (train/cuda_training.h), with gradients and moments; forward: a serving model
  // (SPEC §7: inference-only buffers, E precomputed, bf16 logits), so its time and memory are what a user's
  // inference costs.
  // The GEMM math is set before the arena is sized: in bf16 math a training arena holds bf16 copies in place of
  // some fp32 buffers, and an arena sized for another math would keep (and report) that size.
  const cuda::GemmMath math = cuda::gemm_math_from_string(o.gpu_math);
  std::unique_ptr<cuda::Training> training;
  std::unique_ptr<cuda::Model> inference;
  if (o.mode == "train") {
    training = std::make_unique<cuda::Training>(config, host.params().data(), AdamWConfig{});
    training->model().set_gemm_math(math);
    training->model().reserve(o.batch, o.seq);
  } else {
    inference = std::make_unique<cuda::Model>(config);
    inference->set_gemm_math(math);
    inference->set_inference_only(true);
    inference->upload_params(host.params().data());
    inference->prepare_serving();
    inference->reserve(o.batch, o.seq);
  }
  auto iteration = [&] {
    if (training) {
      training->step([&] { return batch; }, 1, 1e-4, 1.0, 0.0);
    } else {
      inference->forward(batch.inputs.data(), o.batch, o.seq);
      MUSE_CUDA_CHECK(cudaStreamSynchronize(inference->stream()));
    }
  };
  cuda::Model& model = training ? training->model() : *inference;
  const double median = median_seconds(o.warmup, o.iters, iteration);
  std::vector<std::pair<std::string, double>> profile;
  if (o.profile) {
    // A separate pass: the per-group events synchronise, so they would distort the timing above.
    model.set_profiling(true);
    for (int i = 0; i < o.iters; ++i) iteration();
    for (auto& [group, ms] : model.profile()) profile.emplace_back(group, ms / o.iters);
    model.set_profiling(false);
  }
  cudaDeviceProp prop{};
  int dev = 0;
  MUSE_CUDA_CHECK(cudaGetDevice(&dev));
  MUSE_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));

  BenchRecord r = throughput_record(o, config, median, (long long)host.table().count());
  r.device = std::string("cuda (") + prop.name + ")";
  r.peak_mem_mb = double(device_bytes_in_use() - baseline) / double(1 << 20);
  r.profile = std::move(profile);
  r.gpu_math = o.gpu_math;
  return r;
}

}  // namespace muse
