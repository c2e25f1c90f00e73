#include "ops/local_attn.cuh"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cuda/gpu_support.h"
#include "ops/linear.cuh"
#include "ops/local_attn.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

// Tolerances. Both sides are fp32 and evaluate the same formulas (ops/poincare.h's scaled_distance is
// compiled for the device); they differ by summation order (warp trees and online softmax against
// sequential loops), FMA contraction and CUDA's special functions (≤ 2 ulp against glibc's). Each tensor
// is compared element-wise with
//     |gpu − cpu| ≤ rel·scale + rel·|cpu| + 8·float_error,
// scale = the largest |entry| of the CPU result (of the gradient itself, without the initial value that
// checks accumulation), float_error = the largest |CPU float − CPU double| of that tensor, the rounding
// noise of fp32 itself on these inputs. The 8·float_error term only matters where fp32 is ill-conditioned:
// dc is a signed sum over all B·N·W pairs whose per-pair terms cancel at large norms (∂ρ/∂√c ≈ ρ/√c,
// docs/ops/local_attn.md), so its two fp32 results legitimately differ by a few times the CPU's own error.
constexpr double kForwardRel = 1e-4;   // o, lse: scores ~10–20 in magnitude × ~1e-6 relative error per score
constexpr double kGradRel = 3e-4;      // dq, dk, dv, dlog μ: sums of ≤ W pair terms each, ~2e-6 observed float error
constexpr double kParamRel = 2e-3;     // dc, dβ: sums over ~10⁵ pairs in different orders

std::vector<float> to_float(const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); }
std::vector<double> to_double(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }

// gpu, cpu: results; init: the values the buffers held before the call (empty: zeros); cpu_double: the
// same result from the CPU op in double (same initial values).
void expect_matches(const std::vector<float>& gpu, const std::vector<float>& cpu, const std::vector<float>& init,
                    const std::vector<double>& cpu_double, double rel, const std::string& what, double abs_floor = 0) {
  ASSERT_EQ(cpu.size(), cpu_double.size()) << what;
  double scale = 0, float_error = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double base = init.empty() ? 0.0 : double(init[i]);
    scale = std::max(scale, std::abs(double(cpu[i]) - base));
    float_error = std::max(float_error, std::abs(double(cpu[i]) - cpu_double[i]));
  }
  expect_close_to_reference(gpu, cpu, rel * scale + 8 * float_error + abs_floor + 1e-30, rel, what);
}

std::vector<float> nan_filled(size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }

struct Case {
  LocalAttnConfig cfg;
  bool gate = false;
  double qk_std = 0.5;
  // Where every window holds one key (N = 1 or W = 1), p ≡ 1 and o = v, so ∂L/∂s = dO·v − dO·o is
  // exactly 0 on the CPU but the rounding difference of two differently ordered dot products (~1e-6) on
  // the GPU: every gradient except dv is then pure noise, compared with this absolute floor.
  double abs_floor = 0;
};

std::string describe(const Case& cs) {
  const auto& c = cs.cfg;
  return "B " + std::to_string(c.B) + " N " + std::to_string(c.N) + " D " + std::to_string(c.D) + " H " +
         std::to_string(c.H) + " W " + std::to_string(c.window) + (c.sliding ? " sliding" : " block") +
         (c.alibi ? " +alibi" : "") + (cs.gate ? " +gate" : "") + " qk_std " + std::to_string(cs.qk_std);
}

// Which gradients a backward call asks for, and whether it gets a workspace (without one, and without dc and
// dβ, the streaming kernels run instead of the tiled backward).
struct Wanted {
  bool dq = true, dk = true, dv = true, dc = true, dbeta = true, dlog_mu = true;
  bool workspace = true;
};

// Inputs (rounded to float once; the double reference runs on the same rounded values), CPU float and
// double references, GPU forward and backward, comparisons.
// loose: the tolerances' factor (1 under the fp32 math's 3xTF32 products).
void check_case(const Case& cs, const Wanted& want = Wanted{}, double loose = 1) {
  const double kForwardRel = loose * test::kForwardRel, kGradRel = loose * test::kGradRel,
               kParamRel = loose * test::kParamRel;
  const LocalAttnConfig& cfg = cs.cfg;
  SCOPED_TRACE(describe(cs));
  Rng rng(uint64_t(cfg.B) * 1000003 + cfg.N * 7919 + cfg.D * 131 + cfg.H * 17 + cfg.window * 3 + cfg.sliding +
          2 * cfg.alibi + 4 * cs.gate);
  const size_t n = size_t(cfg.B) * cfg.N * cfg.D, nh = size_t(cfg.B) * cfg.N * cfg.H;
  const auto q = to_float(random_normal(n, rng, cs.qk_std)), k = to_float(random_normal(n, rng, cs.qk_std));
  const auto v = to_float(random_normal(n, rng)), beta = to_float(random_normal(cfg.H, rng, 0.5));
  std::vector<float> log_mu;
  if (cs.gate) {
    log_mu.resize(nh);
    for (float& m : log_mu) m = float(-std::log1p(std::exp(-(2.0 + rng.normal()))));  // log σ(·), §2.7
  }
  const float c = 0.7031f;
  const float* log_mu_ptr = cs.gate ? log_mu.data() : nullptr;

  // CPU references.
  std::vector<float> o(n), lse(nh);
  local_attn_forward<float>(o.data(), lse.data(), q.data(), k.data(), v.data(), c, beta.data(), log_mu_ptr, cfg);
  const auto qd = to_double(q), kd = to_double(k), vd = to_double(v), betad = to_double(beta),
             log_mud = to_double(log_mu);
  const double* log_mud_ptr = cs.gate ? log_mud.data() : nullptr;
  std::vector<double> od(n), lsed(nh);
  local_attn_forward<double>(od.data(), lsed.data(), qd.data(), kd.data(), vd.data(), double(c), betad.data(),
                             log_mud_ptr, cfg);

  // GPU forward into NaN-poisoned outputs.
  DeviceBuffer<float> gq(q), gk(k), gv(v), gbeta(beta), glog_mu(log_mu), go(nan_filled(n)), glse(nan_filled(nh));
  float* glog_mu_ptr = cs.gate ? glog_mu.get() : nullptr;
  cuda::local_attn_forward(go.get(), glse.get(), gq.get(), gk.get(), gv.get(), c, gbeta.get(), glog_mu_ptr, cfg);
  expect_matches(go.download(), o, {}, od, kForwardRel, "o");
  expect_matches(glse.download(), lse, {}, lsed, kForwardRel, "lse");

  // Backward from the CPU forward's o and lse (isolates the backward kernels), into non-zero gradients.
  const auto d_o = to_float(random_normal(n, rng));
  const auto dq0 = to_float(random_normal(n, rng, 0.3)), dk0 = to_float(random_normal(n, rng, 0.3)),
             dv0 = to_float(random_normal(n, rng, 0.3)), dbeta0 = to_float(random_normal(cfg.H, rng, 0.3)),
             dlog_mu0 = to_float(random_normal(nh, rng, 0.3));
  const std::vector<float> dc0{0.375f};
  std::vector<float> dq = dq0, dk = dk0, dv = dv0, dc = dc0, dbeta = dbeta0, dlog_mu = dlog_mu0;
  local_attn_backward<float>(want.dq ? dq.data() : nullptr, want.dk ? dk.data() : nullptr,
                             want.dv ? dv.data() : nullptr, want.dc ? dc.data() : nullptr,
                             want.dbeta ? dbeta.data() : nullptr, want.dlog_mu ? dlog_mu.data() : nullptr, d_o.data(),
                             o.data(), lse.data(), q.data(), k.data(), v.data(), c, beta.data(), log_mu_ptr, cfg);
  const auto d_od = to_double(d_o);
  auto dqd = to_double(dq0), dkd = to_double(dk0), dvd = to_double(dv0), dcd = to_double(dc0),
       dbetad = to_double(dbeta0), dlog_mud = to_double(dlog_mu0);
  local_attn_backward<double>(want.dq ? dqd.data() : nullptr, want.dk ? dkd.data() : nullptr,
                              want.dv ? dvd.data() : nullptr, want.dc ? dcd.data() : nullptr,
                              want.dbeta ? dbetad.data() : nullptr, want.dlog_mu ? dlog_mud.data() : nullptr,
                              d_od.data(), od.data(), lsed.data(), qd.data(), kd.data(), vd.data(), double(c),
                              betad.data(), log_mud_ptr, cfg);

  DeviceBuffer<float> gdo(d_o), gocpu(o), glsecpu(lse), gdq(dq0), gdk(dk0), gdv(dv0), gdc(dc0), gdbeta(dbeta0),
      gdlog_mu(dlog_mu0);
  DeviceBuffer<float> workspace(want.workspace ? cuda::local_attn_backward_workspace_floats(cfg) : 0);
  auto run_gpu_backward = [&] {
    cuda::local_attn_backward(want.dq ? gdq.get() : nullptr, want.dk ? gdk.get() : nullptr,
                              want.dv ? gdv.get() : nullptr, want.dc ? gdc.get() : nullptr,
                              want.dbeta ? gdbeta.get() : nullptr, want.dlog_mu ? gdlog_mu.get() : nullptr, gdo.get(),
                              gocpu.get(), glsecpu.get(), gq.get(), gk.get(), gv.get(), c, gbeta.get(), glog_mu_ptr,
                              cfg, want.workspace ? workspace.get() : nullptr);
  };
  run_gpu_backward();
  expect_matches(gdq.download(), dq, dq0, dqd, kGradRel, "dq", cs.abs_floor);
  expect_matches(gdk.download(), dk, dk0, dkd, kGradRel, "dk", cs.abs_floor);
  expect_matches(gdv.download(), dv, dv0, dvd, kGradRel, "dv");
  expect_matches(gdlog_mu.download(), dlog_mu, dlog_mu0, dlog_mud, kGradRel, "dlog_mu", cs.abs_floor);
  expect_matches(gdc.download(), dc, dc0, dcd, kParamRel, "dc", cs.abs_floor);
  expect_matches(gdbeta.download(), dbeta, dbeta0, dbetad, kParamRel, "dbeta", cs.abs_floor);

  // No atomics and fixed-order reductions: a second call adds exactly the same amounts again.
  const auto dq_first = gdq.download(), dk_first = gdk.download(), dv_first = gdv.download(),
             dc_first = gdc.download(), dbeta_first = gdbeta.download(), dlog_mu_first = gdlog_mu.download();
  gdq.upload(dq0);
  gdk.upload(dk0);
  gdv.upload(dv0);
  gdc.upload(dc0);
  gdbeta.upload(dbeta0);
  gdlog_mu.upload(dlog_mu0);
  run_gpu_backward();
  EXPECT_EQ(gdq.download(), dq_first) << "dq is not run-to-run deterministic";
  EXPECT_EQ(gdk.download(), dk_first) << "dk is not run-to-run deterministic";
  EXPECT_EQ(gdv.download(), dv_first) << "dv is not run-to-run deterministic";
  EXPECT_EQ(gdc.download(), dc_first) << "dc is not run-to-run deterministic";
  EXPECT_EQ(gdbeta.download(), dbeta_first) << "dbeta is not run-to-run deterministic";
  EXPECT_EQ(gdlog_mu.download(), dlog_mu_first) << "dlog_mu is not run-to-run deterministic";
  MUSE_CUDA_CHECK(cudaDeviceSynchronize());
}

LocalAttnConfig config(int B, int N, int D, int H, int window, bool sliding, bool alibi) {
  LocalAttnConfig cfg;
  cfg.B = B;
  cfg.N = N;
  cfg.D = D;
  cfg.H = H;
  cfg.window = window;
  cfg.sliding = sliding;
  cfg.alibi = alibi;
  return cfg;
}

}  // namespace

// phase8-small: D = 512, H = 8 (d_h = 64), W = 64; N = 150 spans three 64-token tiles (a partial last one,
// whose queries' windows start in the tile before), and W does not divide N.
TEST(local_attn_cuda, phase8_small_shape_matches_cpu) {
  MUSE_REQUIRE_GPU();
  check_case({config(2, 150, 512, 8, 64, true, true), true});
  check_case({config(2, 150, 512, 8, 64, false, false), true});
  check_case({config(1, 150, 512, 8, 64, true, false), false});
}

// Under the tf32 (and bf16) GEMM math the tiled kernels' products other than the scores take one TF32 pass:
// operands rounded to 11 significant bits (2⁻¹¹ relative each), so 30× the fp32 tolerances.
TEST(local_attn_cuda, one_tf32_pass_matches_cpu) {
  MUSE_REQUIRE_GPU();
  cuda::BlasLt& blas = cuda::BlasLt::current();
  const cuda::GemmMath before = blas.math();
  blas.set_math(cuda::GemmMath::tf32);
  check_case({config(2, 150, 512, 8, 64, true, true), true}, Wanted{}, 30);
  check_case({config(1, 150, 512, 8, 64, true, false), false}, Wanted{}, 30);
  blas.set_math(before);
}

// Every combination of mode × alibi × gate at an odd head width (d_h = 17, D = 51) with W = 5 not
// dividing N = 37 (which crosses a 32-query step of the tiled backward).
TEST(local_attn_cuda, all_modes_at_odd_head_width_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (bool sliding : {true, false})
    for (bool alibi : {false, true})
      for (bool gate : {false, true}) check_case({config(3, 37, 51, 3, 5, sliding, alibi), gate});
}

TEST(local_attn_cuda, edge_shapes_match_cpu) {
  MUSE_REQUIRE_GPU();
  check_case({config(2, 1, 51, 3, 4, true, true), true, 0.5, 1e-4});     // N = 1
  check_case({config(2, 1, 51, 3, 4, false, false), false, 0.5, 1e-4});  // N = 1, block mode
  check_case({config(2, 23, 24, 2, 1, true, true), true, 0.5, 1e-4});    // W = 1: o = v
  check_case({config(2, 23, 24, 2, 1, false, false), true, 0.5, 1e-4});
  check_case({config(2, 20, 64, 2, 64, true, true), true});   // W > N
  check_case({config(2, 20, 64, 2, 64, false, true), false});
  check_case({config(2, 70, 99, 3, 40, false, true), true});  // d_h = 33 (one lane pass + 1), blocks across tiles
  check_case({config(2, 70, 99, 3, 40, true, false), true});
  check_case({config(1, 100, 256, 2, 70, true, true), true});    // d_h = 128 (> 48 KiB shared memory)
  check_case({config(1, 65, 400, 2, 33, false, true), true});    // d_h = 200
  check_case({config(1, 97, 45, 5, 16, true, true), true});      // d_h = 9
}

// The tiled kernels (window ≤ 65, d_h ≤ 64) work on 64-token tiles: a query's window reaches into the
// previous tile (dq's carry), the tiled backward takes a key tile's queries 64 at a time (up to 128), and
// each warp skips pair blocks outside its windows. Shapes around those boundaries, in both modes.
TEST(local_attn_cuda, tile_boundaries_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (bool sliding : {true, false}) {
    check_case({config(2, 64, 128, 2, 64, sliding, true), true});   // N = one tile, W = N
    check_case({config(1, 65, 128, 2, 64, sliding, false), true});  // one query in a second tile
    check_case({config(1, 128, 64, 4, 65, sliding, true), true});   // W = 65: widest tiled window
    check_case({config(1, 129, 64, 2, 64, sliding, true), false});  // N = 2·64 + 1
    check_case({config(2, 200, 64, 4, 7, sliding, true), true});    // block mode: blocks of 7 straddle tiles
    check_case({config(1, 47, 64, 2, 33, sliding, false), true});   // N < 64, not a multiple of W
    check_case({config(1, 190, 32, 1, 48, sliding, false), true});  // d_h = 32 (one column per lane)
    check_case({config(2, 150, 64, 4, 64, sliding, true), true});   // d_h = 16 (tiny preset)
  }
  check_case({config(1, 130, 64, 1, 66, true, true), true});  // d_h = 64, W = 66: streaming kernels
}

// Without a workspace (and so without dc and dβ) the backward falls back to the streaming kernels.
TEST(local_attn_cuda, backward_without_workspace_matches_cpu) {
  MUSE_REQUIRE_GPU();
  Wanted no_workspace;
  no_workspace.dc = no_workspace.dbeta = no_workspace.workspace = false;
  check_case({config(2, 150, 512, 8, 64, true, true), true}, no_workspace);
  check_case({config(2, 37, 51, 3, 5, false, false), true}, no_workspace);
}

// Tangent norms 2–6 (ρ up to ~20, the regime where dc's terms cancel) and subsets of the gradients:
// null pointers must be skipped, and what is requested must still be right.
TEST(local_attn_cuda, large_norms_and_partial_gradients_match_cpu) {
  MUSE_REQUIRE_GPU();
  check_case({config(2, 45, 64, 4, 16, true, true), true, 1.0});
  Wanted only_params;
  only_params.dq = only_params.dk = only_params.dv = only_params.dlog_mu = false;
  check_case({config(2, 45, 64, 4, 16, true, true), true}, only_params);
  Wanted no_params;
  no_params.dc = no_params.dbeta = false;
  check_case({config(2, 45, 64, 4, 16, false, false), true}, no_params);
  Wanted keys_only;
  keys_only.dq = keys_only.dc = keys_only.dbeta = false;
  check_case({config(2, 45, 64, 4, 16, true, false), true}, keys_only);
}

// SPEC §2.5: masked pairs are skipped, never multiplied by 0, so an infinite q, k, v or dO at position p
// reaches no result that does not depend on p: o, lse and dq of the queries before p, dk, dv and dlog μ of
// the keys whose windows end before p. p = 130 lies in the third 64-token tile: the tile's first queries
// see it as a future key, and its key tile's queries (which the tiled backward stages with it) include
// p − 63 … p − 1's. The tensor-core products multiply whole blocks and must take their element-wise path.
TEST(local_attn_cuda, an_infinite_value_reaches_only_what_depends_on_it) {
  MUSE_REQUIRE_GPU();
  const LocalAttnConfig cfg = config(1, 150, 512, 8, 64, true, false);
  const int p = 130, D = cfg.D, H = cfg.H;
  const size_t n = size_t(cfg.N) * D, nh = size_t(cfg.N) * H;
  Rng rng(2026);
  auto q = to_float(random_normal(n, rng, 0.5)), k = to_float(random_normal(n, rng, 0.5));
  auto v = to_float(random_normal(n, rng)), d_o = to_float(random_normal(n, rng));
  const auto beta = to_float(random_normal(H, rng, 0.5));
  for (int e = 0; e < D; ++e) {
    const float inf = std::numeric_limits<float>::infinity();
    q[size_t(p) * D + e] = k[size_t(p) * D + e] = v[size_t(p) * D + e] = d_o[size_t(p) * D + e] = inf;
  }
  const float c = 0.7031f;
  std::vector<float> o(n), lse(nh), dq(n), dk(n), dv(n), dlog_mu(nh);
  local_attn_forward<float>(o.data(), lse.data(), q.data(), k.data(), v.data(), c, beta.data(), nullptr, cfg);
  local_attn_backward<float>(dq.data(), dk.data(), dv.data(), nullptr, nullptr, dlog_mu.data(), d_o.data(), o.data(),
                             lse.data(), q.data(), k.data(), v.data(), c, beta.data(), nullptr, cfg);

  DeviceBuffer<float> gq(q), gk(k), gv(v), gbeta(beta), gdo(d_o), go(nan_filled(n)), glse(nan_filled(nh));
  cuda::local_attn_forward(go.get(), glse.get(), gq.get(), gk.get(), gv.get(), c, gbeta.get(), nullptr, cfg);
  const std::vector<float> zeros(n), zeros_per_head(nh);
  DeviceBuffer<float> gocpu(o), glsecpu(lse), gdq(zeros), gdk(zeros), gdv(zeros), gdlog_mu(zeros_per_head);
  DeviceBuffer<float> workspace(cuda::local_attn_backward_workspace_floats(cfg));
  cuda::local_attn_backward(gdq.get(), gdk.get(), gdv.get(), nullptr, nullptr, gdlog_mu.get(), gdo.get(), gocpu.get(),
                            glsecpu.get(), gq.get(), gk.get(), gv.get(), c, gbeta.get(), nullptr, cfg, workspace.get());

  // The first `rows` rows of a [N, width] result, against the CPU's (finite there) at the gradients' tolerance.
  auto expect_rows = [&](const std::vector<float>& gpu, const std::vector<float>& cpu, int rows, int width,
                         double rel, const std::string& what) {
    const std::vector<float> g(gpu.begin(), gpu.begin() + size_t(rows) * width),
        r(cpu.begin(), cpu.begin() + size_t(rows) * width);
    double scale = 0;
    for (float x : r) {
      ASSERT_TRUE(std::isfinite(x)) << what << ": the CPU reference is not finite where it should be";
      scale = std::max(scale, double(std::abs(x)));
    }
    expect_close_to_reference(g, r, rel * scale, rel, what);
  };
  const int window_end_before_p = p - cfg.window + 1;  // keys j < p − W + 1 have no query ≥ p in their window
  expect_rows(go.download(), o, p, D, kForwardRel, "o");
  expect_rows(glse.download(), lse, p, H, kForwardRel, "lse");
  expect_rows(gdq.download(), dq, p, D, kGradRel, "dq");
  expect_rows(gdk.download(), dk, window_end_before_p, D, kGradRel, "dk");
  expect_rows(gdv.download(), dv, window_end_before_p, D, kGradRel, "dv");
  expect_rows(gdlog_mu.download(), dlog_mu, window_end_before_p, H, kGradRel, "dlog_mu");
}

TEST(local_attn_cuda, empty_batch_is_a_no_op) {
  MUSE_REQUIRE_GPU();
  const LocalAttnConfig cfg = config(0, 10, 8, 2, 4, true, false);
  EXPECT_EQ(cuda::local_attn_backward_workspace_floats(cfg), 0u);
  DeviceBuffer<float> dummy(1);
  cuda::local_attn_forward(dummy.get(), dummy.get(), dummy.get(), dummy.get(), dummy.get(), 1.f, dummy.get(), nullptr,
                           cfg);
  cuda::local_attn_backward(dummy.get(), dummy.get(), dummy.get(), dummy.get(), dummy.get(), nullptr, dummy.get(),
                            dummy.get(), dummy.get(), dummy.get(), dummy.get(), dummy.get(), 1.f, dummy.get(), nullptr,
                            cfg, nullptr);
  MUSE_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace muse::test
