#include "train/optimizer.cuh"

#include <cmath>
#include <string>
#include <vector>

#include "cuda/gpu_support.h"
#include "support/test_util.h"
#include "train/optimizer.h"

namespace muse::test {

namespace {

// Tolerances. The GPU update repeats the CPU's double-precision expression with explicitly rounded
// operations, so parameters and moments are expected to be bit-identical; the comparison still allows
// 2^-22 relative (2 float ulps) in case the host compiler contracts the CPU expression into FMAs (it does
// not at -O3 for baseline x86-64). The grad norm is a double sum in a different order (the CPU's is
// sequential: up to ~eps·√n ≈ 1e-13 relative at n = 1e6): 1e-11 relative.
constexpr double kUlpRel = 2.4e-7, kNormRel = 1e-11;

// Ranges with gaps (elements outside every range must stay untouched), one range spanning several
// 4096-element chunks with an odd tail, decay on and off.
std::vector<ParamRange> test_ranges(size_t* total) {
  std::vector<ParamRange> ranges{{0, 37, true}, {40, 2 * 4096 + 5, false}, {40 + 2 * 4096 + 5, 1, true},
                                 {9000, 10007, true}, {19010, 3, false}};
  *total = 19013 + 11;
  return ranges;
}

void expect_params_match(cuda::AdamW& gpu, const AdamW& cpu, DeviceBuffer<float>& gparams,
                         const std::vector<float>& params, size_t total, const std::string& what) {
  expect_close_to_reference(gparams.download(), params, 0, kUlpRel, what + ": params");
  std::vector<float> m(total), v(total);
  MUSE_CUDA_CHECK(cudaMemcpy(m.data(), gpu.first_moment_data(), total * sizeof(float), cudaMemcpyDeviceToHost));
  MUSE_CUDA_CHECK(cudaMemcpy(v.data(), gpu.second_moment_data(), total * sizeof(float), cudaMemcpyDeviceToHost));
  expect_close_to_reference(m, std::vector<float>(cpu.first_moment_data(), cpu.first_moment_data() + total), 0,
                            kUlpRel, what + ": first moment");
  expect_close_to_reference(v, std::vector<float>(cpu.second_moment_data(), cpu.second_moment_data() + total), 0,
                            kUlpRel, what + ": second moment");
  EXPECT_EQ(gpu.steps_taken(), cpu.steps_taken()) << what;
}

}  // namespace

TEST(adamw_cuda, step_matches_cpu) {
  MUSE_REQUIRE_GPU();
  size_t total = 0;
  const auto ranges = test_ranges(&total);
  AdamWConfig config;
  config.weight_decay = 0.1;
  AdamW cpu(ranges, total, config);
  cuda::AdamW gpu(ranges, total, config);
  Rng rng(5);
  auto params = random_normal<float>(total, rng);
  DeviceBuffer<float> gparams(params);
  const LrSchedule schedule{3e-3, 2, 10, 0.1};
  for (int step = 0; step < 4; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    // Gradients over several magnitudes (the second moment spans many binades); a few exact zeros.
    auto grads = random_normal<float>(total, rng, step == 2 ? 1e-4 : 0.5);
    for (size_t i = 0; i < total; i += 97) grads[i] = 0.f;
    DeviceBuffer<float> ggrads(grads);
    const double lr = schedule.at(step);
    cpu.step(params.data(), grads.data(), lr);
    gpu.step(gparams.get(), ggrads.get(), lr);
    expect_params_match(gpu, cpu, gparams, params, total, "step " + std::to_string(step));
    expect_close_to_reference(ggrads.download(), grads, 0, 0, "grads unchanged");
  }
}

TEST(adamw_cuda, grad_norm_and_clipping_match_cpu) {
  MUSE_REQUIRE_GPU();
  DeviceBuffer<double> partials(cuda::kGradNormBlocks), norm(1);
  for (size_t n : {size_t(1), size_t(37), size_t(1000003)}) {
    SCOPED_TRACE("n " + std::to_string(n));
    Rng rng(n);
    const auto grads = random_normal<float>(n, rng, 0.3);
    // Norm only (max_norm 0: no clipping).
    std::vector<float> cpu_grads = grads;
    const double cpu_norm = clip_grad_norm(cpu_grads.data(), n, 0.0);
    DeviceBuffer<float> ggrads(grads);
    cuda::clip_grad_norm(ggrads.get(), n, 0.0, norm.get(), partials.get());
    EXPECT_NEAR(norm.download()[0], cpu_norm, kNormRel * cpu_norm) << "norm";
    expect_close_to_reference(ggrads.download(), grads, 0, 0, "grads unclipped (max_norm 0)");
    // max_norm above the norm: untouched. Below: scaled by max_norm / norm.
    for (double fraction : {2.0, 0.25}) {
      SCOPED_TRACE("max_norm = " + std::to_string(fraction) + "·norm");
      const double max_norm = fraction * cpu_norm;
      cpu_grads = grads;
      clip_grad_norm(cpu_grads.data(), n, max_norm);
      DeviceBuffer<float> g(grads);
      DeviceBuffer<double> gnorm(std::vector<double>{std::nan("")});
      cuda::clip_grad_norm(g.get(), n, max_norm, gnorm.get(), partials.get());
      EXPECT_NEAR(gnorm.download()[0], cpu_norm, kNormRel * cpu_norm) << "norm (before clipping)";
      expect_close_to_reference(g.download(), cpu_grads, 0, kUlpRel, "clipped grads");
    }
  }
}

// Clipping fused into the step (grads left unmodified) equals clip_grad_norm followed by step on the CPU.
TEST(adamw_cuda, fused_clipping_step_matches_cpu) {
  MUSE_REQUIRE_GPU();
  size_t total = 0;
  const auto ranges = test_ranges(&total);
  const AdamWConfig config;
  AdamW cpu(ranges, total, config);
  cuda::AdamW gpu(ranges, total, config);
  Rng rng(11);
  auto params = random_normal<float>(total, rng);
  DeviceBuffer<float> gparams(params);
  DeviceBuffer<double> partials(cuda::kGradNormBlocks), norm(1);
  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const auto grads = random_normal<float>(total, rng, 0.2);
    const double max_norm = step == 1 ? 1e9 : 1.0;  // step 1: no clipping
    std::vector<float> cpu_grads = grads;
    clip_grad_norm(cpu_grads.data(), total, max_norm);
    cpu.step(params.data(), cpu_grads.data(), 1e-3);
    DeviceBuffer<float> ggrads(grads);
    cuda::grad_norm(norm.get(), ggrads.get(), total, partials.get());
    gpu.step(gparams.get(), ggrads.get(), 1e-3, 0, norm.get(), max_norm);
    expect_params_match(gpu, cpu, gparams, params, total, "fused step " + std::to_string(step));
    expect_close_to_reference(ggrads.download(), grads, 0, 0, "grads unchanged by the fused step");
  }
}

}  // namespace muse::test
