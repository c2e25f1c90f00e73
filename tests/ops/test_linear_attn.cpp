#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "ops/linear_attn.h"
#include "support/gradcheck.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

struct Shape {
  int B, N, H, dh;
  int D() const { return H * dh; }
  size_t tokens() const { return size_t(B) * N; }
};

struct Inputs {
  std::vector<double> q, k, v, mu;  // mu empty: no gate
  const double* gate() const { return mu.empty() ? nullptr : mu.data(); }
};

// q and k with std 2 put x/√d_h on both sides of ELU's kink; the gate stays well inside (0, 1).
Inputs draw_inputs(const Shape& s, Rng& rng, bool gated) {
  Inputs in;
  in.q = random_normal(s.tokens() * s.D(), rng, 2.0);
  in.k = random_normal(s.tokens() * s.D(), rng, 2.0);
  in.v = random_normal(s.tokens() * s.D(), rng);
  if (gated) in.mu = random_uniform(s.tokens() * s.H, rng, 0.2, 0.95);
  return in;
}

double phi(double x, int dh) {
  const double u = x / std::sqrt(double(dh));
  return u > 0 ? u + 1 : std::exp(u);
}

// Plain O(N²) reference: o_i = Σ_{j≤i} w_ij v_j / max(Σ_{j≤i} w_ij, 1e-6), w_ij = μ_j·φ(k_j)·φ(q_i).
// Also returns the unclamped denominators Σ_{j≤i} w_ij [B, N, H].
std::vector<double> reference_forward(const Inputs& in, const Shape& s, std::vector<double>* denominators = nullptr) {
  const int D = s.D();
  std::vector<double> o(s.tokens() * D, 0.0);
  if (denominators) denominators->assign(s.tokens() * s.H, 0.0);
  for (int b = 0; b < s.B; ++b)
    for (int h = 0; h < s.H; ++h)
      for (int i = 0; i < s.N; ++i) {
        const size_t qi = (size_t(b) * s.N + i) * D + h * s.dh;
        std::vector<double> numerator(s.dh, 0.0);
        double denominator = 0;
        for (int j = 0; j <= i; ++j) {
          const size_t kj = (size_t(b) * s.N + j) * D + h * s.dh;
          const double gate = in.mu.empty() ? 1.0 : in.mu[(size_t(b) * s.N + j) * s.H + h];
          double w = 0;
          for (int r = 0; r < s.dh; ++r) w += gate * phi(in.k[kj + r], s.dh) * phi(in.q[qi + r], s.dh);
          for (int c = 0; c < s.dh; ++c) numerator[c] += w * in.v[kj + c];
          denominator += w;
        }
        for (int c = 0; c < s.dh; ++c) o[qi + c] = numerator[c] / std::max(denominator, 1e-6);
        if (denominators) (*denominators)[(size_t(b) * s.N + i) * s.H + h] = denominator;
      }
  return o;
}

template <typename T>
std::vector<T> run_forward(const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
                           const std::vector<T>& mu, const Shape& s, std::vector<T>* zeta_out = nullptr) {
  std::vector<T> o(q.size()), zeta(s.tokens() * s.H);
  linear_attn_forward<T>(o.data(), zeta.data(), nullptr, nullptr, q.data(), k.data(), v.data(),
                         mu.empty() ? nullptr : mu.data(), s.B, s.N, s.D(), s.H);
  if (zeta_out) *zeta_out = zeta;
  return o;
}

struct Grads {
  std::vector<double> q, k, v, mu;
};

Grads run_backward(const Inputs& in, const Shape& s, const std::vector<double>& d_o) {
  std::vector<double> zeta;
  run_forward(in.q, in.k, in.v, in.mu, s, &zeta);
  Grads g{std::vector<double>(in.q.size()), std::vector<double>(in.k.size()), std::vector<double>(in.v.size()),
          std::vector<double>(in.mu.size())};
  linear_attn_backward<double>(g.q.data(), g.k.data(), g.v.data(), in.mu.empty() ? nullptr : g.mu.data(), d_o.data(),
                               zeta.data(), in.q.data(), in.k.data(), in.v.data(), in.gate(), s.B, s.N, s.D(), s.H);
  return g;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

}  // namespace

TEST(linear_attn_forward, matches_naive_reference_with_gate) {
  Rng rng(71);
  const Shape s{2, 13, 3, 5};
  const Inputs in = draw_inputs(s, rng, true);
  std::vector<double> zeta, reference_zeta;
  const auto o = run_forward(in.q, in.k, in.v, in.mu, s, &zeta);
  const auto reference = reference_forward(in, s, &reference_zeta);
  EXPECT_LT(max_abs_diff(o, reference), 1e-12);
  EXPECT_LT(max_abs_diff(zeta, reference_zeta), 1e-11);
}

TEST(linear_attn_forward, matches_naive_reference_without_gate) {
  Rng rng(72);
  const Shape s{2, 13, 3, 5};
  const Inputs in = draw_inputs(s, rng, false);
  const auto o = run_forward(in.q, in.k, in.v, in.mu, s);
  EXPECT_LT(max_abs_diff(o, reference_forward(in, s)), 1e-12);
  // The gate must matter: a constant gate of 0.5 on half the keys changes the result.
  Inputs gated = in;
  gated.mu.assign(s.tokens() * s.H, 1.0);
  for (size_t i = 0; i < gated.mu.size(); i += 2) gated.mu[i] = 0.5;
  EXPECT_GT(max_abs_diff(run_forward(gated.q, gated.k, gated.v, gated.mu, s), o), 1e-3);
}

// With μ = 1e-9 every denominator z_iᵀφ(q_i) falls below the 1e-6 floor: the output is S_iᵀφ(q_i)/1e-6,
// finite, and the backward stays finite too.
TEST(linear_attn_forward, clamp_branch_is_finite) {
  Rng rng(73);
  const Shape s{2, 13, 3, 5};
  Inputs in = draw_inputs(s, rng, true);
  in.mu.assign(in.mu.size(), 1e-9);
  std::vector<double> zeta;
  const auto o = run_forward(in.q, in.k, in.v, in.mu, s, &zeta);
  for (double x : zeta) ASSERT_LT(x, 1e-6);  // the branch under test is really taken
  for (double x : o) ASSERT_TRUE(std::isfinite(x));
  EXPECT_LT(max_abs_diff(o, reference_forward(in, s)), 1e-12);
  const Grads g = run_backward(in, s, random_normal(o.size(), rng));
  for (const auto* grad : {&g.q, &g.k, &g.v, &g.mu})
    for (double x : *grad) ASSERT_TRUE(std::isfinite(x));

  std::vector<float> of(o.size()), zf(zeta.size());
  const auto qf = convert<float>(in.q), kf = convert<float>(in.k), vf = convert<float>(in.v),
             mf = convert<float>(in.mu);
  linear_attn_forward<float>(of.data(), zf.data(), nullptr, nullptr, qf.data(), kf.data(), vf.data(), mf.data(), s.B,
                             s.N, s.D(), s.H);
  for (float x : of) ASSERT_TRUE(std::isfinite(x));
}

TEST(linear_attn_forward, float_matches_double) {
  Rng rng(74);
  const Shape s{2, 256, 4, 16};
  const Inputs in = draw_inputs(s, rng, true);
  std::vector<double> zeta_d;
  const auto od = run_forward(in.q, in.k, in.v, in.mu, s, &zeta_d);
  std::vector<float> zeta_f;
  const auto qf = convert<float>(in.q), kf = convert<float>(in.k), vf = convert<float>(in.v),
             mf = convert<float>(in.mu);
  const auto of = run_forward(qf, kf, vf, mf, s, &zeta_f);
  // o_i is a convex combination of the v_j (|v| ≲ 4); measured max error 4e-7, tolerance 5e-6.
  for (size_t i = 0; i < od.size(); ++i) ASSERT_NEAR(of[i], od[i], 5e-6) << i;

  const auto d_o = random_normal(od.size(), rng);
  const Grads gd = run_backward(in, s, d_o);
  const auto dof = convert<float>(d_o);
  std::vector<float> dq(qf.size()), dk(kf.size()), dv(vf.size()), dmu(mf.size());
  linear_attn_backward<float>(dq.data(), dk.data(), dv.data(), dmu.data(), dof.data(), zeta_f.data(), qf.data(),
                              kf.data(), vf.data(), mf.data(), s.B, s.N, s.D(), s.H);
  // Against the largest entry of each gradient: measured max error 4e-7 of it, tolerance 1e-5.
  auto expect_close = [](const std::vector<float>& f, const std::vector<double>& d, const char* what) {
    double scale = 0;
    for (double x : d) scale = std::max(scale, std::abs(x));
    for (size_t i = 0; i < d.size(); ++i) ASSERT_NEAR(f[i], d[i], 1e-5 * scale) << what << " " << i;
  };
  expect_close(dq, gd.q, "dq");
  expect_close(dk, gd.k, "dk");
  expect_close(dv, gd.v, "dv");
  expect_close(dmu, gd.mu, "dmu");
}

template <typename T>
void check_causality(const char* type_name) {
  Rng rng(75);
  const Shape s{2, 9, 2, 3};
  const Inputs in = draw_inputs(s, rng, true);
  const auto q = convert<T>(in.q), k = convert<T>(in.k), v = convert<T>(in.v), mu = convert<T>(in.mu);
  using Op = std::function<std::vector<T>(const std::vector<T>&)>;
  const std::string what = std::string(type_name) + " perturbing ";
  expect_causal<T>(Op([&](const std::vector<T>& x) { return run_forward(x, k, v, mu, s); }), q, s.B, s.N, s.D(),
                   s.D(), what + "q");
  expect_causal<T>(Op([&](const std::vector<T>& x) { return run_forward(q, x, v, mu, s); }), k, s.B, s.N, s.D(),
                   s.D(), what + "k");
  expect_causal<T>(Op([&](const std::vector<T>& x) { return run_forward(q, k, x, mu, s); }), v, s.B, s.N, s.D(),
                   s.D(), what + "v");
  expect_causal<T>(Op([&](const std::vector<T>& x) { return run_forward(q, k, v, x, s); }), mu, s.B, s.N, s.H,
                   s.D(), what + "mu");
}

TEST(linear_attn_causal, float_q_k_v_mu) { check_causality<float>("float"); }
TEST(linear_attn_causal, double_q_k_v_mu) { check_causality<double>("double"); }

TEST(linear_attn_grad, q_k_v_mu) {
  Rng rng(76);
  const Shape s{2, 7, 3, 5};
  Inputs in = draw_inputs(s, rng, true);
  const auto w = random_normal(s.tokens() * s.D(), rng);
  const Grads g = run_backward(in, s, w);
  auto loss = [&] { return weighted_sum(run_forward(in.q, in.k, in.v, in.mu, s), w); };
  expect_gradients_match(loss, {{"q", &in.q, &g.q}, {"k", &in.k, &g.k}, {"v", &in.v, &g.v}, {"mu", &in.mu, &g.mu}});
}

TEST(linear_attn_grad, q_k_v_without_gate) {
  Rng rng(77);
  const Shape s{1, 8, 2, 4};
  Inputs in = draw_inputs(s, rng, false);
  const auto w = random_normal(s.tokens() * s.D(), rng);
  const Grads g = run_backward(in, s, w);
  auto loss = [&] { return weighted_sum(run_forward(in.q, in.k, in.v, in.mu, s), w); };
  expect_gradients_match(loss, {{"q", &in.q, &g.q}, {"k", &in.k, &g.k}, {"v", &in.v, &g.v}});
}

// Keys of the first 4 positions are gated by 1e-9, so their queries sit on the clamp side (denominator
// ~1e-8, far below 1e-6) while later queries see ungated keys (denominator ~1): both branches of the max
// in one check, each far from the kink. μ itself is left out: a 1e-6 step on a 1e-9 gate crosses it.
TEST(linear_attn_grad, q_k_v_across_the_clamp) {
  Rng rng(78);
  const Shape s{2, 9, 2, 4};
  Inputs in = draw_inputs(s, rng, true);
  for (int b = 0; b < s.B; ++b)
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < s.H; ++h) in.mu[(size_t(b) * s.N + i) * s.H + h] = 1e-9;
  std::vector<double> zeta;
  run_forward(in.q, in.k, in.v, in.mu, s, &zeta);
  for (int b = 0; b < s.B; ++b)
    for (int i = 0; i < s.N; ++i)
      for (int h = 0; h < s.H; ++h) {
        const double x = zeta[(size_t(b) * s.N + i) * s.H + h];
        if (i < 4) ASSERT_LT(x, 1e-7);
        else ASSERT_GT(x, 1e-2);
      }
  const auto w = random_normal(s.tokens() * s.D(), rng);
  const Grads g = run_backward(in, s, w);
  auto loss = [&] { return weighted_sum(run_forward(in.q, in.k, in.v, in.mu, s), w); };
  expect_gradients_match(loss, {{"q", &in.q, &g.q}, {"k", &in.k, &g.k}, {"v", &in.v, &g.v}});
}

// The backward adds into what the gradient buffers hold, and a null pointer skips that gradient without
// changing the others.
TEST(linear_attn_grad, accumulates_and_skips_null) {
  Rng rng(79);
  const Shape s{1, 6, 2, 3};
  const Inputs in = draw_inputs(s, rng, true);
  const auto d_o = random_normal(s.tokens() * s.D(), rng);
  const Grads once = run_backward(in, s, d_o);
  std::vector<double> zeta;
  run_forward(in.q, in.k, in.v, in.mu, s, &zeta);
  std::vector<double> dq = once.q, dmu = once.mu;
  linear_attn_backward<double>(dq.data(), nullptr, nullptr, dmu.data(), d_o.data(), zeta.data(), in.q.data(),
                               in.k.data(), in.v.data(), in.mu.data(), s.B, s.N, s.D(), s.H);
  for (size_t i = 0; i < dq.size(); ++i) EXPECT_NEAR(dq[i], 2 * once.q[i], 1e-13);
  for (size_t i = 0; i < dmu.size(); ++i) EXPECT_NEAR(dmu[i], 2 * once.mu[i], 1e-13);
  std::vector<double> dv(in.v.size(), 0.0);
  linear_attn_backward<double>(nullptr, nullptr, dv.data(), nullptr, d_o.data(), zeta.data(), in.q.data(),
                               in.k.data(), in.v.data(), in.mu.data(), s.B, s.N, s.D(), s.H);
  EXPECT_EQ(dv, once.v);
}

// Token-by-token decode from a zero state reproduces the parallel forward; so does decoding after a
// forward "prefill" of the first P tokens that hands over its final state.
TEST(linear_attn_decode, token_by_token_matches_forward) {
  Rng rng(80);
  const Shape s{2, 11, 3, 5};
  const int D = s.D(), dh = s.dh, P = 4;
  const Inputs in = draw_inputs(s, rng, true);
  const auto o = run_forward(in.q, in.k, in.v, in.mu, s);

  // Prefill: the forward over the first P tokens of every batch row, keeping its final state.
  const Shape prefix{s.B, P, s.H, dh};
  std::vector<double> pq, pk, pv, pmu;
  for (int b = 0; b < s.B; ++b) {
    const size_t row = size_t(b) * s.N;
    pq.insert(pq.end(), in.q.begin() + row * D, in.q.begin() + (row + P) * D);
    pk.insert(pk.end(), in.k.begin() + row * D, in.k.begin() + (row + P) * D);
    pv.insert(pv.end(), in.v.begin() + row * D, in.v.begin() + (row + P) * D);
    pmu.insert(pmu.end(), in.mu.begin() + row * s.H, in.mu.begin() + (row + P) * s.H);
  }
  std::vector<double> po(pq.size()), pzeta(size_t(s.B) * P * s.H), final_S(size_t(s.B) * s.H * dh * dh),
      final_z(size_t(s.B) * s.H * dh);
  linear_attn_forward<double>(po.data(), pzeta.data(), final_S.data(), final_z.data(), pq.data(), pk.data(), pv.data(),
                              pmu.data(), prefix.B, prefix.N, D, s.H);

  for (int b = 0; b < s.B; ++b) {
    const size_t state_S = size_t(s.H) * dh * dh, state_z = size_t(s.H) * dh;
    std::vector<double> S(state_S, 0.0), z(state_z, 0.0);
    std::vector<double> S_after(final_S.begin() + b * state_S, final_S.begin() + (b + 1) * state_S);
    std::vector<double> z_after(final_z.begin() + b * state_z, final_z.begin() + (b + 1) * state_z);
    std::vector<double> step(D);
    for (int i = 0; i < s.N; ++i) {
      const size_t row = size_t(b) * s.N + i;
      const double *q = &in.q[row * D], *k = &in.k[row * D], *v = &in.v[row * D], *mu = &in.mu[row * s.H];
      linear_attn_decode_step<double>(step.data(), S.data(), z.data(), q, k, v, mu, D, s.H);
      for (int c = 0; c < D; ++c) ASSERT_NEAR(step[c], o[row * D + c], 1e-12) << "b " << b << " i " << i;
      if (i < P) continue;
      linear_attn_decode_step<double>(step.data(), S_after.data(), z_after.data(), q, k, v, mu, D, s.H);
      for (int c = 0; c < D; ++c) ASSERT_NEAR(step[c], o[row * D + c], 1e-12) << "after prefill, b " << b << " i " << i;
    }
  }
}

}  // namespace muse::test
