// The GPU decoder's factored HTT head (decode::htt_head in infer/cuda_decode_kernels.cuh: LN_final, then
// Z = c_s·X·B̂_sᵀ and logits = Â·Z) against the CPU ops layernorm_forward and htt_factored_head_forward, on
// phase8-small's shape (V = 50257, D = 512, r = 16) and a small one whose width digits are cropped
// (D = 40 < d1·d2 = 42) and whose vocabulary leaves a short last tile; one row, one chunk and two chunks of
// rows. Also: logits ≥ V are exactly 0, and a row stepped alone gets the same bits as in the batched step.
//
// Tolerance: fp32 on both sides, sums in different orders (the GPU's in order of q, then of (s, p); the
// CPU's through BLAS) over 23 and 368 terms for phase8-small: |gpu − cpu| ≤ 1e-5·max|cpu| + 1e-5·|cpu|, as
// SPEC §2.2 asks of the factored head against the materialised one.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/rng.h"
#include "cuda/gpu_support.h"
#include "infer/cuda_decode_kernels.cuh"
#include "ops/htt.h"
#include "ops/layernorm.h"
#include "support/test_util.h"

namespace muse::test {
namespace {

constexpr double kRel = 1e-5;

void check_factored_head(int V, int D, int r, int rows) {
  const HttShape s = htt_shape(V, D, r);
  SCOPED_TRACE("V " + std::to_string(V) + ", D " + std::to_string(D) + ", r " + std::to_string(r) + ", rows " +
               std::to_string(rows));
  Rng rng(uint64_t(V) * 17 + D * 5 + r + rows);
  const auto A = random_normal<float>(size_t(s.v1) * s.r * s.d1, rng);
  const auto B = random_normal<float>(size_t(s.v2) * s.r * s.d2, rng);
  const auto theta = random_uniform<float>(s.r, rng, 0.2, 1.2);
  std::vector<float> A_hat(A.size()), A_norm(size_t(s.v1) * s.r), B_hat(B.size()), B_norm(size_t(s.v2) * s.r);
  htt_normalize_cores(A_hat.data(), A_norm.data(), B_hat.data(), B_norm.data(), A.data(), B.data(), s);
  const auto h = random_normal<float>(size_t(rows) * D, rng);
  const auto gain = random_uniform<float>(D, rng, 0.5, 1.5);
  const auto bias = random_normal<float>(D, rng, 0.1);

  std::vector<float> x(h.size()), mean(rows), rstd(rows), expected(size_t(rows) * s.Vp);
  layernorm_forward<float>(x.data(), mean.data(), rstd.data(), nullptr, h.data(), gain.data(), bias.data(), rows, D);
  htt_factored_head_forward<float>(expected.data(), x.data(), A_hat.data(), B_hat.data(), theta.data(), rows, s);

  // Stream r of the step is decoder stream rows − 1 − r, each at its own position.
  std::vector<int> streams(rows), positions(rows);
  for (int r = 0; r < rows; ++r) streams[r] = rows - 1 - r, positions[r] = 3 * r + 1;
  DeviceBuffer<float> d_A_hat(A_hat), d_B_hat(B_hat), d_theta(theta), d_h(h), d_gain(gain), d_bias(bias);
  DeviceBuffer<int> d_streams(streams), d_positions(positions);
  DeviceBuffer<int32_t> d_tokens(std::vector<int32_t>(rows, 0));
  cuda::decode::HttHead head = cuda::decode::make_htt_head(s.V, s.Vp, D, s.r, s.v2, s.d1, s.d2);
  DeviceBuffer<float> d_Z(cuda::decode::htt_head_z_floats(head, rows));
  DeviceBuffer<float> d_logits(std::vector<float>(size_t(rows) * s.Vp, std::nanf("")));  // each must be written
  head.A_hat = d_A_hat.get(), head.B_hat = d_B_hat.get(), head.theta = d_theta.get();
  head.Z = d_Z.get(), head.logits = d_logits.get();

  const cuda::decode::StepRows step{d_streams.get(), d_tokens.get(), d_positions.get(), rows};
  cuda::decode::htt_head(step, d_h.get(), d_gain.get(), d_bias.get(), head, true, nullptr);
  MUSE_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> logits = d_logits.download();
  expect_close_to_reference(logits, expected, kRel * max_abs(expected), kRel, "logits");
  for (int r = 0; r < rows; ++r)
    for (int v = s.V; v < s.Vp; ++v) ASSERT_EQ(logits[size_t(r) * s.Vp + v], 0.f) << "row " << r << ", padded " << v;

  // Row 0 alone (the one-row kernels).
  const cuda::decode::StepRows alone{d_streams.get(), d_tokens.get(), d_positions.get(), 1};
  cuda::decode::htt_head(alone, d_h.get(), d_gain.get(), d_bias.get(), head, false, nullptr);
  MUSE_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> again = d_logits.download();
  for (int v = 0; v < s.Vp; ++v) ASSERT_EQ(again[v], logits[v]) << "logit " << v << " of row 0, stepped alone";
}

TEST(decode_head_cuda, factored_head_matches_cpu_op) {
  MUSE_REQUIRE_GPU();
  check_factored_head(300, 40, 4, 1);     // v1 18, v2 17, d1 7, d2 6: the last width digit cropped
  check_factored_head(300, 40, 4, 9);     // nine rows (the Z kernel's two chunks)
  check_factored_head(300, 40, 3, 2);     // K = r·d1 = 21: the logits' K padded to 24 with zeros
  check_factored_head(50257, 512, 16, 1);  // phase8-small: v1 225, v2 224, d1 = d2 = 23
  check_factored_head(50257, 512, 16, 8);  // one full chunk
}

}  // namespace
}  // namespace muse::test
