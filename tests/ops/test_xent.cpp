#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ops/xent.h"
#include "support/gradcheck.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

// Per-row loss straight from the definition: softmax by plain exponentials (inputs are moderate).
double naive_row_loss(const double* z, int V, int target, double smoothing) {
  double total = 0;
  for (int v = 0; v < V; ++v) total += std::exp(z[v]);
  double nll_target = 0, nll_mean = 0;
  for (int v = 0; v < V; ++v) {
    const double nll = -std::log(std::exp(z[v]) / total);
    if (v == target) nll_target = nll;
    nll_mean += nll / V;
  }
  return (1 - smoothing) * nll_target + smoothing * nll_mean;
}

std::vector<int32_t> random_targets(int rows, int V, Rng& rng) {
  std::vector<int32_t> t(rows);
  for (auto& y : t) y = int32_t(rng.below(V));
  return t;
}

template <typename T>
XentResult forward(const std::vector<T>& logits, const std::vector<int32_t>& targets, int V, int Vp,
                   std::type_identity_t<T> smoothing, std::type_identity_t<std::vector<T>>* row_loss = nullptr,
                   std::type_identity_t<std::vector<T>>* row_lse = nullptr) {
  const int rows = int(targets.size());
  std::vector<T> loss(rows), lse(rows);
  const XentResult r = xent_forward(loss.data(), lse.data(), logits.data(), targets.data(), rows, V, Vp, smoothing);
  if (row_loss) *row_loss = loss;
  if (row_lse) *row_lse = lse;
  return r;
}

void check_logit_gradient(double smoothing, bool with_ignored_rows, uint64_t seed) {
  const int rows = 5, V = 13, Vp = 16;
  Rng rng(seed);
  auto logits = random_normal(size_t(rows) * Vp, rng, 2.0);
  auto targets = random_targets(rows, V, rng);
  if (with_ignored_rows) targets[1] = targets[3] = -1;
  const double dloss = 0.7;
  auto loss = [&] { return dloss * forward(logits, targets, V, Vp, smoothing).mean_loss; };
  std::vector<double> lse;
  const XentResult r = forward(logits, targets, V, Vp, smoothing, nullptr, &lse);
  EXPECT_EQ(r.count, with_ignored_rows ? rows - 2 : rows);
  std::vector<double> dlogits(logits.size(), 0.0);
  xent_backward(dlogits.data(), dloss, logits.data(), lse.data(), targets.data(), rows, V, Vp, smoothing, r.count);
  expect_gradients_match(loss, {{"logits", &logits, &dlogits}});
}

}  // namespace

TEST(xent_forward, matches_naive_reference) {
  const int rows = 6, V = 11, Vp = 16;
  Rng rng(1);
  const auto logits = random_normal(size_t(rows) * Vp, rng, 3.0);
  auto targets = random_targets(rows, V, rng);
  targets[2] = -1;
  for (double smoothing : {0.0, 0.1}) {
    std::vector<double> row_loss;
    const XentResult r = forward(logits, targets, V, Vp, smoothing, &row_loss);
    double total = 0;
    for (int row = 0; row < rows; ++row) {
      if (targets[row] == -1) {
        EXPECT_EQ(row_loss[row], 0.0);
        continue;
      }
      const double expected = naive_row_loss(&logits[size_t(row) * Vp], V, targets[row], smoothing);
      EXPECT_NEAR(row_loss[row], expected, 1e-12) << "row " << row << ", smoothing " << smoothing;
      total += expected;
    }
    EXPECT_EQ(r.count, rows - 1);
    EXPECT_NEAR(r.mean_loss, total / (rows - 1), 1e-12);
  }
}

TEST(xent_grad, logits_plain) { check_logit_gradient(0.0, false, 2); }

TEST(xent_grad, logits_with_smoothing) { check_logit_gradient(0.1, false, 3); }

TEST(xent_grad, logits_with_smoothing_and_ignored_rows) { check_logit_gradient(0.1, true, 4); }

TEST(xent_forward, padded_columns_are_invisible) {
  const int rows = 4, V = 10, Vp = 16;
  Rng rng(5);
  auto logits = random_normal<float>(size_t(rows) * Vp, rng, 2.0);
  const auto targets = random_targets(rows, V, rng);
  std::vector<float> loss_plain, lse;
  const XentResult plain = forward(logits, targets, V, Vp, 0.1f, &loss_plain);
  for (int row = 0; row < rows; ++row)
    for (int v = V; v < Vp; ++v) logits[size_t(row) * Vp + v] = 1e30f;
  std::vector<float> loss_huge;
  const XentResult huge = forward(logits, targets, V, Vp, 0.1f, &loss_huge, &lse);
  EXPECT_EQ(huge.mean_loss, plain.mean_loss);
  EXPECT_EQ(loss_huge, loss_plain);
  // Backward accumulates into real columns and leaves padded ones exactly as they were.
  std::vector<float> dlogits(logits.size(), 0.25f);
  xent_backward(dlogits.data(), 1.0f, logits.data(), lse.data(), targets.data(), rows, V, Vp, 0.1f, huge.count);
  for (int row = 0; row < rows; ++row) {
    float real_sum = 0;
    for (int v = 0; v < V; ++v) real_sum += dlogits[size_t(row) * Vp + v] - 0.25f;
    EXPECT_NEAR(real_sum, 0.0f, 1e-6f);  // softmax − target distribution sums to zero
    EXPECT_NE(dlogits[size_t(row) * Vp + targets[row]], 0.25f);
    for (int v = V; v < Vp; ++v) ASSERT_EQ(dlogits[size_t(row) * Vp + v], 0.25f) << "padded column " << v;
  }
}

TEST(xent_forward, large_logits_are_stable) {
  const int rows = 3, V = 20, Vp = 32;
  Rng rng(6);
  const auto logits = random_normal(size_t(rows) * Vp, rng, 2.0);
  const auto targets = random_targets(rows, V, rng);
  auto shifted = logits;
  for (double& z : shifted) z += 1e4;  // exp(1e4) overflows without the max subtraction
  const double base = forward(logits, targets, V, Vp, 0.1).mean_loss;
  const double moved = forward(shifted, targets, V, Vp, 0.1).mean_loss;
  ASSERT_TRUE(std::isfinite(moved));
  EXPECT_NEAR(moved, base, 1e-9);
}

TEST(xent_forward, all_ignored_rows_give_zero_loss_and_count) {
  const int rows = 3, V = 7, Vp = 8;
  Rng rng(7);
  const auto logits = random_normal(size_t(rows) * Vp, rng);
  const std::vector<int32_t> targets(rows, -1);
  std::vector<double> row_loss, lse;
  const XentResult r = forward(logits, targets, V, Vp, 0.1, &row_loss, &lse);
  EXPECT_EQ(r.count, 0);
  EXPECT_EQ(r.mean_loss, 0.0);
  for (double l : row_loss) EXPECT_EQ(l, 0.0);
  std::vector<double> dlogits(logits.size(), 1.5);
  xent_backward(dlogits.data(), 1.0, logits.data(), lse.data(), targets.data(), rows, V, Vp, 0.1, r.count);
  for (double g : dlogits) EXPECT_EQ(g, 1.5);
}

TEST(xent_forward, custom_ignore_index) {
  const int rows = 4, V = 9, Vp = 16;
  Rng rng(8);
  const auto logits = random_normal(size_t(rows) * Vp, rng);
  const std::vector<int32_t> targets = {3, 0, 8, 0};
  std::vector<double> row_loss(rows), lse(rows);
  const XentResult r =
      xent_forward(row_loss.data(), lse.data(), logits.data(), targets.data(), rows, V, Vp, 0.0, /*ignore_index=*/0);
  EXPECT_EQ(r.count, 2);
  EXPECT_EQ(row_loss[1], 0.0);
  EXPECT_NEAR(row_loss[2], naive_row_loss(&logits[2 * Vp], V, 8, 0.0), 1e-12);
}

TEST(xent_forward, float_matches_double) {
  const int rows = 32, V = 5000, Vp = 5120;
  Rng rng(9);
  const auto logits = random_normal(size_t(rows) * Vp, rng, 3.0);
  auto targets = random_targets(rows, V, rng);
  targets[5] = -1;
  std::vector<double> loss_d, lse_d;
  std::vector<float> loss_f, lse_f;
  const auto logits_f = convert<float>(logits);
  const XentResult rd = forward(logits, targets, V, Vp, 0.1, &loss_d, &lse_d);
  const XentResult rf = forward(logits_f, targets, V, Vp, 0.1f, &loss_f, &lse_f);
  EXPECT_EQ(rf.count, rd.count);
  EXPECT_NEAR(rf.mean_loss, rd.mean_loss, 1e-6 * rd.mean_loss);
  for (int row = 0; row < rows; ++row) EXPECT_NEAR(loss_f[row], loss_d[row], 2e-6 * loss_d[row]);
  std::vector<double> grad_d(logits.size(), 0.0);
  std::vector<float> grad_f(logits.size(), 0.0f);
  xent_backward(grad_d.data(), 1.0, logits.data(), lse_d.data(), targets.data(), rows, V, Vp, 0.1, rd.count);
  xent_backward(grad_f.data(), 1.0f, logits_f.data(), lse_f.data(), targets.data(), rows, V, Vp, 0.1f, rf.count);
  // Gradients are at most ~1/count; float agrees to ~1e-6 of that.
  for (size_t k = 0; k < grad_d.size(); ++k) ASSERT_NEAR(grad_f[k], grad_d[k], 1e-7) << "entry " << k;
}

}  // namespace muse::test
