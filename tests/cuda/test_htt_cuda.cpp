#include "ops/htt.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/gpu_support.h"
#include "ops/htt.h"
#include "ops/linear.cuh"
#include "ops/linear.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

// |gpu − cpu| ≤ rel·max|cpu| + rel·|cpu|: rounding errors scale with the tensor's largest entries.
void expect_close_scaled(const std::vector<float>& gpu, const std::vector<float>& cpu, double rel,
                         const std::string& what) {
  expect_close_to_reference(gpu, cpu, rel * max_abs(cpu), rel, what);
}

// The same test row by row (rows of `width` entries, each scaled by its own largest entry): rows of very
// different magnitude — the gradient of a floored (zero) core row is 1e6 times larger than the others —
// each get a meaningful tolerance.
void expect_close_rowwise(const std::vector<float>& gpu, const std::vector<float>& cpu, int width, double rel,
                          const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  size_t bad = 0, worst_i = 0;
  double worst = -1;
  for (size_t row = 0; row * width < cpu.size(); ++row) {
    const size_t begin = row * width, end = std::min(cpu.size(), begin + width);
    double row_max = 0;
    for (size_t i = begin; i < end; ++i) row_max = std::max(row_max, double(std::abs(cpu[i])));
    for (size_t i = begin; i < end; ++i) {
      const double err = std::abs(double(gpu[i]) - double(cpu[i]));
      const double allowed = rel * (row_max + std::abs(double(cpu[i])));
      if (!(err <= allowed)) ++bad;
      if (!(err / (allowed > 0 ? allowed : 1e-30) <= worst)) {
        worst = err / (allowed > 0 ? allowed : 1e-30);
        worst_i = i;
      }
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << cpu.size() << " elements out of tolerance (rel " << rel
                     << " of the row maximum); worst at " << worst_i << " (row " << worst_i / width << "): gpu "
                     << gpu[worst_i] << " cpu " << cpu[worst_i];
}

std::vector<float> nan_vector(size_t n) { return std::vector<float>(n, std::nanf("")); }

// Tolerances (fp32 on both sides):
// Each tensor is compared row by row (see expect_close_rowwise); norms and dθ against their largest entry.
//  * normalised cores and E: r-term sums of O(1/√(d1·d2)) products plus a norm; cosf/sqrtf/division within
//    2 ulp of the host. 1e-5 of the largest entry.
//  * dA, dB: each entry sums v2·d2 (or v1·d1) products in the same order as the CPU except the inner dot
//    (the CPU's is an omp-simd reduction); then the projection. 3e-5.
//  * dθ: one sum over all V·D entries of dE (blocked: q, u, p, digits), CPU and GPU blocked differently
//    (warp tree over p on the GPU). Relative error up to ~eps·(d2 + v2 + d1 + v1) ≈ 3e-5 at V = 50257;
//    1e-4.
constexpr double kForwardRel = 1e-5, kCoreGradRel = 3e-5, kThetaRel = 1e-4;

void check_htt(int V, int D, int r) {
  const HttShape s = htt_shape(V, D, r);
  SCOPED_TRACE("V " + std::to_string(V) + ", D " + std::to_string(D) + ", r " + std::to_string(r) + " (v1 " +
               std::to_string(s.v1) + ", v2 " + std::to_string(s.v2) + ", d1 " + std::to_string(s.d1) + ", d2 " +
               std::to_string(s.d2) + ")");
  Rng rng(uint64_t(V) * 31 + D * 7 + r);
  auto A = random_normal<float>(size_t(s.v1) * s.r * s.d1, rng);
  auto B = random_normal<float>(size_t(s.v2) * s.r * s.d2, rng);
  auto theta = random_uniform<float>(s.r, rng, 0.2, 1.2);
  // One A row and one B row at zero: exercises the norm floor (forward and backward).
  for (int k = 0; k < s.d1; ++k) A[size_t(s.r) * s.d1 + k] = 0.f;  // digit 1, rank 0 (digit 0 if v1 = 1)
  for (int k = 0; k < s.d2; ++k) B[k] = 0.f;                       // digit 0, rank 0
  const size_t nE = size_t(s.Vp) * s.D;

  std::vector<float> E(nE), A_hat(A.size()), A_norm(size_t(s.v1) * s.r), B_hat(B.size()), B_norm(size_t(s.v2) * s.r);
  htt_materialize_forward(E.data(), A_hat.data(), A_norm.data(), B_hat.data(), B_norm.data(), A.data(), B.data(),
                          theta.data(), s);

  DeviceBuffer<float> gA(A), gB(B), gtheta(theta);
  DeviceBuffer<float> gE(nan_vector(nE)), gA_hat(nan_vector(A.size())), gA_norm(nan_vector(A_norm.size())),
      gB_hat(nan_vector(B.size())), gB_norm(nan_vector(B_norm.size()));
  cuda::htt_materialize_forward(gE.get(), gA_hat.get(), gA_norm.get(), gB_hat.get(), gB_norm.get(), gA.get(), gB.get(),
                                gtheta.get(), s);
  expect_close_rowwise(gA_hat.download(), A_hat, s.d1, kForwardRel, "A_hat");
  expect_close_scaled(gA_norm.download(), A_norm, kForwardRel, "A_norm");
  expect_close_rowwise(gB_hat.download(), B_hat, s.d2, kForwardRel, "B_hat");
  expect_close_scaled(gB_norm.download(), B_norm, kForwardRel, "B_norm");
  expect_close_rowwise(gE.download(), E, s.D, kForwardRel, "E");  // rows ≥ V must be exactly 0

  // dE non-zero everywhere, also on the padded rows ≥ V (which must be ignored).
  auto dE = random_normal<float>(nE, rng);
  auto dA0 = random_normal<float>(A.size(), rng, 0.1), dB0 = random_normal<float>(B.size(), rng, 0.1),
       dtheta0 = random_normal<float>(s.r, rng, 0.1);
  std::vector<float> dA = dA0, dB = dB0, dtheta = dtheta0;
  htt_materialize_backward(dA.data(), dB.data(), dtheta.data(), dE.data(), A_hat.data(), A_norm.data(), B_hat.data(),
                           B_norm.data(), theta.data(), s);
  DeviceBuffer<float> gdE(dE), gdA(dA0), gdB(dB0), gdtheta(dtheta0);
  DeviceBuffer<float> scratch(nan_vector(cuda::htt_backward_scratch_floats(s)));
  cuda::htt_materialize_backward(gdA.get(), gdB.get(), gdtheta.get(), gdE.get(), gA_hat.get(), gA_norm.get(),
                                 gB_hat.get(), gB_norm.get(), gtheta.get(), s, scratch.get());
  expect_close_rowwise(gdA.download(), dA, s.d1, kCoreGradRel, "dA");
  expect_close_rowwise(gdB.download(), dB, s.d2, kCoreGradRel, "dB");
  expect_close_scaled(gdtheta.download(), dtheta, kThetaRel, "dtheta");

  // Each gradient alone (the others null; dθ alone still needs the scratch, dA alone does not).
  DeviceBuffer<float> gdA_only(dA0), gdB_only(dB0), gdtheta_only(dtheta0);
  cuda::htt_materialize_backward(gdA_only.get(), nullptr, nullptr, gdE.get(), gA_hat.get(), gA_norm.get(),
                                 gB_hat.get(), gB_norm.get(), gtheta.get(), s, nullptr);
  cuda::htt_materialize_backward(nullptr, gdB_only.get(), nullptr, gdE.get(), gA_hat.get(), gA_norm.get(),
                                 gB_hat.get(), gB_norm.get(), gtheta.get(), s, nullptr);
  cuda::htt_materialize_backward(nullptr, nullptr, gdtheta_only.get(), gdE.get(), gA_hat.get(), gA_norm.get(),
                                 gB_hat.get(), gB_norm.get(), gtheta.get(), s, scratch.get());
  expect_close_rowwise(gdA_only.download(), dA, s.d1, kCoreGradRel, "dA alone");
  expect_close_rowwise(gdB_only.download(), dB, s.d2, kCoreGradRel, "dB alone");
  expect_close_scaled(gdtheta_only.download(), dtheta, kThetaRel, "dtheta alone");
}

// Lookup: the forward is a copy (exact). The backward adds the same fp32 values in the same (token) order
// as the CPU, so it is exact too: tolerance 0.
void check_lookup(int V, int n, int D) {
  SCOPED_TRACE("lookup V " + std::to_string(V) + ", n " + std::to_string(n) + ", D " + std::to_string(D));
  Rng rng(uint64_t(V) * 13 + n * 5 + D);
  const int Vp = padded_vocab(V);
  auto E = random_normal<float>(size_t(Vp) * D, rng);
  std::vector<int32_t> ids(n);
  // Half the tokens from a handful of ids (many repeats, so the order of additions matters), half anywhere.
  for (int t = 0; t < n; ++t) ids[t] = int32_t(t % 2 ? rng.below(V) : rng.below(std::min(V, 5)));
  ids[0] = V - 1;

  std::vector<float> x(size_t(n) * D);
  embedding_lookup_forward(x.data(), E.data(), ids.data(), n, D);
  DeviceBuffer<float> gE(E), gx(nan_vector(x.size()));
  DeviceBuffer<int32_t> gids(ids);
  cuda::embedding_lookup_forward(gx.get(), gE.get(), gids.get(), n, D);
  expect_close_to_reference(gx.download(), x, 0, 0, "x");

  auto dx = random_normal<float>(x.size(), rng);
  auto dE0 = random_normal<float>(E.size(), rng, 0.1);
  std::vector<float> dE = dE0;
  embedding_lookup_backward(dE.data(), dx.data(), ids.data(), n, D);
  DeviceBuffer<float> gdx(dx), gdE(dE0);
  // The scratch is poisoned: everything in it must be written before it is read.
  const size_t scratch_floats = (cuda::embedding_lookup_backward_scratch_bytes(n, V) + 3) / 4;
  DeviceBuffer<float> scratch(nan_vector(scratch_floats));
  cuda::embedding_lookup_backward(gdE.get(), gdx.get(), gids.get(), n, D, V, scratch.get());
  expect_close_to_reference(gdE.download(), dE, 0, 0, "dE");
}

}  // namespace

TEST(htt_cuda, materialize_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (auto [V, D, r] : {std::tuple{37, 10, 3}, std::tuple{37, 64, 5}, std::tuple{37, 512, 16}, std::tuple{300, 37, 7},
                         std::tuple{50257, 64, 16}, std::tuple{50257, 512, 16}})
    check_htt(V, D, r);
}

TEST(htt_cuda, embedding_lookup_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (int n : {1, 37, 256, 5000})  // 5000: long runs of the repeated ids over the GPT-2 vocabulary
    for (int D : {10, 64, 512}) check_lookup(n == 5000 ? 50257 : 37, n, D);
  check_lookup(256, 65536, 64);  // a training batch's worth of tokens over a byte vocabulary: runs of thousands
}

// The tied head on the materialised E: logits = h·Eᵀ over Vp columns (padded ones exactly 0) and its
// backward into dh and dE. GEMM tolerance as in test_linear_cuda: 1e-5 of the largest entry.
TEST(htt_cuda, tied_head_matches_cpu) {
  MUSE_REQUIRE_GPU();
  const HttShape s = htt_shape(50257, 64, 16);
  const int rows = 37;
  Rng rng(99);
  auto A = random_normal<float>(size_t(s.v1) * s.r * s.d1, rng), B = random_normal<float>(size_t(s.v2) * s.r * s.d2, rng);
  auto theta = random_uniform<float>(s.r, rng, 0.2, 1.2);
  auto h = random_normal<float>(size_t(rows) * s.D, rng), dlogits = random_normal<float>(size_t(rows) * s.Vp, rng);
  std::vector<float> E(size_t(s.Vp) * s.D), A_hat(A.size()), A_norm(size_t(s.v1) * s.r), B_hat(B.size()),
      B_norm(size_t(s.v2) * s.r), logits(size_t(rows) * s.Vp), dh(h.size(), 0.5f), dE(E.size(), -0.25f);
  htt_materialize_forward(E.data(), A_hat.data(), A_norm.data(), B_hat.data(), B_norm.data(), A.data(), B.data(),
                          theta.data(), s);
  linear_forward(logits.data(), h.data(), E.data(), static_cast<const float*>(nullptr), rows, s.D, s.Vp);
  linear_backward(dh.data(), dE.data(), static_cast<float*>(nullptr), dlogits.data(), h.data(), E.data(), rows, s.D,
                  s.Vp);

  DeviceBuffer<float> gE(E), gh(h), gdlogits(dlogits), glogits(nan_vector(logits.size())),
      gdh(std::vector<float>(h.size(), 0.5f)), gdE(std::vector<float>(E.size(), -0.25f));
  cuda::linear_forward(glogits.get(), gh.get(), gE.get(), nullptr, rows, s.D, s.Vp);
  cuda::linear_backward(gdh.get(), gdE.get(), nullptr, gdlogits.get(), gh.get(), gE.get(), rows, s.D, s.Vp);
  const auto got = glogits.download();
  expect_close_scaled(got, logits, 1e-5, "logits");
  for (int row = 0; row < rows; ++row)
    for (int v = s.V; v < s.Vp; ++v) ASSERT_EQ(got[size_t(row) * s.Vp + v], 0.f) << "padded logit " << row << ", " << v;
  expect_close_scaled(gdh.download(), dh, 1e-5, "dh");
  expect_close_scaled(gdE.download(), dE, 1e-5, "dE");
}

}  // namespace muse::test
