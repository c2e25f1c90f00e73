#include <gtest/gtest.h>

#include <cmath>

#include "ops/layernorm.h"
#include "support/gradcheck.h"
#include "support/test_util.h"

namespace muse::test {

TEST(layernorm_forward, normalises_rows_and_computes_radius) {
  Rng rng(4);
  const int rows = 3, D = 16;
  auto x = random_normal(rows * D, rng, 2.0, 0.5);
  std::vector<double> gain(D, 1.0), bias(D, 0.0), y(x.size()), mean(rows), rstd(rows), radius(rows);
  layernorm_forward(y.data(), mean.data(), rstd.data(), radius.data(), x.data(), gain.data(), bias.data(), rows, D);
  for (int r = 0; r < rows; ++r) {
    double m = 0, v = 0, sq = 0;
    for (int i = 0; i < D; ++i) m += y[r * D + i];
    for (int i = 0; i < D; ++i) v += y[r * D + i] * y[r * D + i];
    for (int i = 0; i < D; ++i) sq += x[r * D + i] * x[r * D + i];
    EXPECT_NEAR(m / D, 0.0, 1e-12);
    EXPECT_NEAR(v / D, 1.0, 1e-4);  // eps = 1e-5 keeps it slightly below 1
    EXPECT_NEAR(radius[r], 2 * std::sqrt(sq) / std::sqrt(double(D)), 1e-12);
  }
}

TEST(layernorm_grad, input_gain_bias_radius) {
  Rng rng(5);
  const int rows = 4, D = 9;
  auto x = random_normal(rows * D, rng, 1.5, 0.3);
  auto gain = random_normal(D, rng, 0.5, 1.0), bias = random_normal(D, rng);
  auto w = random_normal(rows * D, rng), wr = random_normal(rows, rng);
  auto loss = [&] {
    std::vector<double> y(x.size()), mean(rows), rstd(rows), radius(rows);
    layernorm_forward(y.data(), mean.data(), rstd.data(), radius.data(), x.data(), gain.data(), bias.data(), rows, D);
    return weighted_sum(y, w) + weighted_sum(radius, wr);
  };
  std::vector<double> y(x.size()), mean(rows), rstd(rows), radius(rows);
  layernorm_forward(y.data(), mean.data(), rstd.data(), radius.data(), x.data(), gain.data(), bias.data(), rows, D);
  std::vector<double> dx(x.size()), dgain(D), dbias(D);
  layernorm_backward(dx.data(), dgain.data(), dbias.data(), w.data(), wr.data(), x.data(), gain.data(), mean.data(),
                     rstd.data(), rows, D);
  expect_gradients_match(loss, {{"x", &x, &dx}, {"gain", &gain, &dgain}, {"bias", &bias, &dbias}});
}

TEST(layernorm_forward, float_matches_double) {
  Rng rng(6);
  const int rows = 8, D = 33;
  auto xd = random_normal(rows * D, rng, 3.0);
  auto gd = random_normal(D, rng, 0.1, 1.0), bd = random_normal(D, rng, 0.1);
  std::vector<double> yd(xd.size()), md(rows), rd(rows);
  layernorm_forward<double>(yd.data(), md.data(), rd.data(), nullptr, xd.data(), gd.data(), bd.data(), rows, D);
  auto xf = convert<float>(xd), gf = convert<float>(gd), bf = convert<float>(bd);
  std::vector<float> yf(xf.size()), mf(rows), rf(rows);
  layernorm_forward<float>(yf.data(), mf.data(), rf.data(), nullptr, xf.data(), gf.data(), bf.data(), rows, D);
  for (size_t i = 0; i < yd.size(); ++i) EXPECT_NEAR(yf[i], yd[i], 1e-5);
}

}  // namespace muse::test
