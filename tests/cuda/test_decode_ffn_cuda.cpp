// The GPU decoder's fused low-rank FFN (decode::ffn in infer/cuda_decode_kernels.cuh: U₁ and V₂ over slices
// of the hidden units, a barrier among the blocks, then U₂) against the CPU op ops/ffn.h, on widths whose
// hidden units do not fill the last slice, a rank that is not a multiple of 4, and more
// chunks of rows than grid rows (the chunk loop, each grid row reusing its barrier), replayed so that every
// barrier is used many times.
//
// Tolerance: fp32 on both sides; the GPU sums in another order (slices, then runs of slices) and uses CUDA's erff
// and tanhf: |gpu − cpu| ≤ 1e-5·max|cpu| + 1e-5·|cpu|.
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

void check_fused_ffn(int D, int rank, int rows, int grid_rows) {
  SCOPED_TRACE("D " + std::to_string(D) + ", rank " + std::to_string(rank) + ", rows " + std::to_string(rows) +
               ", grid rows " + std::to_string(grid_rows));
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
  ASSERT_GE(plan.max_groups, grid_rows);
  plan.max_groups = grid_rows;
  DeviceBuffer<float> d_U1(U1), d_b1(b1), d_V2(V2), d_U2(U2), d_b2(b2), d_low1(low1), d_h_mid(h_mid);
  DeviceBuffer<float> d_out(size_t(rows) * D), d_partials(cuda::decode::ffn_partial_floats(plan, rows));
  DeviceBuffer<cuda::decode::GridBarrier> d_barriers{std::vector<cuda::decode::GridBarrier>(grid_rows)};
  plan.u1 = d_U1.get(), plan.b1 = d_b1.get(), plan.v2 = d_V2.get(), plan.u2 = d_U2.get(), plan.b2 = d_b2.get();
  plan.low1 = d_low1.get(), plan.h_mid = d_h_mid.get(), plan.h_out = d_out.get();
  plan.partials = d_partials.get(), plan.barriers = d_barriers.get();

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
  for (const cuda::decode::GridBarrier& b : d_barriers.download()) {
    EXPECT_GT(b.arrived, 0u) << "barrier never used";
    EXPECT_EQ(b.arrived % plan.slices, 0u) << "barrier left armed";
  }
}

TEST(decode_ffn_cuda, fused_ffn_matches_cpu_op) {
  MUSE_REQUIRE_GPU();
  check_fused_ffn(64, 16, 1, 1);     // the tiny preset: 8 slices
  check_fused_ffn(76, 12, 20, 1);    // a half-filled last slice, three chunks through one grid row
  check_fused_ffn(76, 12, 20, 2);    // two grid rows, one of them serving two chunks
  check_fused_ffn(512, 64, 9, 2);    // phase8-small's FFN: 64 slices, two chunks
  check_fused_ffn(1024, 64, 3, 1);   // phase8-medium's: 128 slices
}

}  // namespace
}  // namespace muse::test
