#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "ops/local_attn.h"
#include "support/gradcheck.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

std::string describe(const LocalAttnConfig& cfg, bool gate) {
  return std::string(cfg.sliding ? "sliding" : "block") + (cfg.alibi ? "+alibi" : "") + (gate ? "+gate" : "");
}

// Inputs of one attention call, in double; log_mu empty = no key gate.
struct Inputs {
  std::vector<double> q, k, v, beta, log_mu, c;
};

Inputs random_inputs(const LocalAttnConfig& cfg, bool gate, Rng& rng, double qk_std = 0.5) {
  const size_t n = size_t(cfg.B) * cfg.N * cfg.D;
  Inputs in;
  in.q = random_normal(n, rng, qk_std);
  in.k = random_normal(n, rng, qk_std);
  in.v = random_normal(n, rng);
  in.beta = random_normal(cfg.H, rng, 0.5);
  if (gate) {
    in.log_mu.resize(size_t(cfg.B) * cfg.N * cfg.H);
    for (double& m : in.log_mu) m = -std::log1p(std::exp(-(2.0 + rng.normal())));  // log σ(·), the §2.7 gate
  }
  in.c = {0.7031};
  return in;
}

// The op, run on double or float copies of the inputs.
template <typename T>
std::vector<T> run_forward(const Inputs& in, const LocalAttnConfig& cfg, std::vector<T>* lse_out = nullptr) {
  const auto q = convert<T>(in.q), k = convert<T>(in.k), v = convert<T>(in.v), beta = convert<T>(in.beta),
             log_mu = convert<T>(in.log_mu);
  std::vector<T> o(q.size()), lse(size_t(cfg.B) * cfg.N * cfg.H);
  local_attn_forward<T>(o.data(), lse.data(), q.data(), k.data(), v.data(), T(in.c[0]), beta.data(),
                        log_mu.empty() ? nullptr : log_mu.data(), cfg);
  if (lse_out) *lse_out = lse;
  return o;
}

// The plain O(N²) definition: an explicit mask over all (i, j), ball points from the exp map, the
// ball-coordinate distance, a full softmax over the allowed keys.
std::vector<double> dense_reference(const Inputs& in, const LocalAttnConfig& cfg) {
  const int B = cfg.B, N = cfg.N, H = cfg.H, D = cfg.D, dh = D / H, W = cfg.window;
  const double c = in.c[0], sc = std::sqrt(c);
  auto ball_point = [&](const double* t) {
    double n2 = 0;
    for (int e = 0; e < dh; ++e) n2 += t[e] * t[e];
    const double n = std::sqrt(n2);
    std::vector<double> x(dh);
    for (int e = 0; e < dh; ++e) x[e] = n > 0 ? std::tanh(sc * n) / (sc * n) * t[e] : 0.0;
    return x;
  };
  std::vector<double> o(size_t(B) * N * D, 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const double temperature = std::log1p(std::exp(in.beta[h]));
      const double slope = std::pow(2.0, -8.0 * (h + 1) / H);
      for (int i = 0; i < N; ++i) {
        const auto x = ball_point(&in.q[(size_t(b) * N + i) * D + h * dh]);
        std::vector<double> score(N);
        std::vector<bool> allowed(N);
        double max_score = -1e300;
        for (int j = 0; j < N; ++j) {
          allowed[j] = j <= i && (cfg.sliding ? j > i - W : j / W == i / W);
          if (!allowed[j]) continue;
          const auto y = ball_point(&in.k[(size_t(b) * N + j) * D + h * dh]);
          double diff2 = 0, x2 = 0, y2 = 0;
          for (int e = 0; e < dh; ++e) {
            diff2 += (x[e] - y[e]) * (x[e] - y[e]);
            x2 += x[e] * x[e];
            y2 += y[e] * y[e];
          }
          const double dist = std::acosh(1 + 2 * c * diff2 / ((1 - c * x2) * (1 - c * y2))) / sc;
          score[j] = -temperature * dist;
          if (cfg.alibi) score[j] -= slope * (i - j);
          if (!in.log_mu.empty()) score[j] += in.log_mu[(size_t(b) * N + j) * H + h];
          max_score = std::max(max_score, score[j]);
        }
        double sum = 0;
        for (int j = 0; j < N; ++j)
          if (allowed[j]) sum += std::exp(score[j] - max_score);
        for (int j = 0; j < N; ++j) {
          if (!allowed[j]) continue;
          const double p = std::exp(score[j] - max_score) / sum;
          for (int e = 0; e < dh; ++e)
            o[(size_t(b) * N + i) * D + h * dh + e] += p * in.v[(size_t(b) * N + j) * D + h * dh + e];
        }
      }
    }
  return o;
}

// Gradients of Σ w·o with respect to every input.
struct Grads {
  std::vector<double> q, k, v, c, beta, log_mu;
};

template <typename T> Grads run_backward(const Inputs& in, const LocalAttnConfig& cfg, const std::vector<double>& w) {
  std::vector<T> lse;
  const std::vector<T> o = run_forward<T>(in, cfg, &lse);
  const auto q = convert<T>(in.q), k = convert<T>(in.k), v = convert<T>(in.v), beta = convert<T>(in.beta),
             log_mu = convert<T>(in.log_mu), d_o = convert<T>(w);
  std::vector<T> dq(q.size()), dk(k.size()), dv(v.size()), dc(1), dbeta(beta.size()), dlog_mu(log_mu.size());
  local_attn_backward<T>(dq.data(), dk.data(), dv.data(), dc.data(), dbeta.data(),
                         log_mu.empty() ? nullptr : dlog_mu.data(), d_o.data(), o.data(), lse.data(), q.data(),
                         k.data(), v.data(), T(in.c[0]), beta.data(), log_mu.empty() ? nullptr : log_mu.data(), cfg);
  auto back = [](const std::vector<T>& x) { return std::vector<double>(x.begin(), x.end()); };
  return {back(dq), back(dk), back(dv), back(dc), back(dbeta), back(dlog_mu)};
}

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double e : x) m = std::max(m, std::abs(e));
  return m;
}

}  // namespace

TEST(local_attn_forward, matches_dense_reference) {
  // N = 37 is not a multiple of W = 8: the last block is partial.
  Rng rng(21);
  for (const bool sliding : {false, true})
    for (const bool alibi : {false, true})
      for (const bool gate : {false, true}) {
        const LocalAttnConfig cfg{.B = 2, .N = 37, .H = 3, .D = 12, .window = 8, .sliding = sliding, .alibi = alibi};
        const Inputs in = random_inputs(cfg, gate, rng);
        const auto got = run_forward<double>(in, cfg), want = dense_reference(in, cfg);
        for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-10) << describe(cfg, gate) << " at " << i;
      }
}

TEST(local_attn_forward, window_of_one_copies_values) {
  // W = 1 (both modes): every query sees only itself, so o = v whatever the scores.
  Rng rng(22);
  for (const bool sliding : {false, true}) {
    const LocalAttnConfig cfg{.B = 1, .N = 9, .H = 2, .D = 6, .window = 1, .sliding = sliding, .alibi = true};
    const Inputs in = random_inputs(cfg, true, rng);
    const auto o = run_forward<double>(in, cfg);
    for (size_t i = 0; i < o.size(); ++i) EXPECT_DOUBLE_EQ(o[i], in.v[i]);
  }
}

TEST(local_attn_causal, future_positions_never_reach_earlier_outputs) {
  // The input of expect_causal is [q | k | v | log_mu] per position, so perturbing position j moves all of
  // its query, key, value and gate at once. (Perturbing q_j alone cannot be checked this way: the first
  // token of a window sees only itself, so its output ignores its query.)
  Rng rng(23);
  for (const bool sliding : {false, true}) {
    const LocalAttnConfig cfg{.B = 2, .N = 21, .H = 2, .D = 8, .window = 5, .sliding = sliding, .alibi = true};
    const int D = cfg.D, H = cfg.H, width = 3 * D + H;
    const Inputs base = random_inputs(cfg, true, rng);
    std::vector<double> packed(size_t(cfg.B) * cfg.N * width);
    for (int t = 0; t < cfg.B * cfg.N; ++t)
      for (int e = 0; e < width; ++e) {
        double& x = packed[size_t(t) * width + e];
        if (e < D) x = base.q[size_t(t) * D + e];
        else if (e < 2 * D) x = base.k[size_t(t) * D + e - D];
        else if (e < 3 * D) x = base.v[size_t(t) * D + e - 2 * D];
        else x = base.log_mu[size_t(t) * H + e - 3 * D];
      }
    auto unpack = [&](const auto& x) {
      Inputs in = base;
      for (int t = 0; t < cfg.B * cfg.N; ++t)
        for (int e = 0; e < width; ++e) {
          const double value = x[size_t(t) * width + e];
          if (e < D) in.q[size_t(t) * D + e] = value;
          else if (e < 2 * D) in.k[size_t(t) * D + e - D] = value;
          else if (e < 3 * D) in.v[size_t(t) * D + e - 2 * D] = value;
          else in.log_mu[size_t(t) * H + e - 3 * D] = value;
        }
      return in;
    };
    const std::string what = describe(cfg, true);
    expect_causal<double>([&](const std::vector<double>& x) { return run_forward<double>(unpack(x), cfg); }, packed,
                          cfg.B, cfg.N, width, D, what + " (double)");
    expect_causal<float>([&](const std::vector<float>& x) { return run_forward<float>(unpack(x), cfg); },
                         convert<float>(packed), cfg.B, cfg.N, width, D, what + " (float)");
  }
}

TEST(local_attn_causal, non_finite_masked_positions_do_not_leak) {
  // NaN key and gate and an infinite value at position p: outputs (and query gradients) of every query
  // whose window excludes p — all i < p, and i ≥ p + W (sliding) or i past p's block (block) — stay
  // bit-identical to a clean run. Outputs that do see p become non-finite, which shows the poison is real.
  Rng rng(24);
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (const bool sliding : {false, true}) {
    const LocalAttnConfig cfg{.B = 2, .N = 37, .H = 2, .D = 8, .window = 8, .sliding = sliding, .alibi = true};
    const int p = 19, D = cfg.D, H = cfg.H;
    const int first_unaffected = sliding ? p + cfg.window : (p / cfg.window + 1) * cfg.window;
    const Inputs clean = random_inputs(cfg, true, rng);
    Inputs poisoned = clean;
    for (int b = 0; b < cfg.B; ++b) {
      for (int e = 0; e < D; ++e) {
        poisoned.k[(size_t(b) * cfg.N + p) * D + e] = nan;
        poisoned.v[(size_t(b) * cfg.N + p) * D + e] = inf;
      }
      for (int h = 0; h < H; ++h) poisoned.log_mu[(size_t(b) * cfg.N + p) * H + h] = nan;
    }
    const auto w = random_normal(clean.q.size(), rng);
    const auto o_clean = run_forward<double>(clean, cfg), o_poisoned = run_forward<double>(poisoned, cfg);
    const Grads g_clean = run_backward<double>(clean, cfg, w), g_poisoned = run_backward<double>(poisoned, cfg, w);
    for (int b = 0; b < cfg.B; ++b)
      for (int i = 0; i < cfg.N; ++i)
        for (int e = 0; e < D; ++e) {
          const size_t at = (size_t(b) * cfg.N + i) * D + e;
          if (i < p || i >= first_unaffected) {
            ASSERT_TRUE(std::isfinite(o_poisoned[at])) << describe(cfg, true) << " i=" << i;
            ASSERT_EQ(o_poisoned[at], o_clean[at]) << describe(cfg, true) << " i=" << i;
            ASSERT_EQ(g_poisoned.q[at], g_clean.q[at]) << describe(cfg, true) << " dq at i=" << i;
          } else {
            EXPECT_FALSE(std::isfinite(o_poisoned[at])) << describe(cfg, true) << " i=" << i;
          }
        }
  }
}

TEST(local_attn_grad, block_mode_with_gate) {
  Rng rng(25);
  const LocalAttnConfig cfg{.B = 2, .N = 11, .H = 2, .D = 6, .window = 4, .sliding = false, .alibi = false};
  Inputs in = random_inputs(cfg, true, rng, 0.6);
  const auto w = random_normal(in.q.size(), rng);
  auto loss = [&] { return weighted_sum(run_forward<double>(in, cfg), w); };
  const Grads g = run_backward<double>(in, cfg, w);
  expect_gradients_match(loss, {{"q", &in.q, &g.q},
                                {"k", &in.k, &g.k},
                                {"v", &in.v, &g.v},
                                {"c", &in.c, &g.c},
                                {"beta", &in.beta, &g.beta},
                                {"log_mu", &in.log_mu, &g.log_mu}});
}

TEST(local_attn_grad, sliding_mode_with_alibi_and_gate) {
  Rng rng(26);
  const LocalAttnConfig cfg{.B = 2, .N = 13, .H = 3, .D = 9, .window = 5, .sliding = true, .alibi = true};
  Inputs in = random_inputs(cfg, true, rng, 0.6);
  const auto w = random_normal(in.q.size(), rng);
  auto loss = [&] { return weighted_sum(run_forward<double>(in, cfg), w); };
  const Grads g = run_backward<double>(in, cfg, w);
  expect_gradients_match(loss, {{"q", &in.q, &g.q},
                                {"k", &in.k, &g.k},
                                {"v", &in.v, &g.v},
                                {"c", &in.c, &g.c},
                                {"beta", &in.beta, &g.beta},
                                {"log_mu", &in.log_mu, &g.log_mu}});
}

TEST(local_attn_grad, sliding_mode_without_gate_large_norms) {
  // No key gate; per-head norms of 2–6 (a up to ~5), so the angular term dominates ℓ.
  Rng rng(27);
  const LocalAttnConfig cfg{.B = 1, .N = 10, .H = 2, .D = 8, .window = 4, .sliding = true, .alibi = false};
  Inputs in = random_inputs(cfg, false, rng, 2.0);
  in.beta = {-1.5, -2.0};  // cooler temperatures keep the softmax from collapsing onto one key
  const auto w = random_normal(in.q.size(), rng);
  auto loss = [&] { return weighted_sum(run_forward<double>(in, cfg), w); };
  const Grads g = run_backward<double>(in, cfg, w);
  expect_gradients_match(loss, {{"q", &in.q, &g.q},
                                {"k", &in.k, &g.k},
                                {"v", &in.v, &g.v},
                                {"c", &in.c, &g.c},
                                {"beta", &in.beta, &g.beta}});
}

TEST(local_attn_backward, accumulates_and_ignores_thread_count) {
  Rng rng(28);
  const LocalAttnConfig cfg{.B = 3, .N = 30, .H = 4, .D = 16, .window = 7, .sliding = true, .alibi = true};
  const Inputs in = random_inputs(cfg, true, rng);
  const auto w = random_normal(in.q.size(), rng);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const Grads serial = run_backward<float>(in, cfg, w);
  omp_set_num_threads(3);
  const Grads parallel = run_backward<float>(in, cfg, w);
  omp_set_num_threads(threads);
  EXPECT_EQ(serial.c, parallel.c);
  EXPECT_EQ(serial.beta, parallel.beta);
  EXPECT_EQ(serial.q, parallel.q);
  EXPECT_EQ(serial.k, parallel.k);
  EXPECT_EQ(serial.log_mu, parallel.log_mu);

  // A second backward into the same buffers doubles them.
  std::vector<double> lse;
  const auto o = run_forward<double>(in, cfg, &lse);
  std::vector<double> dk(in.k.size()), dc(1), dbeta(cfg.H);
  for (int rep = 0; rep < 2; ++rep)
    local_attn_backward<double>(nullptr, dk.data(), nullptr, dc.data(), dbeta.data(), nullptr, w.data(), o.data(),
                                lse.data(), in.q.data(), in.k.data(), in.v.data(), in.c[0], in.beta.data(),
                                in.log_mu.data(), cfg);
  const Grads once = run_backward<double>(in, cfg, w);
  for (size_t i = 0; i < dk.size(); ++i) EXPECT_NEAR(dk[i], 2 * once.k[i], 1e-12);
  EXPECT_NEAR(dc[0], 2 * once.c[0], 1e-12);
  for (int h = 0; h < cfg.H; ++h) EXPECT_NEAR(dbeta[h], 2 * once.beta[h], 1e-12);
}

TEST(local_attn_forward, float_matches_double) {
  // A phase8-like head shape (d_h = 32, W = 64, sliding, alibi, gate) with the per-head tangent norms seen
  // in training (0.2 – 40, SPEC §2.1). The inputs are float-representable, so the difference is the op's
  // own fp32 rounding. Measured (max error over the tensor / its largest entry): forward 1.2e-6 of max|v|;
  // dq, dk, dv, dlog_mu ≤ 2e-6, dbeta 4e-6, dc 5e-5 (dc = Σ ∂ρ/∂√c − ρ/√c cancels: c is nearly redundant
  // with the temperature at large norms, §2.1). Tolerances: forward 1e-5, gradients 3e-5, dc 3e-4.
  Rng rng(29);
  const LocalAttnConfig cfg{.B = 2, .N = 160, .H = 4, .D = 128, .window = 64, .sliding = true, .alibi = true};
  Inputs in = random_inputs(cfg, true, rng);
  const int dh = cfg.D / cfg.H;
  for (auto* t : {&in.q, &in.k})
    for (size_t row = 0; row < t->size() / dh; ++row) {
      const double target = 0.2 * std::pow(200.0, rng.uniform());  // ‖·‖ log-uniform on [0.2, 40]
      double n2 = 0;
      for (int e = 0; e < dh; ++e) n2 += (*t)[row * dh + e] * (*t)[row * dh + e];
      for (int e = 0; e < dh; ++e) (*t)[row * dh + e] *= target / std::sqrt(n2);
    }
  in.beta = {-2.0, -1.0, 0.0, 0.5};
  for (auto* t : {&in.q, &in.k, &in.v, &in.beta, &in.log_mu, &in.c})
    for (double& x : *t) x = double(float(x));
  auto w = random_normal(in.q.size(), rng);
  for (double& x : w) x = double(float(x));

  const auto od = run_forward<double>(in, cfg);
  const auto of = run_forward<float>(in, cfg);
  const double v_scale = max_abs(in.v);
  double worst = 0;
  for (size_t i = 0; i < od.size(); ++i) {
    ASSERT_TRUE(std::isfinite(of[i]));
    worst = std::max(worst, std::abs(of[i] - od[i]) / v_scale);
  }
  std::printf("[ local_attn ] float vs double, forward: max error %.3g of max |v|\n", worst);
  EXPECT_LT(worst, 1e-5) << "forward";

  const Grads gd = run_backward<double>(in, cfg, w), gf = run_backward<float>(in, cfg, w);
  struct Compared {
    const char* name;
    const std::vector<double>& in_double;
    const std::vector<double>& in_float;
    double tolerance;
  };
  const Compared tensors[] = {{"q", gd.q, gf.q, 3e-5},       {"k", gd.k, gf.k, 3e-5},
                              {"v", gd.v, gf.v, 3e-5},       {"c", gd.c, gf.c, 3e-4},
                              {"beta", gd.beta, gf.beta, 3e-5}, {"log_mu", gd.log_mu, gf.log_mu, 3e-5}};
  for (const Compared& t : tensors) {
    const double scale = max_abs(t.in_double);
    double err = 0;
    for (size_t i = 0; i < t.in_double.size(); ++i) err = std::max(err, std::abs(t.in_float[i] - t.in_double[i]));
    std::printf("[ local_attn ] float vs double, d%s: max error %.3g of max |grad| %.3g\n", t.name, err, scale);
    EXPECT_LT(err / scale, t.tolerance) << t.name;
  }
}

}  // namespace muse::test
