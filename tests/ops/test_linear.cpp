#include <gtest/gtest.h>

#include "ops/linear.h"
#include "support/gradcheck.h"
#include "support/test_util.h"

namespace muse::test {

TEST(linear_forward, matches_loops) {
  Rng rng(1);
  const int rows = 5, in = 7, out = 3;
  auto x = random_normal(rows * in, rng), W = random_normal(out * in, rng), b = random_normal(out, rng);
  std::vector<double> y(rows * out);
  linear_forward(y.data(), x.data(), W.data(), b.data(), rows, in, out);
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o) {
      double ref = b[o];
      for (int i = 0; i < in; ++i) ref += x[r * in + i] * W[o * in + i];
      EXPECT_NEAR(y[r * out + o], ref, 1e-12);
    }
}

TEST(linear_grad, input_weight_bias) {
  Rng rng(2);
  const int rows = 6, in = 5, out = 4;
  auto x = random_normal(rows * in, rng), W = random_normal(out * in, rng), b = random_normal(out, rng);
  auto w = random_normal(rows * out, rng);
  auto loss = [&] {
    std::vector<double> y(rows * out);
    linear_forward(y.data(), x.data(), W.data(), b.data(), rows, in, out);
    return weighted_sum(y, w);
  };
  std::vector<double> dx(x.size()), dW(W.size()), db(b.size());
  linear_backward(dx.data(), dW.data(), db.data(), w.data(), x.data(), W.data(), rows, in, out);
  expect_gradients_match(loss, {{"x", &x, &dx}, {"W", &W, &dW}, {"b", &b, &db}});
}

TEST(linear_backward, accumulates) {
  Rng rng(3);
  const int rows = 3, in = 4, out = 2;
  auto x = random_normal(rows * in, rng), W = random_normal(out * in, rng), dy = random_normal(rows * out, rng);
  std::vector<double> once(W.size()), twice(W.size());
  linear_backward<double>(nullptr, once.data(), nullptr, dy.data(), x.data(), W.data(), rows, in, out);
  linear_backward<double>(nullptr, twice.data(), nullptr, dy.data(), x.data(), W.data(), rows, in, out);
  linear_backward<double>(nullptr, twice.data(), nullptr, dy.data(), x.data(), W.data(), rows, in, out);
  for (size_t i = 0; i < W.size(); ++i) EXPECT_NEAR(twice[i], 2 * once[i], 1e-12);
}

}  // namespace muse::test
