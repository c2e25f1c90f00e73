// The GPU decoder's low-rank FFN (decode::ffn in infer/cuda_decode_kernels.cuh: ffn_up's U₁ and V₂ over
// slices of the hidden units, then ffn_down's sum of the slices' shares and U₂) against the CPU op ops/ffn.h,
// on widths whose hidden units do not fill the last slice nor the outputs the last ffn_down block, a rank
// that is not a multiple of 4, and several chunks of rows; replayed, overlapped and not, bit-identically,
// and a row stepped alone (the one-row kernels) bit-identically.
//
// Tolerance: fp32 on both sides; the GPU sums in another order (lanes, slices, runs of slices) and uses CUDA's
// erff and tanhf: |gpu − cpu| ≤ 1e-5·max|cpu| + 1e-5·|cpu|.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/rng.h"
#include "cuda/gpu_support.h"
#include "infer/cuda_decode_kernels.cuh"
#include "ops/ffn.h"
#include "support/ffn_params.h"
#include "support/test_util.h"

namespace muse::test {
namespace {

constexpr double kRel = 1e-5;

void check_ffn(int D, int rank, int rows) {
  SCOPED_TRACE("D " + std::to_string(D) + ", rank " + std::to_string(rank) + ", rows " + std::to_string(rows));
  const int F = ffn_hidden(D);
  Rng rng(D * 131 + rank * 7 + rows);
  auto x = random_normal<float>(size_t(rows) * D, rng);
  const RandomLowRankFfn<float> w(D, rank, rng);
  const std::vector<float>&U1 = w.U1, &b1 = w.b1, &V2 = w.V2, &U2 = w.U2, &b2 = w.b2;
  auto h_mid = random_normal<float>(size_t(rows) * D, rng);

  std::vector<float> y(size_t(rows) * D), low1(size_t(rows) * rank), pre(size_t(rows) * F), hidden(pre.size()),
      low2(low1.size());
  const LowRankFfnParams<float> p = w.params();
  lowrank_ffn_forward<float>(y.data(), {low1.data(), pre.data(), hidden.data(), low2.data()}, x.data(), p, rows, D,
                             rank);
  std::vector<float> expected(y.size());
  for (size_t i = 0; i < y.size(); ++i) expected[i] = h_mid[i] + y[i];

  cuda::decode::FfnPlan plan = cuda::decode::make_ffn_plan(D, rank);
  DeviceBuffer<float> d_U1(U1), d_b1(b1), d_V2(V2), d_U2(U2), d_b2(b2), d_low1(low1), d_h_mid(h_mid);
  DeviceBuffer<float> d_out(size_t(rows) * D), d_partials(cuda::decode::ffn_partial_floats(plan, rows));
  plan.u1 = d_U1.get(), plan.b1 = d_b1.get(), plan.v2 = d_V2.get(), plan.u2 = d_U2.get(), plan.b2 = d_b2.get();
  plan.low1 = d_low1.get(), plan.h_mid = d_h_mid.get(), plan.h_out = d_out.get();
  plan.partials = d_partials.get();

  std::vector<float> first;
  for (int replay = 0; replay < 20; ++replay) {
    cuda::decode::ffn(rows, plan, replay % 2 == 1, nullptr);
    MUSE_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> out = d_out.download();
    if (replay == 0) {
      first = out;
      expect_close_to_reference(out, expected, kRel * max_abs(expected), kRel, "h_out");
    } else {
      ASSERT_EQ(out, first) << "replay " << replay << " differs from the first run";
    }
  }
  // The first row alone (the one-row kernels) gives the same bits as in the full step.
  cuda::decode::ffn(1, plan, true, nullptr);
  MUSE_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> alone = d_out.download();
  for (int i = 0; i < D; ++i) ASSERT_EQ(alone[i], first[i]) << "row 0, element " << i << ", stepped alone";
}

TEST(decode_ffn_cuda, ffn_matches_cpu_op) {
  MUSE_REQUIRE_GPU();
  check_ffn(64, 16, 1);    // the tiny preset: 8 slices, 2 output blocks
  check_ffn(76, 12, 20);   // a half-filled last slice and output block, three chunks of rows
  check_ffn(512, 64, 9);   // phase8-small's FFN: 64 slices, 16 output blocks, two chunks
  check_ffn(1024, 64, 3);  // phase8-medium's: 128 slices
}

}  // namespace
}  // namespace muse::test
