#include "ops/ffn.cuh"

#include <cuda_bf16.h>

#include <cmath>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/gpu_support.h"
#include "ops/ffn.h"
#include "support/ffn_params.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

// fp32 on both sides: four chained GEMMs (cuBLASLt fp32, no TF32, vs OpenBLAS) and GELU/cap10 (erff,
// expf, tanhf within 2 ulp of the host libm). Errors are summation-order rounding carried through the
// chain, ~1e-6 of the largest entries; every tensor is compared with kRel·max|cpu| absolute plus kRel
// relative, kRel = 3e-5 (the parameter gradients sum over up to 256 rows and 2048 hidden units).
constexpr double kRel = 3e-5;

void expect_close_scaled(const std::vector<float>& gpu, const std::vector<float>& cpu, const std::string& what) {
  expect_close_to_reference(gpu, cpu, kRel * max_abs(cpu), kRel, what);
}

std::vector<float> nan_vector(size_t n) { return std::vector<float>(n, std::nanf("")); }

// The CPU op's forward and backward of one case, what the GPU checks compare with. The gradients start at
// non-zero values (the *0 members) so that the GPU's accumulation is checked too.
struct LowRankReference {
  std::vector<float> y, low1, pre, hidden, low2;
  std::vector<float> dx0, dV10, dU10, db10, dV20, dU20, db20;
  std::vector<float> dx, dV1, dU1, db1, dV2, dU2, db2;

  LowRankReference(const std::vector<float>& x, const RandomLowRankFfn<float>& w, const std::vector<float>& dy,
                   int rows, int D, int rank, Rng& rng)
      : y(size_t(rows) * D), low1(size_t(rows) * rank), pre(size_t(rows) * ffn_hidden(D)), hidden(pre.size()),
        low2(low1.size()) {
    const LowRankFfnParams<float> p = w.params();
    const LowRankFfnSaved<float> saved{low1.data(), pre.data(), hidden.data(), low2.data()};
    lowrank_ffn_forward<float>(y.data(), saved, x.data(), p, rows, D, rank);
    dx0 = random_normal<float>(x.size(), rng, 0.1);
    dV10 = random_normal<float>(w.V1.size(), rng, 0.1), dU10 = random_normal<float>(w.U1.size(), rng, 0.1);
    db10 = random_normal<float>(w.b1.size(), rng, 0.1), dV20 = random_normal<float>(w.V2.size(), rng, 0.1);
    dU20 = random_normal<float>(w.U2.size(), rng, 0.1), db20 = random_normal<float>(w.b2.size(), rng, 0.1);
    dx = dx0, dV1 = dV10, dU1 = dU10, db1 = db10, dV2 = dV20, dU2 = dU20, db2 = db20;
    lowrank_ffn_backward<float>(dx.data(), {dV1.data(), dU1.data(), db1.data(), dV2.data(), dU2.data(), db2.data()},
                                dy.data(), saved, x.data(), p, rows, D, rank);
  }
};

// The six parameter gradients and dx on the device, starting from the reference's starting values.
struct DeviceGradients {
  DeviceBuffer<float> dx, dV1, dU1, db1, dV2, dU2, db2;
  explicit DeviceGradients(const LowRankReference& r)
      : dx(r.dx0), dV1(r.dV10), dU1(r.dU10), db1(r.db10), dV2(r.dV20), dU2(r.dU20), db2(r.db20) {}
  LowRankFfnGrads<float> grads() { return {dV1.get(), dU1.get(), db1.get(), dV2.get(), dU2.get(), db2.get()}; }
  // close(gpu, cpu, name) for each of the seven.
  template <class Close>
  void expect_match(const LowRankReference& r, Close close) const {
    close(dx.download(), r.dx, "dx");
    close(dV1.download(), r.dV1, "dV1");
    close(dU1.download(), r.dU1, "dU1");
    close(db1.download(), r.db1, "db1");
    close(dV2.download(), r.dV2, "dV2");
    close(dU2.download(), r.dU2, "dU2");
    close(db2.download(), r.db2, "db2");
  }
};

// Rank per width: below, at and above D for the odd widths.
void check_lowrank(int rows, int D, int rank) {
  SCOPED_TRACE("lowrank rows " + std::to_string(rows) + ", D " + std::to_string(D) + ", rank " + std::to_string(rank));
  Rng rng(rows * 1009 + D * 17 + rank);
  auto x = random_normal<float>(size_t(rows) * D, rng);
  const RandomLowRankFfn<float> w(D, rank, rng);
  const std::vector<float>&V1 = w.V1, &U1 = w.U1, &b1 = w.b1, &V2 = w.V2, &U2 = w.U2, &b2 = w.b2;
  auto dy = random_normal<float>(size_t(rows) * D, rng);

  const LowRankReference cpu(x, w, dy, rows, D, rank, rng);

  DeviceBuffer<float> gx(x), gV1(V1), gU1(U1), gb1(b1), gV2(V2), gU2(U2), gb2(b2), gdy(dy);
  DeviceBuffer<float> gy(nan_vector(cpu.y.size())), glow1(nan_vector(cpu.low1.size())),
      gpre(nan_vector(cpu.pre.size())), ghidden(nan_vector(cpu.hidden.size())), glow2(nan_vector(cpu.low2.size()));
  const LowRankFfnParams<float> gp{gV1.get(), gU1.get(), gb1.get(), gV2.get(), gU2.get(), gb2.get()};
  const LowRankFfnSaved<float> gsaved{glow1.get(), gpre.get(), ghidden.get(), glow2.get()};
  cuda::lowrank_ffn_forward(gy.get(), gsaved, gx.get(), gp, rows, D, rank);
  expect_close_scaled(gy.download(), cpu.y, "y");
  expect_close_scaled(glow1.download(), cpu.low1, "low1");
  expect_close_scaled(gpre.download(), cpu.pre, "pre");
  expect_close_scaled(ghidden.download(), cpu.hidden, "hidden");
  expect_close_scaled(glow2.download(), cpu.low2, "low2");

  // The scratch is poisoned: the intermediate gradients must be written before they are read.
  DeviceBuffer<float> scratch(nan_vector(cuda::lowrank_ffn_backward_scratch_floats(rows, D, rank)));
  DeviceGradients g(cpu);
  cuda::lowrank_ffn_backward(g.dx.get(), g.grads(), gdy.get(), gsaved, gx.get(), gp, rows, D, rank, scratch.get());
  g.expect_match(cpu, expect_close_scaled);

  // Null gradients are skipped (dx alone; and only one parameter gradient).
  DeviceBuffer<float> gdx_only(cpu.dx0), gdU1_only(cpu.dU10);
  cuda::lowrank_ffn_backward(gdx_only.get(), {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr}, gdy.get(),
                             gsaved, gx.get(), gp, rows, D, rank, scratch.get());
  expect_close_scaled(gdx_only.download(), cpu.dx, "dx alone");
  cuda::lowrank_ffn_backward(nullptr, {nullptr, gdU1_only.get(), nullptr, nullptr, nullptr, nullptr}, gdy.get(),
                             gsaved, gx.get(), gp, rows, D, rank, scratch.get());
  expect_close_scaled(gdU1_only.download(), cpu.dU1, "dU1 alone");
}

void check_dense(int rows, int D) {
  SCOPED_TRACE("dense rows " + std::to_string(rows) + ", D " + std::to_string(D));
  const int F = ffn_hidden(D);
  Rng rng(rows * 2003 + D);
  auto x = random_normal<float>(size_t(rows) * D, rng);
  auto W1 = random_normal<float>(size_t(F) * D, rng, 1.5 / std::sqrt(double(D)));
  auto b1 = random_normal<float>(F, rng, 0.5);
  auto W2 = random_normal<float>(size_t(D) * F, rng, 1.0 / std::sqrt(double(F)));
  auto b2 = random_normal<float>(D, rng, 0.5);
  auto dy = random_normal<float>(size_t(rows) * D, rng);

  std::vector<float> y(size_t(rows) * D), pre(size_t(rows) * F), hidden(pre.size());
  const DenseMlpParams<float> p{W1.data(), b1.data(), W2.data(), b2.data()};
  const DenseMlpSaved<float> saved{pre.data(), hidden.data()};
  dense_mlp_forward<float>(y.data(), saved, x.data(), p, rows, D);
  auto dx0 = random_normal<float>(x.size(), rng, 0.1);
  auto dW10 = random_normal<float>(W1.size(), rng, 0.1), db10 = random_normal<float>(b1.size(), rng, 0.1),
       dW20 = random_normal<float>(W2.size(), rng, 0.1), db20 = random_normal<float>(b2.size(), rng, 0.1);
  std::vector<float> dx = dx0, dW1 = dW10, db1 = db10, dW2 = dW20, db2 = db20;
  dense_mlp_backward<float>(dx.data(), {dW1.data(), db1.data(), dW2.data(), db2.data()}, dy.data(), saved, x.data(),
                            p, rows, D);

  DeviceBuffer<float> gx(x), gW1(W1), gb1(b1), gW2(W2), gb2(b2), gdy(dy);
  DeviceBuffer<float> gy(nan_vector(y.size())), gpre(nan_vector(pre.size())), ghidden(nan_vector(hidden.size()));
  const DenseMlpParams<float> gp{gW1.get(), gb1.get(), gW2.get(), gb2.get()};
  const DenseMlpSaved<float> gsaved{gpre.get(), ghidden.get()};
  cuda::dense_mlp_forward(gy.get(), gsaved, gx.get(), gp, rows, D);
  expect_close_scaled(gy.download(), y, "y");
  expect_close_scaled(gpre.download(), pre, "pre");
  expect_close_scaled(ghidden.download(), hidden, "hidden");

  DeviceBuffer<float> scratch(nan_vector(cuda::dense_mlp_backward_scratch_floats(rows, D)));
  DeviceBuffer<float> gdx(dx0), gdW1(dW10), gdb1(db10), gdW2(dW20), gdb2(db20);
  cuda::dense_mlp_backward(gdx.get(), {gdW1.get(), gdb1.get(), gdW2.get(), gdb2.get()}, gdy.get(), gsaved, gx.get(),
                           gp, rows, D, scratch.get());
  expect_close_scaled(gdx.download(), dx, "dx");
  expect_close_scaled(gdW1.download(), dW1, "dW1");
  expect_close_scaled(gdb1.download(), db1, "db1");
  expect_close_scaled(gdW2.download(), dW2, "dW2");
  expect_close_scaled(gdb2.download(), db2, "db2");
}

std::vector<__nv_bfloat16> to_bf16(const std::vector<float>& x) {
  std::vector<__nv_bfloat16> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = __float2bfloat16_rn(x[i]);
  return out;
}
std::vector<float> widen(const std::vector<__nv_bfloat16>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = __bfloat162float(x[i]);
  return out;
}
// x rounded to bf16 and back: the values a bf16 operand holds.
std::vector<float> bf16_values(const std::vector<float>& x) { return widen(to_bf16(x)); }

// The bf16 op against the fp32 CPU op on the same bf16-representable x and weights: what differs is the
// rounding of low1, pre, hidden, low2 (forward) and of dy, ∂low2, ∂pre, ∂low1 (backward) to 8-bit mantissas,
// 2⁻⁹ relative each, carried through the chain: every tensor within 3e-2·max|cpu| (it was within 1e-2 on
// the H200). The forward's pre is U₁V₁x without b₁, and the 4D-wide buffers are poisoned first.
void check_lowrank_bf16(int rows, int D, int rank) {
  SCOPED_TRACE("lowrank bf16 rows " + std::to_string(rows) + ", D " + std::to_string(D) + ", rank " +
               std::to_string(rank));
  constexpr double kBf16Rel = 3e-2;
  auto close = [](const std::vector<float>& gpu, const std::vector<float>& cpu, const std::string& what) {
    expect_close_to_reference(gpu, cpu, kBf16Rel * max_abs(cpu), 0.0, what);
  };
  const int F = ffn_hidden(D);
  Rng rng(rows * 31 + D * 7 + rank);
  const auto x = bf16_values(random_normal<float>(size_t(rows) * D, rng));
  RandomLowRankFfn<float> w(D, rank, rng);
  for (std::vector<float>* m : {&w.V1, &w.U1, &w.V2, &w.U2}) *m = bf16_values(*m);
  const auto dy = random_normal<float>(size_t(rows) * D, rng);

  const LowRankReference cpu(x, w, dy, rows, D, rank, rng);

  DeviceBuffer<__nv_bfloat16> gx(to_bf16(x)), gV1(to_bf16(w.V1)), gU1(to_bf16(w.U1)), gV2(to_bf16(w.V2)),
      gU2(to_bf16(w.U2));
  DeviceBuffer<float> gb1(w.b1), gb2(w.b2), gdy(dy), gy(nan_vector(cpu.y.size()));
  const std::vector<__nv_bfloat16> poison_narrow(cpu.low1.size(), __float2bfloat16_rn(std::nanf(""))),
      poison_wide(cpu.pre.size(), __float2bfloat16_rn(std::nanf("")));
  DeviceBuffer<__nv_bfloat16> glow1(poison_narrow), gpre(poison_wide), ghidden(poison_wide), glow2(poison_narrow);
  const LowRankFfnParams<float> biases{nullptr, nullptr, gb1.get(), nullptr, nullptr, gb2.get()};
  const LowRankFfnParams<__nv_bfloat16> weights{gV1.get(), gU1.get(), nullptr, gV2.get(), gU2.get(), nullptr};
  const LowRankFfnSaved<__nv_bfloat16> gsaved{glow1.get(), gpre.get(), ghidden.get(), glow2.get()};
  cuda::lowrank_ffn_forward_bf16(gy.get(), gsaved, gx.get(), biases, weights, rows, D, rank);
  close(gy.download(), cpu.y, "y");
  close(widen(glow1.download()), cpu.low1, "low1");
  std::vector<float> pre_with_bias = widen(gpre.download());
  for (size_t i = 0; i < pre_with_bias.size(); ++i) pre_with_bias[i] += w.b1[i % F];
  close(pre_with_bias, cpu.pre, "pre + b1");
  close(widen(ghidden.download()), cpu.hidden, "hidden");
  close(widen(glow2.download()), cpu.low2, "low2");

  DeviceBuffer<float> scratch(nan_vector(cuda::lowrank_ffn_bf16_backward_scratch_floats(rows, D, rank)));
  DeviceGradients g(cpu);
  cuda::lowrank_ffn_backward_bf16(g.dx.get(), g.grads(), gdy.get(), gsaved, gx.get(), biases, weights, rows, D, rank,
                                  scratch.get());
  g.expect_match(cpu, close);

  // accumulate = false writes dx (over NaN here); the parameter gradients still accumulate.
  std::vector<float> dx_alone(cpu.dx.size());
  for (size_t i = 0; i < cpu.dx.size(); ++i) dx_alone[i] = cpu.dx[i] - cpu.dx0[i];
  DeviceBuffer<float> wdx(nan_vector(cpu.dx.size()));
  cuda::lowrank_ffn_backward_bf16(wdx.get(), {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr}, gdy.get(), gsaved,
                                  gx.get(), biases, weights, rows, D, rank, scratch.get(), 0, /*accumulate=*/false);
  close(wdx.download(), dx_alone, "dx written");
}

}  // namespace

TEST(ffn_cuda, lowrank_bf16_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (int rows : {1, 37, 256})
    for (auto [D, rank] : {std::pair{12, 7}, std::pair{64, 33}, std::pair{512, 64}}) check_lowrank_bf16(rows, D, rank);
}

TEST(ffn_cuda, lowrank_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (int rows : {1, 37, 256})
    for (auto [D, rank] : {std::pair{10, 7}, std::pair{64, 33}, std::pair{512, 64}}) check_lowrank(rows, D, rank);
  check_lowrank(37, 10, 13);  // rank above D
}

TEST(ffn_cuda, dense_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (int rows : {1, 37, 256})
    for (int D : {10, 64, 512}) check_dense(rows, D);
}

}  // namespace muse::test
