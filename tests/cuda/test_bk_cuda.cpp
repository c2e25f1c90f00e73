#include "ops/bk.cuh"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/math.h"
#include "cuda/gpu_support.h"
#include "ops/bk.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

// Tolerances (fp32 on both sides, so the GPU/CPU difference is at most the sum of two fp32 errors; the bounds
// below were set from the fp32-vs-fp64 error of the CPU op on these very inputs, measured for η ∈ {0.05, 0.2, 1},
// three seeds, up to B·N = 4×1024, D = 512):
//   * every tensor output and gradient: |Δ| ≤ (2e-5/η)·max|ref| + 1e-5·|ref|. The scan amplifies a rounding
//     error δa of the diagonal into |g|²·δa, |g| ≤ 1/η, i.e. a relative error ∝ 1/η (SPEC §6: "the BK tolerance
//     scales with 1/η"). Measured fp32-vs-fp64: (err/max|ref|)·η ≤ 1.7e-6 (du, g of the layer), so 2e-5 leaves ~12×.
//   * scalar gradients (E₀, η or ε_p, b_v, b_J: sums over all B·N steps, with cancellation): |Δ| ≤ (2e-6/η)·S,
//     S = Σ_t |Re w_t| (w_t = conj(g_t²)·λ_t, the per-step term). Measured fp32-vs-fp64: err/S ≤ 4.8e-6 at
//     η = 0.05, ≤ 2.4e-7 at η ≥ 0.2: ≥ 8× margin.
constexpr double kTensorTol = 2e-5;  // times 1/η, relative to the tensor's largest entry
constexpr double kScalarTol = 2e-6;  // times 1/η, relative to S
constexpr double kRtol = 1e-5;

void expect_accumulated(const std::vector<float>& gpu, const std::vector<float>& start,
                        const std::vector<float>& increment, double atol, const std::string& what) {
  muse::test::expect_accumulated(gpu, start, increment, atol, kRtol, what);
}

double sum_abs(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += std::abs(x);
  return s;
}


double eta_of(float eps_p) { return softplus(double(eps_p)) + kBkEtaFloor; }
float eps_for_eta(double eta) {
  // softplus⁻¹(η − 0.05); η = 0.05 itself is the limit ε_p → −∞: −12 gives η − 0.05 ≈ 6e-6.
  return eta - kBkEtaFloor > 1e-5 ? float(std::log(std::expm1(eta - kBkEtaFloor))) : -12.f;
}

struct CausalCase {
  int B, N;
  bool hopping;
  double eta;
  bool scalars;  // ask for dE0 and deta (otherwise null, with a null workspace)
};

void check_causal(const CausalCase& c) {
  SCOPED_TRACE("causal B " + std::to_string(c.B) + ", N " + std::to_string(c.N) + ", hopping " +
               std::to_string(c.hopping) + ", eta " + std::to_string(c.eta));
  Rng rng(c.B * 7919 + c.N * 31 + (c.hopping ? 1 : 0) + int(c.eta * 1000));
  const int B = c.B, N = c.N;
  const size_t n = size_t(B) * N;
  std::vector<float> a(n), J2(n);
  for (float& x : a) x = float(1 + cap(2.0 * rng.normal(), 5.0));
  for (float& x : J2) {
    const double j = rng.uniform(-1, 1);
    x = float(j * j);
  }
  const auto dg = random_normal<float>(2 * n, rng);
  const float E0 = 0.3f, eta = float(c.eta);
  const float* J2_cpu = c.hopping ? J2.data() : nullptr;

  std::vector<float> g(2 * n), da(n, 0.f), dJ2(n, 0.f), dE0(1, 0.f), deta(1, 0.f);
  bk_causal_forward<float>(g.data(), a.data(), J2_cpu, E0, eta, B, N);
  bk_causal_backward<float>(da.data(), dJ2.data(), dE0.data(), deta.data(), dg.data(), g.data(), J2_cpu, B, N);

  DeviceBuffer<float> ga(a), gJ2(J2), gg(nans(2 * n));
  cuda::bk_causal_forward(gg.get(), ga.get(), c.hopping ? gJ2.get() : nullptr, E0, eta, B, N);
  const double tensor_atol = kTensorTol / c.eta;
  expect_close_to_reference(gg.download(), g, tensor_atol * max_abs(g), kRtol, "g");

  const auto da0 = accumulation_start(da), dJ20 = accumulation_start(dJ2), dE00 = accumulation_start(dE0),
             deta0 = accumulation_start(deta);
  DeviceBuffer<float> gdg(dg), gda(da0), gdJ2(dJ20), gdE0(dE00), gdeta(deta0);
  DeviceBuffer<float> workspace(nans(cuda::bk_causal_backward_workspace_floats(B)));
  // The CPU's g as the saved forward output, so the backward is compared on identical inputs.
  DeviceBuffer<float> g_saved(g);
  cuda::bk_causal_backward(gda.get(), c.hopping ? gdJ2.get() : nullptr, c.scalars ? gdE0.get() : nullptr,
                           c.scalars ? gdeta.get() : nullptr, gdg.get(), g_saved.get(),
                           c.hopping ? gJ2.get() : nullptr, B, N, c.scalars ? workspace.get() : nullptr);
  expect_accumulated(gda.download(), da0, da, tensor_atol * max_abs(da), "da");
  if (c.hopping) expect_accumulated(gdJ2.download(), dJ20, dJ2, tensor_atol * max_abs(dJ2), "dJ2");
  if (c.scalars) {
    const double S = sum_abs(da);  // Σ_t |Re w_t|
    expect_accumulated(gdE0.download(), dE00, dE0, kScalarTol / c.eta * S, "dE0");
    expect_accumulated(gdeta.download(), deta0, deta, kScalarTol / c.eta * S, "deta");
  }
}

struct LayerCase {
  int B, N, D;
  bool hopping;
  double eta;
  bool with_dg, with_dF;
};

struct LayerData {
  std::vector<float> u, w_v, b_v, w_J, b_J, eps_p, E0;
  BkParams<float> params() const { return {w_v.data(), b_v.data(), w_J.data(), b_J.data(), eps_p.data(), E0.data()}; }
};

struct LayerGrads {
  std::vector<float> du, w_v, b_v, w_J, b_J, eps_p, E0;
};

void check_layer(const LayerCase& c) {
  SCOPED_TRACE("layer B " + std::to_string(c.B) + ", N " + std::to_string(c.N) + ", D " + std::to_string(c.D) +
               ", hopping " + std::to_string(c.hopping) + ", eta " + std::to_string(c.eta) + ", dg " +
               std::to_string(c.with_dg) + ", dF " + std::to_string(c.with_dF));
  const int B = c.B, N = c.N, D = c.D, rows = B * N;
  Rng rng(rows * 13 + D * 7 + (c.hopping ? 5 : 0) + int(c.eta * 100));
  // Weights sized so w_v·u and w_J·[u_{t−1}; u_t] are O(1): the cap and tanh are exercised but not saturated.
  LayerData in;
  in.u = random_normal<float>(size_t(rows) * D, rng);
  in.w_v = random_normal<float>(D, rng, 1.5 / std::sqrt(D));
  in.b_v = {0.2f};
  in.w_J = random_normal<float>(2 * D, rng, 1.0 / std::sqrt(D));
  in.b_J = {0.1f};
  in.eps_p = {eps_for_eta(c.eta)};
  in.E0 = {0.3f};
  const double eta = eta_of(in.eps_p[0]);
  const auto dg = random_normal<float>(2L * rows, rng), dF = random_normal<float>(3L * rows, rng);
  const BkParams<float> params = in.params();

  // CPU reference.
  std::vector<float> g(2L * rows), F(3L * rows), v(rows), J(rows, 0.f), J2(rows, 0.f);
  const BkSaved<float> saved{v.data(), J.data(), J2.data()};
  bk_layer_forward<float>(g.data(), F.data(), saved, in.u.data(), params, c.hopping, B, N, D);
  LayerGrads d{std::vector<float>(size_t(rows) * D, 0.f), std::vector<float>(D, 0.f), {0.f},
               std::vector<float>(2 * D, 0.f), {0.f}, {0.f}, {0.f}};
  const BkGrads<float> grads{d.w_v.data(), d.b_v.data(), d.w_J.data(), d.b_J.data(), d.eps_p.data(), d.E0.data()};
  const float* dg_in = c.with_dg ? dg.data() : nullptr;
  const float* dF_in = c.with_dF ? dF.data() : nullptr;
  bk_layer_backward<float>(d.du.data(), grads, dg_in, dF_in, in.u.data(), g.data(), saved, params, c.hopping, B, N,
                           D);
  // S = Σ_t |Re w_t| from the CPU pieces: ḡ = dg + features' backward, then the causal backward's −Re w.
  double S = 0;
  {
    std::vector<float> gbar(2L * rows, 0.f), d_eta(1, 0.f), da(rows, 0.f);
    if (c.with_dg) gbar = dg;
    if (c.with_dF) bk_features_backward<float>(gbar.data(), d_eta.data(), dF.data(), g.data(), float(eta), rows);
    bk_causal_backward<float>(da.data(), nullptr, nullptr, nullptr, gbar.data(), g.data(),
                              c.hopping ? J2.data() : nullptr, B, N);
    S = sum_abs(da);
  }

  // GPU forward, outputs and saved tensors poisoned.
  DeviceBuffer<float> gu(in.u), gw_v(in.w_v), gb_v(in.b_v), gw_J(in.w_J), gb_J(in.b_J), geps(in.eps_p), gE0(in.E0);
  BkParams<float> gparams{gw_v.get(), gb_v.get(), gw_J.get(), gb_J.get(), geps.get(), gE0.get()};
  DeviceBuffer<float> gg(nans(2L * rows)), gF(nans(3L * rows)), gv(nans(rows)), gJ(nans(rows)), gJ2(nans(rows));
  const BkSaved<float> gsaved{gv.get(), c.hopping ? gJ.get() : nullptr, c.hopping ? gJ2.get() : nullptr};
  cuda::bk_layer_forward(gg.get(), gF.get(), gsaved, gu.get(), gparams, c.hopping, B, N, D);
  const double tol = kTensorTol / eta;
  expect_close_to_reference(gg.download(), g, tol * max_abs(g), kRtol, "g");
  expect_close_to_reference(gF.download(), F, tol * max_abs(F), kRtol, "F");
  expect_close_to_reference(gv.download(), v, tol * max_abs(v), kRtol, "v");
  if (c.hopping) {
    expect_close_to_reference(gJ.download(), J, tol * max_abs(J), kRtol, "J");
    expect_close_to_reference(gJ2.download(), J2, tol * max_abs(J2), kRtol, "J2");
  }

  // GPU backward from the CPU's saved tensors (identical inputs), gradients started non-zero.
  DeviceBuffer<float> sg(g), sv(v), sJ(J), sJ2(J2), gdg(dg), gdF(dF);
  const BkSaved<float> ssaved{sv.get(), sJ.get(), sJ2.get()};
  const auto du0 = accumulation_start(d.du), w_v0 = accumulation_start(d.w_v), b_v0 = accumulation_start(d.b_v),
             w_J0 = accumulation_start(d.w_J), b_J0 = accumulation_start(d.b_J),
             eps0 = accumulation_start(d.eps_p), E00 = accumulation_start(d.E0);
  DeviceBuffer<float> gdu(du0), gdw_v(w_v0), gdb_v(b_v0), gdw_J(w_J0), gdb_J(b_J0), gdeps(eps0), gdE0(E00);
  const BkGrads<float> ggrads{gdw_v.get(), gdb_v.get(), gdw_J.get(), gdb_J.get(), gdeps.get(), gdE0.get()};
  DeviceBuffer<float> workspace(nans(cuda::bk_layer_backward_workspace_floats(B, N, D)));
  cuda::bk_layer_backward(gdu.get(), ggrads, c.with_dg ? gdg.get() : nullptr, c.with_dF ? gdF.get() : nullptr,
                          gu.get(), sg.get(), ssaved, gparams, c.hopping, B, N, D, workspace.get());
  expect_accumulated(gdu.download(), du0, d.du, tol * max_abs(d.du), "du");
  expect_accumulated(gdw_v.download(), w_v0, d.w_v, tol * max_abs(d.w_v), "dw_v");
  const double scalar_atol = kScalarTol / eta * S;
  expect_accumulated(gdb_v.download(), b_v0, d.b_v, scalar_atol, "db_v");
  expect_accumulated(gdeps.download(), eps0, d.eps_p, scalar_atol, "deps_p");
  // Phase 7 gives w_J, b_J, E0 nothing: the CPU increments are zero and the GPU must leave them alone.
  expect_accumulated(gdw_J.download(), w_J0, d.w_J, tol * max_abs(d.w_J), "dw_J");
  expect_accumulated(gdb_J.download(), b_J0, d.b_J, scalar_atol, "db_J");
  expect_accumulated(gdE0.download(), E00, d.E0, scalar_atol, "dE0");
}

void check_gate(int rows, int k) {
  SCOPED_TRACE("gate rows " + std::to_string(rows) + ", k " + std::to_string(k));
  Rng rng(rows * 5 + k);
  const auto F = random_uniform<float>(3L * rows, rng, -1, 1);
  const auto W = random_normal<float>(3L * k, rng, 1.0), b = random_normal<float>(k, rng, 0.5);
  const auto dout = random_normal<float>(size_t(rows) * k, rng);
  std::vector<float> out(size_t(rows) * k), dF(3L * rows, 0.f), dW(3L * k, 0.f), db(k, 0.f);
  bk_gate_forward<float>(out.data(), F.data(), W.data(), b.data(), rows, k);
  bk_gate_backward<float>(dF.data(), dW.data(), db.data(), dout.data(), out.data(), F.data(), W.data(), rows, k);

  // Elementwise (σ of a 3-term dot product): 1e-6 of the scale. dW, db: sums over rows of s = dout·σ'(·)
  // (times F, |F| ≤ 1); bound 1e-5·Σ_rows |s| (fp32 summation error ≤ rows·ε·Σ|s| in the worst case,
  // ~√rows·ε typical; measured fp32-vs-fp64 ≤ 1e-7·Σ|s|).
  double S = 0;
  for (size_t i = 0; i < out.size(); ++i) S += std::abs(dout[i] * out[i] * (1 - out[i]));
  DeviceBuffer<float> gF(F), gW(W), gb(b), gout(nans(out.size())), gdout(dout);
  cuda::bk_gate_forward(gout.get(), gF.get(), gW.get(), gb.get(), rows, k);
  expect_close_to_reference(gout.download(), out, 1e-6, 1e-6, "out");
  const auto dF0 = accumulation_start(dF), dW0 = accumulation_start(dW), db0 = accumulation_start(db);
  DeviceBuffer<float> gdF(dF0), gdW(dW0), gdb(db0), sout(out);
  DeviceBuffer<float> workspace(nans(cuda::bk_gate_backward_workspace_floats(rows, k)));
  cuda::bk_gate_backward(gdF.get(), gdW.get(), gdb.get(), gdout.get(), sout.get(), gF.get(), gW.get(), rows, k,
                         workspace.get());
  expect_accumulated(gdF.download(), dF0, dF, 1e-6 * max_abs(dF), "dF");
  expect_accumulated(gdW.download(), dW0, dW, 1e-5 * S, "dW");
  expect_accumulated(gdb.download(), db0, db, 1e-5 * S, "db");
}

}  // namespace

TEST(bk_cuda, causal_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (double eta : {0.05, 0.2, 1.0})
    for (bool hopping : {true, false})
      for (auto [B, N] : {std::pair{1, 1}, std::pair{3, 37}, std::pair{2, 64}, std::pair{4, 1024}})
        check_causal({B, N, hopping, eta, true});
  // Scalars not requested: null dE0/deta and a null workspace.
  check_causal({3, 37, true, 0.2, false});
}

TEST(bk_cuda, features_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (double eta : {0.05, 0.2, 1.0})
    for (int rows : {1, 37, 4096}) {
      SCOPED_TRACE("features rows " + std::to_string(rows) + ", eta " + std::to_string(eta));
      Rng rng(rows + int(eta * 100));
      // g from the pointwise resolvent (|g| ≤ 1/η, as in the model).
      std::vector<float> a(rows), g(2L * rows);
      for (float& x : a) x = float(1 + cap(2.0 * rng.normal(), 5.0));
      bk_causal_forward<float>(g.data(), a.data(), nullptr, 0.3f, float(eta), 1, rows);
      const auto dF = random_normal<float>(3L * rows, rng);
      std::vector<float> F(3L * rows), dg(2L * rows, 0.f), deta(1, 0.f);
      bk_features_forward<float>(F.data(), g.data(), float(eta), rows);
      bk_features_backward<float>(dg.data(), deta.data(), dF.data(), g.data(), float(eta), rows);
      // F and dg: a few roundings per element (1e-6 of the scale). deta: a sum over rows of
      // dF·(Re g, Im g, |g|); bound 1e-5·Σ|terms| (see check_gate).
      double S = 0;
      for (int r = 0; r < rows; ++r)
        S += std::abs(dF[3L * r] * g[2L * r]) + std::abs(dF[3L * r + 1] * g[2L * r + 1]) +
             std::abs(dF[3L * r + 2] * std::hypot(g[2L * r], g[2L * r + 1]));
      DeviceBuffer<float> gg(g), gF(nans(F.size())), gdF(dF);
      cuda::bk_features_forward(gF.get(), gg.get(), float(eta), rows);
      expect_close_to_reference(gF.download(), F, 1e-6 * max_abs(F), 1e-6, "F");
      const auto dg0 = accumulation_start(dg), deta0 = accumulation_start(deta);
      DeviceBuffer<float> gdg(dg0), gdeta(deta0);
      DeviceBuffer<float> workspace(nans(cuda::bk_features_backward_workspace_floats(rows)));
      cuda::bk_features_backward(gdg.get(), gdeta.get(), gdF.get(), gg.get(), float(eta), rows, workspace.get());
      expect_accumulated(gdg.download(), dg0, dg, 1e-6 * max_abs(dg), "dg");
      expect_accumulated(gdeta.download(), deta0, deta, 1e-5 * S, "deta");
    }
}

TEST(bk_cuda, layer_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (double eta : {0.05, 0.2, 1.0})
    for (bool hopping : {true, false}) {
      check_layer({1, 1, 37, hopping, eta, true, true});
      check_layer({2, 37, 37, hopping, eta, true, false});
      check_layer({3, 40, 64, hopping, eta, false, true});
      check_layer({4, 1024, 512, hopping, eta, true, true});
    }
}

TEST(bk_cuda, gate_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (int rows : {1, 37, 4096})
    for (int k : {1, 3, 8}) check_gate(rows, k);
}

// The parameter and scalar gradients are two-stage reductions in a fixed order: two runs agree bit for bit.
TEST(bk_cuda, layer_backward_is_deterministic) {
  MUSE_REQUIRE_GPU();
  const int B = 4, N = 1024, D = 512, rows = B * N;
  Rng rng(77);
  auto u = random_normal<float>(size_t(rows) * D, rng);
  auto w_v = random_normal<float>(D, rng, 1.5 / std::sqrt(D)), w_J = random_normal<float>(2 * D, rng, 1.0 / std::sqrt(D));
  std::vector<float> b_v{0.2f}, b_J{0.1f}, eps_p{0.f}, E0{0.3f};
  auto dg = random_normal<float>(2L * rows, rng), dF = random_normal<float>(3L * rows, rng);
  DeviceBuffer<float> gu(u), gw_v(w_v), gb_v(b_v), gw_J(w_J), gb_J(b_J), geps(eps_p), gE0(E0), gdg(dg), gdF(dF);
  BkParams<float> params{gw_v.get(), gb_v.get(), gw_J.get(), gb_J.get(), geps.get(), gE0.get()};
  DeviceBuffer<float> g(2L * rows), F(3L * rows), v(rows), J(rows), J2(rows);
  const BkSaved<float> saved{v.get(), J.get(), J2.get()};
  cuda::bk_layer_forward(g.get(), F.get(), saved, gu.get(), params, true, B, N, D);
  DeviceBuffer<float> workspace(cuda::bk_layer_backward_workspace_floats(B, N, D));
  std::vector<std::vector<float>> runs;
  for (int run = 0; run < 2; ++run) {
    DeviceBuffer<float> dw_v(std::vector<float>(D, 0.f)), db_v(std::vector<float>(1, 0.f)),
        dw_J(std::vector<float>(2 * D, 0.f)), db_J(std::vector<float>(1, 0.f)), deps(std::vector<float>(1, 0.f)),
        dE0(std::vector<float>(1, 0.f));
    const BkGrads<float> grads{dw_v.get(), db_v.get(), dw_J.get(), db_J.get(), deps.get(), dE0.get()};
    cuda::bk_layer_backward(nullptr, grads, gdg.get(), gdF.get(), gu.get(), g.get(), saved, params, true, B, N, D,
                            workspace.get());
    std::vector<float> all = dw_v.download();
    for (auto* buf : {&db_v, &dw_J, &db_J, &deps, &dE0}) {
      const auto h = buf->download();
      all.insert(all.end(), h.begin(), h.end());
    }
    runs.push_back(all);
  }
  EXPECT_EQ(runs[0], runs[1]);
}

}  // namespace muse::test
