#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "ops/ssm.h"
#include "support/gradcheck.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

double sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <typename T>
struct Weights {
  std::vector<T> conv, W1, b1, W2, b2, WU, WV, WO, bO, ell, r_w1, r_b1, r_w2, r_b2, w_pi, b_pi;

  SsmParams<T> params() const {
    SsmParams<T> p;
    p.conv = conv.data();
    p.W1 = W1.data();
    p.b1 = b1.data();
    p.W2 = W2.data();
    p.b2 = b2.data();
    p.WU = WU.data();
    p.WV = WV.data();
    p.WO = WO.data();
    p.bO = bO.data();
    p.ell = ell.data();
    p.r_w1 = r_w1.data();
    p.r_b1 = r_b1.data();
    p.r_w2 = r_w2.data();
    p.r_b2 = r_b2.data();
    p.w_pi = w_pi.data();
    p.b_pi = b_pi.data();
    return p;
  }

  SsmGrads<T> grads() {
    SsmGrads<T> g;
    g.conv = conv.data();
    g.W1 = W1.data();
    g.b1 = b1.data();
    g.W2 = W2.data();
    g.b2 = b2.data();
    g.WU = WU.data();
    g.WV = WV.data();
    g.WO = WO.data();
    g.bO = bO.data();
    g.ell = ell.data();
    g.r_w1 = r_w1.data();
    g.r_b1 = r_b1.data();
    g.r_w2 = r_w2.data();
    g.r_b2 = r_b2.data();
    g.w_pi = w_pi.data();
    g.b_pi = b_pi.data();
    return g;
  }
};

Weights<double> zeros_like(const Weights<double>& w) {
  auto z = [](const std::vector<double>& v) { return std::vector<double>(v.size(), 0.0); };
  return {z(w.conv), z(w.W1), z(w.b1),   z(w.W2),   z(w.b2),   z(w.WU),   z(w.WV),   z(w.WO),
          z(w.bO),   z(w.ell), z(w.r_w1), z(w.r_b1), z(w.r_w2), z(w.r_b2), z(w.w_pi), z(w.b_pi)};
}

// Weights at scales that keep every stage O(1) and away from saturation, so the checks see each term:
// λ ≈ 0.5–0.9, a rank mask that varies across tokens and channels.
Weights<double> random_weights(const SsmConfig& c, Rng& rng) {
  const int D = c.D, H = c.gate_hidden(), R = c.R, K = kSsmRankHidden;
  Weights<double> w;
  w.conv = random_normal(3 * D, rng, 0.5);
  w.W1 = random_normal(H * D, rng, 1.0 / std::sqrt(D));
  w.b1 = random_normal(H, rng, 0.3);
  w.W2 = random_normal(R * H, rng, 1.0 / std::sqrt(H));
  w.b2 = random_normal(R, rng, 0.3);
  w.WU = random_normal(R * D, rng, 1.0 / std::sqrt(D));
  w.WV = random_normal(R * D, rng, 1.0 / std::sqrt(D));
  w.WO = random_normal(D * R, rng, 1.0 / std::sqrt(R));
  w.bO = random_normal(D, rng, 0.1);
  w.ell = random_normal(R, rng, 0.7, 1.0);
  w.r_w1 = random_normal(K, rng, 1.0);
  w.r_b1 = random_normal(K, rng, 0.5);
  w.r_w2 = random_normal(K, rng, 0.5);
  w.r_b2 = random_normal(1, rng, 0.3);
  w.w_pi = random_normal(3, rng, 1.0);
  w.b_pi = {0.5};
  return w;
}

template <typename T>
Weights<T> convert_weights(const Weights<double>& w) {
  return {convert<T>(w.conv), convert<T>(w.W1), convert<T>(w.b1),   convert<T>(w.W2),
          convert<T>(w.b2),   convert<T>(w.WU), convert<T>(w.WV),   convert<T>(w.WO),
          convert<T>(w.bO),   convert<T>(w.ell), convert<T>(w.r_w1), convert<T>(w.r_b1),
          convert<T>(w.r_w2), convert<T>(w.r_b2), convert<T>(w.w_pi), convert<T>(w.b_pi)};
}

struct Inputs {
  std::vector<double> u, delta, F;
};

Inputs random_inputs(const SsmConfig& c, Rng& rng) {
  const int rows = c.B * c.N;
  return {random_normal(rows * c.D, rng), random_uniform(rows, rng, 0.3, 3.0),
          random_uniform(rows * 3, rng, -1.0, 1.0)};
}

template <typename T>
std::vector<T> run_forward(const SsmConfig& c, const std::vector<T>& u, const std::vector<T>& delta,
                           const std::vector<T>& F, const Weights<T>& w, SsmSaved<T>* saved_out = nullptr) {
  std::vector<T> y((size_t)c.B * c.N * c.D);
  SsmSaved<T> saved;
  ssm_forward(y.data(), saved, u.data(), delta.data(), F.data(), w.params(), c);
  if (saved_out) *saved_out = saved;
  return y;
}

// The op written out token by token, with explicit matrix-vector loops and its own sigmoid and GELU.
std::vector<double> naive_ssm(const SsmConfig& c, const Inputs& in, const Weights<double>& w) {
  const int B = c.B, N = c.N, D = c.D, H = c.gate_hidden(), R = c.R, K = kSsmRankHidden;
  std::vector<double> y((size_t)B * N * D);
  for (int b = 0; b < B; ++b) {
    std::vector<double> S(R, 0.0);
    for (int t = 0; t < N; ++t) {
      const size_t row = (size_t)b * N + t;
      auto u_at = [&](int s, int d) { return s >= 0 ? in.u[((size_t)b * N + s) * D + d] : 0.0; };
      std::vector<double> hid(H), chi(R), m(R, 1.0), p(R), q(R);
      for (int k = 0; k < H; ++k) {
        double s = w.b1[k];
        for (int d = 0; d < D; ++d) s += w.W1[k * D + d] * u_at(t, d);
        hid[k] = std::max(s, 0.0);
      }
      for (int r = 0; r < R; ++r) {
        double s = w.b2[r];
        for (int k = 0; k < H; ++k) s += w.W2[r * H + k] * hid[k];
        chi[r] = sig(s);
      }
      if (c.decay && c.rank_mask) {
        double mlp = w.r_b2[0];
        for (int k = 0; k < K; ++k) {
          const double h = w.r_w1[k] * in.delta[row] + w.r_b1[k];
          mlp += w.r_w2[k] * 0.5 * h * (1.0 + std::erf(h / std::sqrt(2.0)));
        }
        double z = w.b_pi[0];
        for (int i = 0; i < 3; ++i) z += w.w_pi[i] * in.F[row * 3 + i];
        const double omega = sig(mlp) * sig(z);
        for (int r = 0; r < R; ++r) m[r] = sig(4.0 * (4.0 + omega * (R - 4.0) - r - 0.5));
      }
      for (int r = 0; r < R; ++r) {
        double a = 0, v = 0;
        for (int d = 0; d < D; ++d) {
          a += w.WU[r * D + d] * u_at(t, d);
          v += w.WV[r * D + d] * u_at(t, d);
        }
        p[r] = a * chi[r] * m[r];
        q[r] = v * chi[r] * m[r];
        const double lambda = sig(w.ell[r]);
        S[r] = c.decay ? lambda * S[r] + (1.0 - lambda) * p[r] : S[r] + p[r];
      }
      for (int d = 0; d < D; ++d) {
        double s = w.bO[d] + w.conv[d] * u_at(t - 2, d) + w.conv[D + d] * u_at(t - 1, d) +
                   w.conv[2 * D + d] * u_at(t, d);
        for (int r = 0; r < R; ++r) s += w.WO[d * R + r] * S[r] * q[r];
        y[row * D + d] = s;
      }
    }
  }
  return y;
}

SsmConfig config(int B, int N, int D, int R, bool decay, bool rank_mask) {
  SsmConfig c;
  c.B = B;
  c.N = N;
  c.D = D;
  c.R = R;
  c.decay = decay;
  c.rank_mask = rank_mask;
  return c;
}

const SsmConfig kPhase8Mask = config(2, 7, 8, 6, true, true);
const SsmConfig kPhase8NoMask = config(2, 7, 8, 6, true, false);
const SsmConfig kPhase7 = config(2, 7, 8, 6, false, false);

}  // namespace

// ---- pieces ------------------------------------------------------------------------------------------

TEST(ssm_scan, matches_explicit_sums) {
  Rng rng(1);
  const int B = 2, N = 9, R = 5;
  auto p = random_normal(B * N * R, rng), ell = random_normal(R, rng, 1.0, 1.0);
  std::vector<double> S_decay(p.size()), S_prefix(p.size());
  ssm_scan_forward(S_decay.data(), p.data(), ell.data(), B, N, R);
  ssm_scan_forward<double>(S_prefix.data(), p.data(), nullptr, B, N, R);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < N; ++t)
      for (int r = 0; r < R; ++r) {
        const double lambda = sig(ell[r]);
        double decayed = 0, plain = 0;  // S_t = Σ_{s≤t} λ^{t−s}(1−λ)p_s  and  Σ_{s≤t} p_s
        for (int s = 0; s <= t; ++s) {
          const double ps = p[((size_t)b * N + s) * R + r];
          decayed += std::pow(lambda, t - s) * (1.0 - lambda) * ps;
          plain += ps;
        }
        const size_t k = ((size_t)b * N + t) * R + r;
        EXPECT_NEAR(S_decay[k], decayed, 1e-13);
        EXPECT_NEAR(S_prefix[k], plain, 1e-13);
      }
}

TEST(ssm_conv, matches_loops) {
  Rng rng(2);
  const int B = 2, N = 5, D = 7;
  auto u = random_normal(B * N * D, rng), taps = random_normal(3 * D, rng);
  std::vector<double> y(u.size(), 123.0);  // the forward overwrites
  ssm_conv_forward(y.data(), u.data(), taps.data(), B, N, D);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < N; ++t)
      for (int d = 0; d < D; ++d) {
        double s = 0;
        for (int k = 0; k < 3; ++k) {
          const int src = t - 2 + k;
          if (src >= 0) s += taps[k * D + d] * u[((size_t)b * N + src) * D + d];
        }
        EXPECT_NEAR(y[((size_t)b * N + t) * D + d], s, 1e-14);
      }
}

TEST(ssm_grad, conv) {
  Rng rng(3);
  const int B = 2, N = 5, D = 7;
  auto u = random_normal(B * N * D, rng), taps = random_normal(3 * D, rng), w = random_normal(B * N * D, rng);
  auto loss = [&] {
    std::vector<double> y(u.size());
    ssm_conv_forward(y.data(), u.data(), taps.data(), B, N, D);
    return weighted_sum(y, w);
  };
  std::vector<double> du(u.size()), dtaps(taps.size());
  ssm_conv_backward(du.data(), dtaps.data(), w.data(), u.data(), taps.data(), B, N, D);
  expect_gradients_match(loss, {{"u", &u, &du}, {"taps", &taps, &dtaps}});
}

TEST(ssm_grad, scan_decay_and_prefix) {
  Rng rng(4);
  const int B = 3, N = 8, R = 4;
  auto p = random_normal(B * N * R, rng), ell = random_normal(R, rng, 1.0, 0.5), w = random_normal(B * N * R, rng);
  for (bool decay : {true, false}) {
    SCOPED_TRACE(decay ? "decay" : "prefix sum");
    const double* ell_or_null = decay ? ell.data() : nullptr;
    auto loss = [&] {
      std::vector<double> S(p.size());
      ssm_scan_forward(S.data(), p.data(), decay ? ell.data() : nullptr, B, N, R);
      return weighted_sum(S, w);
    };
    std::vector<double> S(p.size()), dp(p.size()), dell(R);
    ssm_scan_forward(S.data(), p.data(), ell_or_null, B, N, R);
    ssm_scan_backward(dp.data(), dell.data(), w.data(), S.data(), p.data(), ell_or_null, B, N, R);
    if (decay) {
      expect_gradients_match(loss, {{"p", &p, &dp}, {"ell", &ell, &dell}});
    } else {
      expect_gradients_match(loss, {{"p", &p, &dp}});
      for (double g : dell) EXPECT_EQ(g, 0.0);
    }
  }
}

TEST(ssm_grad, rank_mask) {
  Rng rng(5);
  const SsmConfig c = config(1, 9, 8, 7, true, true);
  const int rows = c.N;
  auto w = random_weights(c, rng);
  auto in = random_inputs(c, rng);
  auto wm = random_normal(rows * c.R, rng);
  auto mask = [&] {
    std::vector<double> m(rows * c.R);
    ssm_rank_mask_forward(m.data(), in.delta.data(), in.F.data(), w.params(), rows, c.R);
    return m;
  };
  auto loss = [&] { return weighted_sum(mask(), wm); };
  const auto m = mask();
  std::vector<double> ddelta(rows), dF(rows * 3);
  Weights<double> dw = zeros_like(w);
  ssm_rank_mask_backward(ddelta.data(), dF.data(), dw.grads(), wm.data(), m.data(), in.delta.data(), in.F.data(),
                         w.params(), rows, c.R);
  expect_gradients_match(loss, {{"delta", &in.delta, &ddelta}, {"F", &in.F, &dF}, {"r_w1", &w.r_w1, &dw.r_w1},
                                {"r_b1", &w.r_b1, &dw.r_b1}, {"r_w2", &w.r_w2, &dw.r_w2}, {"r_b2", &w.r_b2, &dw.r_b2},
                                {"w_pi", &w.w_pi, &dw.w_pi}, {"b_pi", &w.b_pi, &dw.b_pi}});
  // The mask backward touches only its own parameters.
  for (double v : dw.W1) EXPECT_EQ(v, 0.0);
}

// ---- the whole op ------------------------------------------------------------------------------------

TEST(ssm_forward, matches_naive_reference) {
  for (const SsmConfig& base : {kPhase8Mask, kPhase8NoMask, kPhase7}) {
    SsmConfig c = base;
    c.N = 11;
    c.D = 12;
    SCOPED_TRACE(c.decay ? (c.rank_mask ? "phase 8, rank mask" : "phase 8, no mask") : "phase 7");
    Rng rng(6);
    auto w = random_weights(c, rng);
    auto in = random_inputs(c, rng);
    const auto y = run_forward(c, in.u, in.delta, in.F, w);
    const auto ref = naive_ssm(c, in, w);
    double max_abs = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      EXPECT_NEAR(y[i], ref[i], 1e-12) << "at " << i;
      max_abs = std::max(max_abs, std::abs(ref[i]));
    }
    EXPECT_GT(max_abs, 0.1);  // a reference of zeros would prove nothing
  }
}

TEST(ssm_forward, mask_spreads_between_rank_min_and_R) {
  // ω → 1 switches on all R channels, ω → 0 leaves r_min; the effective rank follows the mask formula.
  const SsmConfig c = config(1, 4, 8, 12, true, true);
  Rng rng(7);
  auto w = random_weights(c, rng);
  auto in = random_inputs(c, rng);
  std::fill(w.r_w2.begin(), w.r_w2.end(), 0.0);
  std::fill(w.w_pi.begin(), w.w_pi.end(), 0.0);
  w.b_pi = {40.0};
  for (double omega : {1.0, 0.0}) {
    w.r_b2 = {omega > 0.5 ? 40.0 : -40.0};
    SsmSaved<double> saved;
    run_forward(c, in.u, in.delta, in.F, w, &saved);
    double expected = 0;
    for (int r = 0; r < c.R; ++r) expected += sig(4.0 * (kSsmRankMin + omega * (c.R - kSsmRankMin) - r - 0.5));
    EXPECT_NEAR(ssm_effective_rank(saved, c), expected, 1e-9);
    EXPECT_NEAR(expected, omega > 0.5 ? c.R : kSsmRankMin, 0.2);
  }
  SsmConfig off = c;
  off.rank_mask = false;
  SsmSaved<double> saved;
  run_forward(off, in.u, in.delta, in.F, w, &saved);
  EXPECT_EQ(ssm_effective_rank(saved, off), double(c.R));
}

// Largest |a − b| over the largest |b|.
template <typename T>
double relative_max_error(const std::vector<T>& a, const std::vector<double>& b) {
  double scale = 0, err = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    scale = std::max(scale, std::abs(b[i]));
    err = std::max(err, std::abs(double(a[i]) - b[i]));
  }
  return err / scale;
}

TEST(ssm_forward, float_matches_double) {
  // Realistic size (the `demo` widths: D = 128, R = 16), errors relative to each tensor's largest entry.
  // Measured: y 1.6e-7 (Phase 8) and 4.6e-7 (Phase 7, whose prefix-sum state grows with t); gradients
  // 1.4e-7 (du) to 3.8e-6 (r_w1, a sum of B·N terms of both signs). Tolerances 2e-6 and 2e-5 leave ~5×.
  for (bool decay : {true, false}) {
    const SsmConfig c = config(2, 256, 128, 16, decay, true);
    SCOPED_TRACE(decay ? "phase 8" : "phase 7");
    Rng rng(8);
    auto wd = random_weights(c, rng);
    auto in = random_inputs(c, rng);
    SsmSaved<double> saved_d;
    const auto yd = run_forward(c, in.u, in.delta, in.F, wd, &saved_d);
    auto wf = convert_weights<float>(wd);
    const auto uf = convert<float>(in.u), delta_f = convert<float>(in.delta), F_f = convert<float>(in.F);
    SsmSaved<float> saved_f;
    const auto yf = run_forward(c, uf, delta_f, F_f, wf, &saved_f);
    EXPECT_LT(relative_max_error(yf, yd), 2e-6);

    const auto dy = random_normal(yd.size(), rng);
    const auto dy_f = convert<float>(dy);
    Weights<double> gd = zeros_like(wd);
    Weights<float> gf = convert_weights<float>(gd);
    std::vector<double> du_d(in.u.size()), ddelta_d(in.delta.size()), dF_d(in.F.size());
    std::vector<float> du_f(in.u.size()), ddelta_f(in.delta.size()), dF_f(in.F.size());
    ssm_backward(du_d.data(), ddelta_d.data(), dF_d.data(), gd.grads(), dy.data(), in.u.data(), in.delta.data(),
                 in.F.data(), wd.params(), saved_d, c);
    ssm_backward(du_f.data(), ddelta_f.data(), dF_f.data(), gf.grads(), dy_f.data(), uf.data(), delta_f.data(),
                 F_f.data(), wf.params(), saved_f, c);
    EXPECT_LT(relative_max_error(du_f, du_d), 2e-5) << "du";
    EXPECT_LT(relative_max_error(gf.W1, gd.W1), 2e-5) << "W1";
    EXPECT_LT(relative_max_error(gf.WO, gd.WO), 2e-5) << "WO";
    EXPECT_LT(relative_max_error(gf.conv, gd.conv), 2e-5) << "conv";
    if (decay) {
      EXPECT_LT(relative_max_error(ddelta_f, ddelta_d), 2e-5) << "delta";
      EXPECT_LT(relative_max_error(dF_f, dF_d), 2e-5) << "F";
      EXPECT_LT(relative_max_error(gf.ell, gd.ell), 2e-5) << "ell";
      EXPECT_LT(relative_max_error(gf.r_w1, gd.r_w1), 2e-5) << "r_w1";
    }
  }
}

// ---- causality ---------------------------------------------------------------------------------------

template <typename T>
void check_causal(const SsmConfig& c, bool through_delta_and_F) {
  Rng rng(9);
  const auto w = convert_weights<T>(random_weights(c, rng));
  const auto in = random_inputs(c, rng);
  const auto u = convert<T>(in.u), delta = convert<T>(in.delta), F = convert<T>(in.F);
  expect_causal<T>([&](const std::vector<T>& x) { return run_forward(c, x, delta, F, w); }, u, c.B, c.N, c.D,
                   c.D, "u -> y");
  if (!through_delta_and_F) return;
  expect_causal<T>([&](const std::vector<T>& x) { return run_forward(c, u, x, F, w); }, delta, c.B, c.N, 1, c.D,
                   "delta -> y");
  expect_causal<T>([&](const std::vector<T>& x) { return run_forward(c, u, delta, x, w); }, F, c.B, c.N, 3, c.D,
                   "F -> y");
}

TEST(ssm_causal, phase8_rank_mask) {
  check_causal<double>(kPhase8Mask, true);
  check_causal<float>(kPhase8Mask, true);
}

TEST(ssm_causal, phase8_no_mask) {
  check_causal<double>(kPhase8NoMask, false);
  check_causal<float>(kPhase8NoMask, false);
}

TEST(ssm_causal, phase7) {
  check_causal<double>(kPhase7, false);
  check_causal<float>(kPhase7, false);
}

TEST(ssm_causal, without_mask_delta_and_F_are_ignored) {
  for (const SsmConfig& c : {kPhase8NoMask, kPhase7}) {
    Rng rng(10);
    const auto w = random_weights(c, rng);
    const auto in = random_inputs(c, rng);
    const auto y = run_forward(c, in.u, in.delta, in.F, w);
    std::vector<double> y_null(y.size());
    SsmSaved<double> saved;
    ssm_forward<double>(y_null.data(), saved, in.u.data(), nullptr, nullptr, w.params(), c);
    EXPECT_EQ(y, y_null);
  }
}

// ---- gradients ---------------------------------------------------------------------------------------

void check_all_gradients(const SsmConfig& c, uint64_t seed) {
  Rng rng(seed);
  auto w = random_weights(c, rng);
  auto in = random_inputs(c, rng);
  // Keep every ReLU pre-activation away from its kink (the checks step by 1e-6).
  const int rows = c.B * c.N, D = c.D, H = c.gate_hidden();
  for (int i = 0; i < rows; ++i)
    for (int k = 0; k < H; ++k) {
      double s = w.b1[k];
      for (int d = 0; d < D; ++d) s += w.W1[k * D + d] * in.u[(size_t)i * D + d];
      ASSERT_GT(std::abs(s), 1e-3) << "ReLU pre-activation near 0: pick another seed";
    }
  const auto wy = random_normal(rows * D, rng);
  auto loss = [&] { return weighted_sum(run_forward(c, in.u, in.delta, in.F, w), wy); };

  SsmSaved<double> saved;
  run_forward(c, in.u, in.delta, in.F, w, &saved);
  Weights<double> dw = zeros_like(w);
  const SsmGrads<double> g = dw.grads();
  std::vector<double> du(in.u.size()), ddelta(in.delta.size()), dF(in.F.size());
  ssm_backward(du.data(), ddelta.data(), dF.data(), g, wy.data(), in.u.data(), in.delta.data(), in.F.data(),
               w.params(), saved, c);

  std::vector<GradTensor> tensors = {{"u", &in.u, &du},      {"conv", &w.conv, &dw.conv}, {"W1", &w.W1, &dw.W1},
                                     {"b1", &w.b1, &dw.b1},  {"W2", &w.W2, &dw.W2},       {"b2", &w.b2, &dw.b2},
                                     {"WU", &w.WU, &dw.WU},  {"WV", &w.WV, &dw.WV},       {"WO", &w.WO, &dw.WO},
                                     {"bO", &w.bO, &dw.bO}};
  std::vector<GradTensor> mask_tensors = {{"delta", &in.delta, &ddelta}, {"F", &in.F, &dF},
                                          {"r_w1", &w.r_w1, &dw.r_w1},   {"r_b1", &w.r_b1, &dw.r_b1},
                                          {"r_w2", &w.r_w2, &dw.r_w2},   {"r_b2", &w.r_b2, &dw.r_b2},
                                          {"w_pi", &w.w_pi, &dw.w_pi},   {"b_pi", &w.b_pi, &dw.b_pi}};
  if (c.decay) tensors.push_back({"ell", &w.ell, &dw.ell});
  if (c.mask_on()) {
    tensors.insert(tensors.end(), mask_tensors.begin(), mask_tensors.end());
  } else {
    // y does not depend on them: nothing may be accumulated.
    for (const GradTensor& t : mask_tensors)
      for (double v : *t.grad) EXPECT_EQ(v, 0.0) << t.name;
  }
  if (!c.decay) {
    for (double v : dw.ell) EXPECT_EQ(v, 0.0) << "ell in Phase 7";
  }
  expect_gradients_match(loss, tensors);
}

TEST(ssm_grad, phase8_rank_mask) { check_all_gradients(kPhase8Mask, 11); }
TEST(ssm_grad, phase8_no_mask) { check_all_gradients(kPhase8NoMask, 12); }
TEST(ssm_grad, phase7) { check_all_gradients(kPhase7, 13); }

TEST(ssm_grad, backward_accumulates) {
  // Two backward calls into the same buffers give twice one call (the += contract).
  const SsmConfig c = kPhase8Mask;
  Rng rng(14);
  const auto w = random_weights(c, rng);
  const auto in = random_inputs(c, rng);
  const auto wy = random_normal(c.B * c.N * c.D, rng);
  SsmSaved<double> saved;
  run_forward(c, in.u, in.delta, in.F, w, &saved);
  std::vector<double> du1(in.u.size()), du2(in.u.size()), dell1(c.R), dell2(c.R), dF1(in.F.size()), dF2(in.F.size());
  SsmGrads<double> g1, g2;
  g1.ell = dell1.data();
  g2.ell = dell2.data();
  ssm_backward<double>(du1.data(), nullptr, dF1.data(), g1, wy.data(), in.u.data(), in.delta.data(), in.F.data(),
                       w.params(), saved, c);
  for (int k = 0; k < 2; ++k)
    ssm_backward<double>(du2.data(), nullptr, dF2.data(), g2, wy.data(), in.u.data(), in.delta.data(),
                         in.F.data(), w.params(), saved, c);
  for (size_t i = 0; i < du1.size(); ++i) EXPECT_NEAR(du2[i], 2 * du1[i], 1e-12 * std::abs(du1[i]));
  for (size_t i = 0; i < dF1.size(); ++i) EXPECT_NEAR(dF2[i], 2 * dF1[i], 1e-12 * std::abs(dF1[i]));
  for (int r = 0; r < c.R; ++r) EXPECT_NEAR(dell2[r], 2 * dell1[r], 1e-12 * std::abs(dell1[r]));
}

TEST(ssm_grad, piece_reductions_do_not_depend_on_thread_count) {
  // The conv taps, ℓ and rank-mask gradients are reductions this op does itself (the projections' go
  // through linear_backward): they must be bit-identical for any thread count, for bit-exact resumes.
  const SsmConfig c = config(3, 100, 130, 8, true, true);
  const int rows = c.B * c.N;
  Rng rng(16);
  const auto wd = random_weights(c, rng);
  const auto w = convert_weights<float>(wd), zero = convert_weights<float>(zeros_like(wd));
  const auto in = random_inputs(c, rng);
  const auto u = convert<float>(in.u), delta = convert<float>(in.delta), F = convert<float>(in.F);
  const auto dy = convert<float>(random_normal(rows * c.D, rng));
  const auto dS = convert<float>(random_normal(rows * c.R, rng));
  const auto p = convert<float>(random_normal(rows * c.R, rng));
  std::vector<float> S(p.size()), m(p.size());
  ssm_scan_forward(S.data(), p.data(), w.ell.data(), c.B, c.N, c.R);
  ssm_rank_mask_forward(m.data(), delta.data(), F.data(), w.params(), rows, c.R);
  auto gradients = [&](int threads) {
    const int saved_threads = omp_get_max_threads();
    omp_set_num_threads(threads);
    Weights<float> g = zero;
    std::vector<float> dp(p.size());
    ssm_conv_backward<float>(nullptr, g.conv.data(), dy.data(), u.data(), w.conv.data(), c.B, c.N, c.D);
    ssm_scan_backward(dp.data(), g.ell.data(), dS.data(), S.data(), p.data(), w.ell.data(), c.B, c.N, c.R);
    ssm_rank_mask_backward<float>(nullptr, nullptr, g.grads(), dS.data(), m.data(), delta.data(), F.data(),
                                  w.params(), rows, c.R);
    omp_set_num_threads(saved_threads);
    return g;
  };
  const auto one = gradients(1), three = gradients(3);
  EXPECT_EQ(one.conv, three.conv);
  EXPECT_EQ(one.ell, three.ell);
  EXPECT_EQ(one.r_w1, three.r_w1);
  EXPECT_EQ(one.r_w2, three.r_w2);
  EXPECT_EQ(one.w_pi, three.w_pi);
}

// ---- init --------------------------------------------------------------------------------------------

TEST(ssm_init, decay_logits_log_uniform_slowest_first) {
  const int R = 32;
  std::vector<double> ell(R);
  ssm_init_decay_logits(ell.data(), R);
  EXPECT_NEAR(1.0 - sig(ell[0]), 1e-3, 1e-15);
  EXPECT_NEAR(1.0 - sig(ell[R - 1]), 1e-1, 1e-14);
  const double step = std::log(10.0) * 2 / (R - 1);  // log(1e-1 / 1e-3) spread over R − 1 gaps
  for (int r = 1; r < R; ++r) {
    EXPECT_LT(ell[r], ell[r - 1]);  // λ decreases: channel 0 keeps the longest memory
    EXPECT_NEAR(std::log(sig(-ell[r])) - std::log(sig(-ell[r - 1])), step, 1e-12);
  }
  std::vector<float> ell_f(R);
  ssm_init_decay_logits(ell_f.data(), R);
  for (int r = 0; r < R; ++r) EXPECT_NEAR(ell_f[r], ell[r], 1e-6 * std::abs(ell[r]));
  double single = 0;
  ssm_init_decay_logits(&single, 1);
  EXPECT_NEAR(1.0 - sig(single), 1e-3, 1e-15);
}

// ---- decode ------------------------------------------------------------------------------------------

TEST(ssm_decode, matches_parallel_forward_token_by_token) {
  for (const SsmConfig& base : {kPhase8Mask, kPhase8NoMask, kPhase7}) {
    SsmConfig c = base;
    c.N = 9;
    SCOPED_TRACE(c.decay ? (c.rank_mask ? "phase 8, rank mask" : "phase 8, no mask") : "phase 7");
    Rng rng(15);
    const auto w = random_weights(c, rng);
    const auto in = random_inputs(c, rng);
    const auto y_full = run_forward(c, in.u, in.delta, in.F, w);
    const int B = c.B, N = c.N, D = c.D;
    for (int prompt : {0, 1, 2, 5}) {
      SCOPED_TRACE("prompt length " + std::to_string(prompt));
      SsmDecodeState<double> state;
      if (prompt == 0) {
        ssm_decode_reset(state, B, D, c.R);
      } else {
        SsmConfig pc = c;
        pc.N = prompt;
        std::vector<double> u_p, delta_p, F_p;
        for (int b = 0; b < B; ++b) {
          const size_t row0 = (size_t)b * N;
          u_p.insert(u_p.end(), in.u.begin() + row0 * D, in.u.begin() + (row0 + prompt) * D);
          delta_p.insert(delta_p.end(), in.delta.begin() + row0, in.delta.begin() + row0 + prompt);
          F_p.insert(F_p.end(), in.F.begin() + row0 * 3, in.F.begin() + (row0 + prompt) * 3);
        }
        SsmSaved<double> saved;
        run_forward(pc, u_p, delta_p, F_p, w, &saved);
        ssm_decode_prefill(state, u_p.data(), saved, pc);
      }
      for (int t = prompt; t < N; ++t) {
        std::vector<double> u_t, delta_t, F_t, y_t(B * D);
        for (int b = 0; b < B; ++b) {
          const size_t row = (size_t)b * N + t;
          u_t.insert(u_t.end(), in.u.begin() + row * D, in.u.begin() + (row + 1) * D);
          delta_t.push_back(in.delta[row]);
          F_t.insert(F_t.end(), in.F.begin() + row * 3, in.F.begin() + (row + 1) * 3);
        }
        ssm_decode_step(y_t.data(), state, u_t.data(), delta_t.data(), F_t.data(), w.params(), c);
        for (int b = 0; b < B; ++b)
          for (int d = 0; d < D; ++d)
            EXPECT_NEAR(y_t[b * D + d], y_full[((size_t)b * N + t) * D + d], 1e-12) << "t=" << t << " b=" << b;
      }
    }
  }
}

}  // namespace muse::test
