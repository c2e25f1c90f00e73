#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "ops/hybrid.h"
#include "ops/layernorm.h"
#include "support/gradcheck.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

double naive_sigmoid(double x) { return 1 / (1 + std::exp(-x)); }

template <typename T>
std::vector<T> run_curvature_mix(const std::vector<T>& y_loc, const std::vector<T>& y_lin, T c, int rows, int D) {
  std::vector<T> y(y_loc.size());
  curvature_mix_forward<T>(y.data(), y_loc.data(), y_lin.data(), c, rows, D);
  return y;
}

template <typename T>
std::vector<T> run_phase7_gate(const std::vector<T>& g, T s, int rows) {
  std::vector<T> xi(rows);
  phase7_gate_forward<T>(xi.data(), g.data(), s, rows);
  return xi;
}

template <typename T>
struct ResidualRun {
  std::vector<T> h_out, capped, mean, rstd;
  ResidualMixSaved<T> saved() { return {capped.data(), mean.data(), rstd.data()}; }
};

template <typename T>
ResidualRun<T> run_residual_mix(const std::vector<T>& h, const std::vector<T>& y_att, const std::vector<T>& y_glob,
                                const std::vector<T>& xi, const std::vector<T>& gain, const std::vector<T>& bias,
                                int rows, int D) {
  ResidualRun<T> run{std::vector<T>(h.size()), std::vector<T>(h.size()), std::vector<T>(rows), std::vector<T>(rows)};
  residual_mix_forward<T>(run.h_out.data(), run.saved(), h.data(), y_att.data(), y_glob.data(), xi.data(),
                          gain.data(), bias.data(), rows, D);
  return run;
}

// Interleaved (Re, Im) Green-function values; Im g with either sign, |Im g| in [0.2, 3], away from the
// kink of |·| at 0 (real Green functions have Im g > 0; the negative ones exercise the sign).
std::vector<double> random_green(int rows, Rng& rng) {
  std::vector<double> g(2 * size_t(rows));
  for (int r = 0; r < rows; ++r) {
    g[2 * r] = rng.uniform(-2, 2);
    g[2 * r + 1] = (r % 3 == 2 ? -1 : 1) * rng.uniform(0.2, 3);
  }
  return g;
}

// Branch outputs spread so that z reaches ±50: cap30 is then far from the identity for some entries.
struct ResidualInputs {
  std::vector<double> h, y_att, y_glob, xi, gain, bias;
  ResidualInputs(int rows, int D, Rng& rng) {
    h = random_normal(size_t(rows) * D, rng);
    y_att = random_normal(size_t(rows) * D, rng, 15.0);
    y_glob = random_normal(size_t(rows) * D, rng, 15.0, 2.0);
    xi = random_uniform(rows, rng, 0.05, 0.95);
    gain = random_normal(D, rng, 0.3, 1.0);
    bias = random_normal(D, rng, 0.3);
  }
};

}  // namespace

// ---- curvature mix ----

TEST(hybrid_forward, curvature_mix_matches_naive) {
  Rng rng(21);
  const int rows = 5, D = 7;
  auto y_loc = random_normal(size_t(rows) * D, rng), y_lin = random_normal(size_t(rows) * D, rng);
  for (double c : {0.01, 0.3, 0.55, 0.693, 1.2, 10.0}) {
    const auto y = run_curvature_mix(y_loc, y_lin, c, rows, D);
    const double alpha = naive_sigmoid(10 * (c - 0.55));
    for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], alpha * y_loc[i] + (1 - alpha) * y_lin[i], 1e-14);
  }
}

TEST(hybrid_forward, curvature_mix_alpha_is_exactly_half_at_0_55) {
  EXPECT_EQ(curvature_mix_alpha(0.55), 0.5);
  EXPECT_EQ(curvature_mix_alpha(0.55f), 0.5f);
  // And the mix there is the plain average.
  const std::vector<double> y_loc{1.0, -3.0}, y_lin{3.0, 5.0};
  EXPECT_EQ(run_curvature_mix(y_loc, y_lin, 0.55, 1, 2), (std::vector<double>{2.0, 1.0}));
}

TEST(hybrid_grad, curvature_mix_loc_lin_and_curvature) {
  Rng rng(22);
  const int rows = 4, D = 6;
  auto y_loc = random_normal(size_t(rows) * D, rng), y_lin = random_normal(size_t(rows) * D, rng);
  std::vector<double> c{0.62};  // α ≈ 0.67: away from saturation so dc is sizeable
  auto w = random_normal(size_t(rows) * D, rng);
  auto loss = [&] { return weighted_sum(run_curvature_mix(y_loc, y_lin, c[0], rows, D), w); };
  std::vector<double> dy_loc(y_loc.size()), dy_lin(y_lin.size()), dc(1);
  curvature_mix_backward(dy_loc.data(), dy_lin.data(), dc.data(), w.data(), y_loc.data(), y_lin.data(), c[0], rows, D);
  expect_gradients_match(loss, {{"y_loc", &y_loc, &dy_loc}, {"y_lin", &y_lin, &dy_lin}, {"c", &c, &dc}});
}

TEST(hybrid_forward, curvature_mix_float_matches_double) {
  Rng rng(23);
  const int rows = 64, D = 512;
  auto y_loc = random_normal(size_t(rows) * D, rng, 3.0), y_lin = random_normal(size_t(rows) * D, rng, 3.0);
  auto dy = random_normal(size_t(rows) * D, rng);
  const double c = 0.693;
  const auto yd = run_curvature_mix(y_loc, y_lin, c, rows, D);
  const auto yf = run_curvature_mix(convert<float>(y_loc), convert<float>(y_lin), float(c), rows, D);
  for (size_t i = 0; i < yd.size(); ++i) ASSERT_NEAR(yf[i], yd[i], 1e-5) << i;  // a few ulps of |y| ≲ 15
  // dc sums 32k products: 1e-4 relative.
  double dcd = 0;
  float dcf = 0;
  curvature_mix_backward<double>(nullptr, nullptr, &dcd, dy.data(), y_loc.data(), y_lin.data(), c, rows, D);
  auto dyf = convert<float>(dy), y_locf = convert<float>(y_loc), y_linf = convert<float>(y_lin);
  curvature_mix_backward<float>(nullptr, nullptr, &dcf, dyf.data(), y_locf.data(), y_linf.data(), float(c), rows, D);
  EXPECT_NEAR(dcf, dcd, 1e-4 * std::abs(dcd));
}

// ---- Phase 7 hybrid gate ----

TEST(hybrid_forward, phase7_gate_matches_naive) {
  Rng rng(31);
  const int rows = 9;
  const auto g = random_green(rows, rng);
  const double s = 1.7;
  const auto xi = run_phase7_gate(g, s, rows);
  for (int r = 0; r < rows; ++r) EXPECT_NEAR(xi[r], naive_sigmoid(s * std::abs(g[2 * r + 1])), 1e-15);
}

TEST(hybrid_grad, phase7_gate_green_function_and_scale) {
  Rng rng(32);
  const int rows = 9;
  auto g = random_green(rows, rng);
  std::vector<double> s{0.8};
  auto w = random_normal(rows, rng);
  auto loss = [&] { return weighted_sum(run_phase7_gate(g, s[0], rows), w); };
  const auto xi = run_phase7_gate(g, s[0], rows);
  std::vector<double> dg(g.size()), ds(1);
  phase7_gate_backward(dg.data(), ds.data(), w.data(), xi.data(), g.data(), s[0], rows);
  expect_gradients_match(loss, {{"g", &g, &dg}, {"s", &s, &ds}});
}

TEST(hybrid_forward, phase7_gate_float_matches_double) {
  Rng rng(33);
  const int rows = 4096;
  const auto g = random_green(rows, rng);
  const auto xd = run_phase7_gate(g, 1.0, rows);
  const auto xf = run_phase7_gate(convert<float>(g), 1.0f, rows);
  for (int r = 0; r < rows; ++r) ASSERT_NEAR(xf[r], xd[r], 2e-7) << r;  // ξ ∈ (0.5, 1): a few float ulps (6e-8)
}

// ---- gated residual update ----

TEST(hybrid_forward, residual_mix_matches_naive) {
  Rng rng(41);
  const int rows = 4, D = 10;
  ResidualInputs in(rows, D, rng);
  const auto run = run_residual_mix(in.h, in.y_att, in.y_glob, in.xi, in.gain, in.bias, rows, D);
  double largest_z = 0;
  for (int r = 0; r < rows; ++r) {
    std::vector<double> c(D);
    double mean = 0;
    for (int i = 0; i < D; ++i) {
      const double z = in.xi[r] * in.y_att[r * D + i] + (1 - in.xi[r]) * in.y_glob[r * D + i];
      largest_z = std::max(largest_z, std::abs(z));
      c[i] = 30 * std::tanh(z / 30);
      mean += c[i] / D;
    }
    double var = 0;
    for (int i = 0; i < D; ++i) var += (c[i] - mean) * (c[i] - mean) / D;
    for (int i = 0; i < D; ++i) {
      const double o = (c[i] - mean) / std::sqrt(var + 1e-5) * in.gain[i] + in.bias[i];
      EXPECT_NEAR(run.h_out[r * D + i], in.h[r * D + i] + o, 1e-12) << "row " << r << " col " << i;
    }
  }
  EXPECT_GT(largest_z, 30.0);  // the cap is exercised, so the comparison pins it
}

// At ξ = 1 the update is LN_h(cap30(y_att)) exactly, at ξ = 0 LN_h(cap30(y_glob)): the other branch
// contributes an exact zero (the references use the same LayerNorm op, so equality is bitwise).
TEST(hybrid_forward, residual_mix_reduces_to_one_branch_at_xi_0_and_1) {
  Rng rng(42);
  const int rows = 3, D = 8;
  ResidualInputs in(rows, D, rng);
  for (double gate : {0.0, 1.0}) {
    const std::vector<double> xi(rows, gate);
    const auto run = run_residual_mix(in.h, in.y_att, in.y_glob, xi, in.gain, in.bias, rows, D);
    const auto& branch = gate == 1.0 ? in.y_att : in.y_glob;
    std::vector<double> capped(branch.size()), o(branch.size()), mean(rows), rstd(rows);
    for (size_t i = 0; i < branch.size(); ++i) capped[i] = 30 * std::tanh(branch[i] / 30);
    layernorm_forward<double>(o.data(), mean.data(), rstd.data(), nullptr, capped.data(), in.gain.data(),
                              in.bias.data(), rows, D);
    for (size_t i = 0; i < o.size(); ++i) EXPECT_EQ(run.h_out[i], in.h[i] + o[i]) << "xi " << gate << " at " << i;
  }
}

TEST(hybrid_forward, residual_mix_in_place) {
  Rng rng(43);
  const int rows = 5, D = 9;
  ResidualInputs in(rows, D, rng);
  const auto run = run_residual_mix(in.h, in.y_att, in.y_glob, in.xi, in.gain, in.bias, rows, D);
  std::vector<double> h = in.h, capped(h.size()), mean(rows), rstd(rows);
  residual_mix_forward<double>(h.data(), {capped.data(), mean.data(), rstd.data()}, h.data(), in.y_att.data(),
                               in.y_glob.data(), in.xi.data(), in.gain.data(), in.bias.data(), rows, D);
  EXPECT_EQ(h, run.h_out);
  EXPECT_NE(h, in.h);
}

TEST(hybrid_grad, residual_mix_every_input_and_parameter) {
  Rng rng(44);
  const int rows = 4, D = 7;
  ResidualInputs in(rows, D, rng);
  auto w = random_normal(size_t(rows) * D, rng);
  auto loss = [&] {
    return weighted_sum(run_residual_mix(in.h, in.y_att, in.y_glob, in.xi, in.gain, in.bias, rows, D).h_out, w);
  };
  auto run = run_residual_mix(in.h, in.y_att, in.y_glob, in.xi, in.gain, in.bias, rows, D);
  std::vector<double> dh(in.h.size()), dy_att(in.y_att.size()), dy_glob(in.y_glob.size()), dxi(rows), dgain(D),
      dbias(D);
  residual_mix_backward(dh.data(), dy_att.data(), dy_glob.data(), dxi.data(), dgain.data(), dbias.data(), w.data(),
                        run.saved(), in.y_att.data(), in.y_glob.data(), in.xi.data(), in.gain.data(), rows, D);
  expect_gradients_match(loss, {{"h", &in.h, &dh},
                                {"y_att", &in.y_att, &dy_att},
                                {"y_glob", &in.y_glob, &dy_glob},
                                {"xi", &in.xi, &dxi},
                                {"gain", &in.gain, &dgain},
                                {"bias", &in.bias, &dbias}});
}

// D = 512 (phase8-small), 64 rows; |h_out| ≲ 5, LayerNorm in float: 2e-5 absolute on h_out, and
// dy_att (≈ 0.05·dh_out: LN_h divides by the row's spread of ~15–20) to 1e-6 absolute.
TEST(hybrid_forward, residual_mix_float_matches_double) {
  Rng rng(45);
  const int rows = 64, D = 512;
  ResidualInputs in(rows, D, rng);
  auto dh_out = random_normal(size_t(rows) * D, rng);
  auto rd = run_residual_mix(in.h, in.y_att, in.y_glob, in.xi, in.gain, in.bias, rows, D);
  auto hf = convert<float>(in.h), yaf = convert<float>(in.y_att), ygf = convert<float>(in.y_glob),
       xif = convert<float>(in.xi), gf = convert<float>(in.gain), bf = convert<float>(in.bias);
  auto rf = run_residual_mix(hf, yaf, ygf, xif, gf, bf, rows, D);
  double worst = 0;
  for (size_t i = 0; i < rd.h_out.size(); ++i) worst = std::max(worst, std::abs(double(rf.h_out[i]) - rd.h_out[i]));
  EXPECT_LT(worst, 2e-5);

  std::vector<double> dyd(in.y_att.size());
  residual_mix_backward<double>(nullptr, dyd.data(), nullptr, nullptr, nullptr, nullptr, dh_out.data(), rd.saved(),
                                in.y_att.data(), in.y_glob.data(), in.xi.data(), in.gain.data(), rows, D);
  auto dhf = convert<float>(dh_out);
  std::vector<float> dyf(in.y_att.size());
  residual_mix_backward<float>(nullptr, dyf.data(), nullptr, nullptr, nullptr, nullptr, dhf.data(), rf.saved(),
                               yaf.data(), ygf.data(), xif.data(), gf.data(), rows, D);
  worst = 0;
  for (size_t i = 0; i < dyd.size(); ++i) worst = std::max(worst, std::abs(double(dyf[i]) - dyd[i]));
  EXPECT_LT(worst, 1e-6);
}

}  // namespace muse::test
