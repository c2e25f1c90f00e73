#include "ops/causal_attn.cuh"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cuda/gpu_support.h"
#include "ops/causal_attn.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

// Tolerances. fp32 on both sides, same formulas; the GPU uses an online softmax over 32-key chunks and warp
// trees for dO·o, the CPU two passes and sequential sums; expf/logf differ by ≤ 2 ulp. Element-wise:
// |gpu − cpu| ≤ rel·scale + rel·|cpu| + 8·float_error + abs_floor with scale = the largest |entry| of
// the CPU result (of the gradient alone) and float_error = the largest |CPU float − CPU double|.
constexpr double kForwardRel = 1e-4;
constexpr double kGradRel = 3e-4;

std::vector<float> to_float(const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); }
std::vector<double> to_double(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }
std::vector<float> nan_filled(size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }

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

struct Case {
  int B, N, D, H;
  bool alibi;
  // With N = 1 the only pair has p = 1 and o = v, so ∂L/∂s = dO·v − dO·o is exactly 0 on the CPU and
  // rounding noise (~1e-6) on the GPU: dq and dk are then compared with this absolute floor.
  double abs_floor = 0;
};

struct Wanted {
  bool dq = true, dk = true, dv = true;
};

void check_case(const Case& cs, const Wanted& want = Wanted{}) {
  const int B = cs.B, N = cs.N, D = cs.D, H = cs.H;
  SCOPED_TRACE("B " + std::to_string(B) + " N " + std::to_string(N) + " D " + std::to_string(D) + " H " +
               std::to_string(H) + (cs.alibi ? " +alibi" : ""));
  Rng rng(uint64_t(B) * 1000003 + N * 7919 + D * 131 + H * 17 + cs.alibi);
  const size_t n = size_t(B) * N * D, nh = size_t(B) * N * H;
  const auto q = to_float(random_normal(n, rng)), k = to_float(random_normal(n, rng)),
             v = to_float(random_normal(n, rng));

  std::vector<float> o(n), lse(nh);
  causal_attn_forward<float>(o.data(), lse.data(), q.data(), k.data(), v.data(), B, N, H, D, cs.alibi);
  const auto qd = to_double(q), kd = to_double(k), vd = to_double(v);
  std::vector<double> od(n), lsed(nh);
  causal_attn_forward<double>(od.data(), lsed.data(), qd.data(), kd.data(), vd.data(), B, N, H, D, cs.alibi);

  DeviceBuffer<float> gq(q), gk(k), gv(v), go(nan_filled(n)), glse(nan_filled(nh));
  cuda::causal_attn_forward(go.get(), glse.get(), gq.get(), gk.get(), gv.get(), B, N, H, D, cs.alibi);
  expect_matches(go.download(), o, {}, od, kForwardRel, "o");
  expect_matches(glse.download(), lse, {}, lsed, kForwardRel, "lse [B, H, N]");

  // Backward from the CPU forward's o and lse, into non-zero gradients (checks +=).
  const auto d_o = to_float(random_normal(n, rng));
  const auto dq0 = to_float(random_normal(n, rng, 0.3)), dk0 = to_float(random_normal(n, rng, 0.3)),
             dv0 = to_float(random_normal(n, rng, 0.3));
  std::vector<float> dq = dq0, dk = dk0, dv = dv0;
  causal_attn_backward<float>(want.dq ? dq.data() : nullptr, want.dk ? dk.data() : nullptr,
                              want.dv ? dv.data() : nullptr, d_o.data(), q.data(), k.data(), v.data(), o.data(),
                              lse.data(), B, N, H, D, cs.alibi);
  const auto d_od = to_double(d_o);
  auto dqd = to_double(dq0), dkd = to_double(dk0), dvd = to_double(dv0);
  causal_attn_backward<double>(want.dq ? dqd.data() : nullptr, want.dk ? dkd.data() : nullptr,
                               want.dv ? dvd.data() : nullptr, d_od.data(), qd.data(), kd.data(), vd.data(), od.data(),
                               lsed.data(), B, N, H, D, cs.alibi);

  DeviceBuffer<float> gdo(d_o), gocpu(o), glsecpu(lse), gdq(dq0), gdk(dk0), gdv(dv0);
  cuda::causal_attn_backward(want.dq ? gdq.get() : nullptr, want.dk ? gdk.get() : nullptr,
                             want.dv ? gdv.get() : nullptr, gdo.get(), gq.get(), gk.get(), gv.get(), gocpu.get(),
                             glsecpu.get(), B, N, H, D, cs.alibi);
  expect_matches(gdq.download(), dq, dq0, dqd, kGradRel, "dq", cs.abs_floor);
  expect_matches(gdk.download(), dk, dk0, dkd, kGradRel, "dk", cs.abs_floor);
  expect_matches(gdv.download(), dv, dv0, dvd, kGradRel, "dv");
  MUSE_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace

// gpt-small-like head layout (D = 512, H = 8, d_h = 64); N = 150 spans three 64-query forward tiles.
TEST(causal_attn_cuda, d512_h8_matches_cpu) {
  MUSE_REQUIRE_GPU();
  check_case({2, 150, 512, 8, false});
  check_case({2, 150, 512, 8, true});
}

TEST(causal_attn_cuda, odd_shapes_match_cpu) {
  MUSE_REQUIRE_GPU();
  check_case({3, 37, 51, 3, false});         // d_h = 17, N crosses a 32-token backward tile
  check_case({3, 37, 51, 3, true});
  check_case({2, 1, 51, 3, true, 1e-4});     // N = 1
  check_case({1, 300, 64, 2, true});         // many key chunks per query tile
  check_case({1, 100, 256, 2, false});       // d_h = 128 (> 48 KiB shared memory)
  check_case({1, 65, 400, 2, true});         // d_h = 200
  check_case({2, 33, 5, 5, true});           // d_h = 1
  check_case({2, 64, 512, 8, true});         // N = 64 and 65: the widest window of the tiled forward
  check_case({1, 65, 64, 1, false});
  check_case({1, 66, 64, 1, true});          // and the first beyond it
}

TEST(causal_attn_cuda, partial_gradients_match_cpu) {
  MUSE_REQUIRE_GPU();
  Wanted dq_only;
  dq_only.dk = dq_only.dv = false;
  check_case({2, 40, 48, 2, true}, dq_only);
  Wanted no_dq;
  no_dq.dq = false;
  check_case({2, 40, 48, 2, true}, no_dq);
}

}  // namespace muse::test
