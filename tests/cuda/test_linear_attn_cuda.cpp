#include "ops/linear_attn.cuh"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cuda/gpu_support.h"
#include "ops/linear.cuh"
#include "ops/linear_attn.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

// Tolerances. fp32 on both sides with the same recurrences: the state updates S += φ̃(k)vᵀ run in the same
// (time) order, so they differ only by FMA contraction; the reductions over the d_h rows (numerator, ζ,
// dφ̃(k), dv) and over the columns (S·do) are summed in groups/warp trees on the GPU and sequentially on
// the CPU. Element-wise: |gpu − cpu| ≤ rel·scale + rel·|cpu| + 8·float_error with scale = the largest
// |entry| of the CPU result (of the gradient alone, without the initial value) and float_error = the
// largest |CPU float − CPU double| of that tensor (fp32's own noise on these inputs; the backward's
// adjoint states sum up to N tokens, so it grows with N).
constexpr double kForwardRel = 1e-4;
constexpr double kGradRel = 3e-4;

std::vector<float> to_float(const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); }
std::vector<double> to_double(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }
std::vector<float> nan_filled(size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }

void expect_matches(const std::vector<float>& gpu, const std::vector<float>& cpu, const std::vector<float>& init,
                    const std::vector<double>& cpu_double, double rel, const std::string& what) {
  ASSERT_EQ(cpu.size(), cpu_double.size()) << what;
  double scale = 0, float_error = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double base = init.empty() ? 0.0 : double(init[i]);
    scale = std::max(scale, std::abs(double(cpu[i]) - base));
    float_error = std::max(float_error, std::abs(double(cpu[i]) - cpu_double[i]));
  }
  expect_close_to_reference(gpu, cpu, rel * scale + 8 * float_error + 1e-30, rel, what);
}

struct Case {
  int B, N, D, H;
  bool gate;
};

struct Wanted {
  bool dq = true, dk = true, dv = true, dmu = true;
};

// loose: the tolerances' factor (1 under the fp32 math's 3xTF32 products).
void check_case(const Case& cs, const Wanted& want = Wanted{}, double loose = 1) {
  const double kForwardRel = loose * test::kForwardRel, kGradRel = loose * test::kGradRel;
  const int B = cs.B, N = cs.N, D = cs.D, H = cs.H, dh = D / H;
  SCOPED_TRACE("B " + std::to_string(B) + " N " + std::to_string(N) + " D " + std::to_string(D) + " H " +
               std::to_string(H) + (cs.gate ? " +gate" : ""));
  Rng rng(uint64_t(B) * 1000003 + N * 7919 + D * 131 + H * 17 + cs.gate);
  const size_t n = size_t(B) * N * D, nh = size_t(B) * N * H;
  const size_t ns = size_t(B) * H * dh * dh, nz = size_t(B) * H * dh;
  // q, k with std 2 put x/√d_h on both sides of ELU's kink; the gate stays inside (0, 1) (as the CPU tests).
  const auto q = to_float(random_normal(n, rng, 2.0)), k = to_float(random_normal(n, rng, 2.0)),
             v = to_float(random_normal(n, rng));
  std::vector<float> mu;
  if (cs.gate) mu = to_float(random_uniform(nh, rng, 0.2, 0.95));
  const float* mu_ptr = cs.gate ? mu.data() : nullptr;

  std::vector<float> o(n), zeta(nh), S(ns), z(nz);
  linear_attn_forward<float>(o.data(), zeta.data(), S.data(), z.data(), q.data(), k.data(), v.data(), mu_ptr, B, N, D,
                             H);
  const auto qd = to_double(q), kd = to_double(k), vd = to_double(v), mud = to_double(mu);
  const double* mud_ptr = cs.gate ? mud.data() : nullptr;
  std::vector<double> od(n), zetad(nh), Sd(ns), zd(nz);
  linear_attn_forward<double>(od.data(), zetad.data(), Sd.data(), zd.data(), qd.data(), kd.data(), vd.data(), mud_ptr,
                              B, N, D, H);

  DeviceBuffer<float> gq(q), gk(k), gv(v), gmu(mu), go(nan_filled(n)), gzeta(nan_filled(nh)), gS(nan_filled(ns)),
      gz(nan_filled(nz));
  float* gmu_ptr = cs.gate ? gmu.get() : nullptr;
  // One block per (b, h) over the whole sequence, then (with a workspace) segments of 64 tokens in parallel.
  cuda::linear_attn_forward(go.get(), gzeta.get(), gS.get(), gz.get(), gq.get(), gk.get(), gv.get(), gmu_ptr, B, N, D,
                            H);
  expect_matches(go.download(), o, {}, od, kForwardRel, "o");
  expect_matches(gzeta.download(), zeta, {}, zetad, kForwardRel, "zeta");
  expect_matches(gS.download(), S, {}, Sd, kForwardRel, "final_S");
  expect_matches(gz.download(), z, {}, zd, kForwardRel, "final_z");
  DeviceBuffer<float> fwd_workspace(cuda::linear_attn_forward_workspace_floats(B, N, D, H));
  DeviceBuffer<float> go2(nan_filled(n)), gzeta2(nan_filled(nh)), gS2(nan_filled(ns)), gz2(nan_filled(nz));
  cuda::linear_attn_forward(go2.get(), gzeta2.get(), gS2.get(), gz2.get(), gq.get(), gk.get(), gv.get(), gmu_ptr, B, N,
                            D, H, fwd_workspace.get());
  expect_matches(go2.download(), o, {}, od, kForwardRel, "o (segmented)");
  expect_matches(gzeta2.download(), zeta, {}, zetad, kForwardRel, "zeta (segmented)");
  expect_matches(gS2.download(), S, {}, Sd, kForwardRel, "final_S (segmented)");
  expect_matches(gz2.download(), z, {}, zd, kForwardRel, "final_z (segmented)");

  // Backward from the CPU's o and zeta, into non-zero gradients (checks +=).
  const auto d_o = to_float(random_normal(n, rng));
  const auto dq0 = to_float(random_normal(n, rng, 0.3)), dk0 = to_float(random_normal(n, rng, 0.3)),
             dv0 = to_float(random_normal(n, rng, 0.3)), dmu0 = to_float(random_normal(nh, rng, 0.3));
  std::vector<float> dq = dq0, dk = dk0, dv = dv0, dmu = dmu0;
  linear_attn_backward<float>(want.dq ? dq.data() : nullptr, want.dk ? dk.data() : nullptr,
                              want.dv ? dv.data() : nullptr, want.dmu ? dmu.data() : nullptr, d_o.data(), zeta.data(),
                              q.data(), k.data(), v.data(), mu_ptr, B, N, D, H);
  const auto d_od = to_double(d_o);
  auto dqd = to_double(dq0), dkd = to_double(dk0), dvd = to_double(dv0), dmud = to_double(dmu0);
  linear_attn_backward<double>(want.dq ? dqd.data() : nullptr, want.dk ? dkd.data() : nullptr,
                               want.dv ? dvd.data() : nullptr, want.dmu ? dmud.data() : nullptr, d_od.data(),
                               zetad.data(), qd.data(), kd.data(), vd.data(), mud_ptr, B, N, D, H);

  DeviceBuffer<float> gdo(d_o), go_cpu(o), gzeta_cpu(zeta), gdq(dq0), gdk(dk0), gdv(dv0), gdmu(dmu0);
  // dq alone may run without a workspace (one block per (b, h)); otherwise the scans run in segments.
  const bool dq_only = !want.dk && !want.dv && !want.dmu;
  DeviceBuffer<float> workspace(cuda::linear_attn_backward_workspace_floats(B, N, D, H));
  cuda::linear_attn_backward(want.dq ? gdq.get() : nullptr, want.dk ? gdk.get() : nullptr,
                             want.dv ? gdv.get() : nullptr, want.dmu ? gdmu.get() : nullptr, gdo.get(), go_cpu.get(),
                             gzeta_cpu.get(), gq.get(), gk.get(), gv.get(), gmu_ptr, B, N, D, H,
                             dq_only ? nullptr : workspace.get());
  expect_matches(gdq.download(), dq, dq0, dqd, kGradRel, "dq");
  expect_matches(gdk.download(), dk, dk0, dkd, kGradRel, "dk");
  expect_matches(gdv.download(), dv, dv0, dvd, kGradRel, "dv");
  expect_matches(gdmu.download(), dmu, dmu0, dmud, kGradRel, "dmu");
  // Again, reading the states between chunks that the segmented forward kept in its workspace: the same
  // sums by the same kernel, so the same bits.
  if (!dq_only) {
    DeviceBuffer<float> kdq(dq0), kdk(dk0), kdv(dv0), kdmu(dmu0);
    cuda::linear_attn_backward(want.dq ? kdq.get() : nullptr, want.dk ? kdk.get() : nullptr,
                               want.dv ? kdv.get() : nullptr, want.dmu ? kdmu.get() : nullptr, gdo.get(), go_cpu.get(),
                               gzeta_cpu.get(), gq.get(), gk.get(), gv.get(), gmu_ptr, B, N, D, H, workspace.get(),
                               fwd_workspace.get());
    EXPECT_EQ(kdq.download(), gdq.download()) << "dq from the forward's states";
    EXPECT_EQ(kdk.download(), gdk.download()) << "dk from the forward's states";
    EXPECT_EQ(kdv.download(), gdv.download()) << "dv from the forward's states";
    EXPECT_EQ(kdmu.download(), gdmu.download()) << "dmu from the forward's states";
  }
  // accumulate = false writes the gradients over whatever was there (NaN here): the same bits as adding to
  // zeros, in the chunked form and in the sequential one (dq alone, without a workspace).
  auto run = [&](bool accumulate) {
    const float fill = accumulate ? 0.f : std::nanf("");
    DeviceBuffer<float> rq(std::vector<float>(dq0.size(), fill)), rk(std::vector<float>(dk0.size(), fill)),
        rv(std::vector<float>(dv0.size(), fill)), rmu(std::vector<float>(dmu0.size(), fill));
    cuda::linear_attn_backward(want.dq ? rq.get() : nullptr, want.dk ? rk.get() : nullptr,
                               want.dv ? rv.get() : nullptr, want.dmu ? rmu.get() : nullptr, gdo.get(), go_cpu.get(),
                               gzeta_cpu.get(), gq.get(), gk.get(), gv.get(), gmu_ptr, B, N, D, H,
                               dq_only ? nullptr : workspace.get(), nullptr, 0, accumulate);
    const std::vector<float> none;
    return std::vector<std::vector<float>>{want.dq ? rq.download() : none, want.dk ? rk.download() : none,
                                           want.dv ? rv.download() : none,
                                           want.dmu && gmu_ptr ? rmu.download() : none};  // dmu needs μ
  };
  EXPECT_EQ(run(false), run(true)) << "written gradients differ from gradients added to zeros";
  MUSE_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace

// phase8-small: D = 512, H = 8 (d_h = 64); N = 150 is not a multiple of the 8-token staging chunk, and
// spans three 64-token segments (the last one partial).
TEST(linear_attn_cuda, phase8_small_shape_matches_cpu) {
  MUSE_REQUIRE_GPU();
  check_case({2, 150, 512, 8, true});
  check_case({2, 150, 512, 8, false});
}

// Under the tf32 (and bf16) GEMM math the chunks' products take one TF32 pass: operands rounded to 11
// significant bits (2⁻¹¹ relative each), so 30× the fp32 tolerances (3e-3 forward, 9e-3 gradients).
TEST(linear_attn_cuda, one_tf32_pass_matches_cpu) {
  MUSE_REQUIRE_GPU();
  cuda::BlasLt& blas = cuda::BlasLt::current();
  const cuda::GemmMath before = blas.math();
  blas.set_math(cuda::GemmMath::tf32);
  check_case({2, 150, 512, 8, true}, Wanted{}, 30);
  check_case({1, 700, 128, 2, true}, Wanted{}, 30);
  blas.set_math(before);
}

// Many segments: the states summed over segments before (after) each one must equal the sequential scan.
TEST(linear_attn_cuda, long_sequences_in_segments_match_cpu) {
  MUSE_REQUIRE_GPU();
  check_case({1, 700, 128, 2, true});  // 11 segments, d_h = 64
  check_case({2, 128, 51, 3, true});   // exactly two segments, d_h = 17
  check_case({1, 65, 256, 2, false});  // one token past the first segment, d_h = 128
  // B·H = 64: segments of two 64-token sums each (enough blocks already), the last one a partial single.
  check_case({8, 650, 64, 8, true});
}

// Head widths around the thread-layout boundaries: d_h + 1 state columns on ⌈(d_h + 1)/32⌉ warps, rows
// in groups of 4 with a power-of-two count per thread.
TEST(linear_attn_cuda, head_widths_match_cpu) {
  MUSE_REQUIRE_GPU();
  check_case({2, 37, 51, 3, true});    // d_h = 17 (odd)
  check_case({2, 37, 93, 3, false});   // d_h = 31: d_h + 1 = 32 columns, exactly one warp
  check_case({2, 37, 64, 2, true});    // d_h = 32: 33 columns, second warp holds only z
  check_case({1, 29, 99, 3, true});    // d_h = 33
  check_case({1, 70, 256, 2, true});   // d_h = 128 (the maximum; > 48 KiB shared memory)
  check_case({3, 20, 3, 3, true});     // d_h = 1
  check_case({2, 45, 20, 4, false});   // d_h = 5
}

TEST(linear_attn_cuda, short_sequences_and_partial_gradients_match_cpu) {
  MUSE_REQUIRE_GPU();
  check_case({3, 1, 51, 3, true});  // N = 1
  check_case({2, 8, 51, 3, true});  // N = one staging chunk
  check_case({2, 9, 51, 3, true});  // one chunk + 1
  Wanted dq_only;
  dq_only.dk = dq_only.dv = dq_only.dmu = false;
  check_case({2, 37, 51, 3, true}, dq_only);
  Wanted no_dq;
  no_dq.dq = false;
  check_case({2, 37, 51, 3, true}, no_dq);
  Wanted dmu_only;
  dmu_only.dq = dmu_only.dk = dmu_only.dv = false;
  check_case({2, 37, 51, 3, true}, dmu_only);
}

// N = 0: nothing to compute, but the final state is written (zero), as by the CPU op.
// Causality with a non-finite value: an infinite q, k, v and dO at position p (inside the second 64-token
// chunk, which the chunked kernels take at once) must not reach o, ζ or dq of the earlier tokens. The chunk's
// causal products would multiply masked coefficients (0) with the later tokens' values, and 0·∞ is NaN;
// they skip them. (dk, dv and dμ of the later tokens do depend on p, through the later queries' ζ.)
TEST(linear_attn_cuda, an_infinite_value_does_not_reach_earlier_tokens) {
  MUSE_REQUIRE_GPU();
  const int B = 1, N = 150, D = 512, H = 8, p = 100;
  const size_t n = size_t(B) * N * D, nh = size_t(B) * N * H;
  Rng rng(2026);
  auto q = to_float(random_normal(n, rng, 2.0)), k = to_float(random_normal(n, rng, 2.0)),
       v = to_float(random_normal(n, rng)), d_o = to_float(random_normal(n, rng));
  const auto mu = to_float(random_uniform(nh, rng, 0.2, 0.95));
  for (int e = 0; e < D; ++e) {
    const float inf = std::numeric_limits<float>::infinity();
    q[size_t(p) * D + e] = k[size_t(p) * D + e] = v[size_t(p) * D + e] = d_o[size_t(p) * D + e] = inf;
  }
  std::vector<float> o(n), zeta(nh), dq(n), dk(n), dv(n), dmu(nh);
  linear_attn_forward<float>(o.data(), zeta.data(), nullptr, nullptr, q.data(), k.data(), v.data(), mu.data(), B, N, D,
                             H);
  linear_attn_backward<float>(dq.data(), dk.data(), dv.data(), dmu.data(), d_o.data(), zeta.data(), q.data(), k.data(),
                              v.data(), mu.data(), B, N, D, H);

  DeviceBuffer<float> gq(q), gk(k), gv(v), gmu(mu), gdo(d_o), go(nan_filled(n)), gzeta(nan_filled(nh));
  DeviceBuffer<float> fwd_workspace(cuda::linear_attn_forward_workspace_floats(B, N, D, H));
  cuda::linear_attn_forward(go.get(), gzeta.get(), nullptr, nullptr, gq.get(), gk.get(), gv.get(), gmu.get(), B, N, D,
                            H, fwd_workspace.get());
  const std::vector<float> zeros(n), zeros_per_head(nh);
  DeviceBuffer<float> go_cpu(o), gzeta_cpu(zeta), gdq(zeros), gdk(zeros), gdv(zeros), gdmu(zeros_per_head);
  DeviceBuffer<float> workspace(cuda::linear_attn_backward_workspace_floats(B, N, D, H));
  cuda::linear_attn_backward(gdq.get(), gdk.get(), gdv.get(), gdmu.get(), gdo.get(), go_cpu.get(), gzeta_cpu.get(),
                             gq.get(), gk.get(), gv.get(), gmu.get(), B, N, D, H, workspace.get());

  // Rows [first, last] of an [N, width] result against the CPU's (finite there).
  auto expect_rows = [&](const std::vector<float>& gpu, const std::vector<float>& cpu, int first, int last, int width,
                         double rel, const std::string& what) {
    const std::vector<float> g(gpu.begin() + size_t(first) * width, gpu.begin() + size_t(last + 1) * width),
        r(cpu.begin() + size_t(first) * width, cpu.begin() + size_t(last + 1) * width);
    double scale = 0;
    for (float x : r) {
      ASSERT_TRUE(std::isfinite(x)) << what << ": the CPU reference is not finite where it should be";
      scale = std::max(scale, double(std::abs(x)));
    }
    expect_close_to_reference(g, r, rel * scale, rel, what);
  };
  expect_rows(go.download(), o, 0, p - 1, D, kForwardRel, "o before p");
  expect_rows(gzeta.download(), zeta, 0, p - 1, H, kForwardRel, "zeta before p");
  expect_rows(gdq.download(), dq, 0, p - 1, D, kGradRel, "dq before p");
}

TEST(linear_attn_cuda, empty_sequence_writes_zero_state) {
  MUSE_REQUIRE_GPU();
  const int B = 2, N = 0, D = 12, H = 3, dh = 4;
  DeviceBuffer<float> dummy(1), gS(nan_filled(size_t(B) * H * dh * dh)), gz(nan_filled(size_t(B) * H * dh));
  cuda::linear_attn_forward(dummy.get(), dummy.get(), gS.get(), gz.get(), dummy.get(), dummy.get(), dummy.get(),
                            nullptr, B, N, D, H);
  EXPECT_EQ(gS.download(), std::vector<float>(size_t(B) * H * dh * dh, 0.f));
  EXPECT_EQ(gz.download(), std::vector<float>(size_t(B) * H * dh, 0.f));
  EXPECT_EQ(cuda::linear_attn_backward_workspace_floats(B, N, D, H), 0u);
  EXPECT_EQ(cuda::linear_attn_forward_workspace_floats(B, N, D, H), 0u);
  cuda::linear_attn_backward(dummy.get(), dummy.get(), dummy.get(), nullptr, dummy.get(), dummy.get(), dummy.get(),
                             dummy.get(), dummy.get(), dummy.get(), nullptr, B, N, D, H, nullptr);
  MUSE_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace muse::test
