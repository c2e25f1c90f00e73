#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "ops/ffn.h"
#include "support/ffn_params.h"
#include "support/gradcheck.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

double naive_gelu(double a) { return 0.5 * a * (1 + std::erf(a / std::sqrt(2.0))); }

// y[o] = b[o] + Σ_i W[o, i]·x[i] for one row.
std::vector<double> naive_affine(const std::vector<double>& W, const double* b, const double* x, int in, int out) {
  std::vector<double> y(out);
  for (int o = 0; o < out; ++o) {
    double s = b ? b[o] : 0.0;
    for (int i = 0; i < in; ++i) s += W[(size_t)o * in + i] * x[i];
    y[o] = s;
  }
  return y;
}

using LowRank = RandomLowRankFfn<double>;

// Runs the op forward in type T on double inputs; also returns the saved buffers.
template <typename T>
struct LowRankRun {
  std::vector<T> y, low1, pre, hidden, low2;
  LowRankFfnSaved<T> saved() { return {low1.data(), pre.data(), hidden.data(), low2.data()}; }
};

template <typename T>
LowRankRun<T> run_lowrank(const std::vector<T>& x, const std::vector<T>& V1, const std::vector<T>& U1,
                          const std::vector<T>& b1, const std::vector<T>& V2, const std::vector<T>& U2,
                          const std::vector<T>& b2, int rows, int D, int rank) {
  const int F = ffn_hidden(D);
  LowRankRun<T> run{std::vector<T>((size_t)rows * D), std::vector<T>((size_t)rows * rank),
                    std::vector<T>((size_t)rows * F), std::vector<T>((size_t)rows * F),
                    std::vector<T>((size_t)rows * rank)};
  const LowRankFfnParams<T> p{V1.data(), U1.data(), b1.data(), V2.data(), U2.data(), b2.data()};
  lowrank_ffn_forward<T>(run.y.data(), run.saved(), x.data(), p, rows, D, rank);
  return run;
}

struct Dense {
  int D, F;
  std::vector<double> W1, b1, W2, b2;
  Dense(int D_, Rng& rng) : D(D_), F(ffn_hidden(D_)) {
    W1 = random_normal(size_t(F) * D, rng, 1.5 / std::sqrt(double(D)));
    b1 = random_normal(F, rng, 0.5);
    W2 = random_normal(size_t(D) * F, rng, 1.0 / std::sqrt(double(F)));
    b2 = random_normal(D, rng, 0.5);
  }
};

template <typename T>
struct DenseRun {
  std::vector<T> y, pre, hidden;
  DenseMlpSaved<T> saved() { return {pre.data(), hidden.data()}; }
};

template <typename T>
DenseRun<T> run_dense(const std::vector<T>& x, const std::vector<T>& W1, const std::vector<T>& b1,
                      const std::vector<T>& W2, const std::vector<T>& b2, int rows, int D) {
  const int F = ffn_hidden(D);
  DenseRun<T> run{std::vector<T>((size_t)rows * D), std::vector<T>((size_t)rows * F),
                  std::vector<T>((size_t)rows * F)};
  const DenseMlpParams<T> p{W1.data(), b1.data(), W2.data(), b2.data()};
  dense_mlp_forward<T>(run.y.data(), run.saved(), x.data(), p, rows, D);
  return run;
}

}  // namespace

TEST(ffn_forward, lowrank_matches_naive_loops) {
  Rng rng(11);
  const int rows = 7, D = 12, rank = 5;
  LowRank m(D, rank, rng);
  auto x = random_normal(size_t(rows) * D, rng, 1.5);
  auto run = run_lowrank<double>(x, m.V1, m.U1, m.b1, m.V2, m.U2, m.b2, rows, D, rank);
  double largest_gelu = 0;
  for (int r = 0; r < rows; ++r) {
    const double* xr = x.data() + (size_t)r * D;
    auto low1 = naive_affine(m.V1, nullptr, xr, D, rank);
    auto pre = naive_affine(m.U1, m.b1.data(), low1.data(), rank, m.F);
    std::vector<double> hidden(m.F);
    for (int j = 0; j < m.F; ++j) {
      const double g = naive_gelu(pre[j]);
      largest_gelu = std::max(largest_gelu, std::abs(g));
      hidden[j] = 10 * std::tanh(g / 10);
    }
    auto low2 = naive_affine(m.V2, nullptr, hidden.data(), m.F, rank);
    auto y = naive_affine(m.U2, m.b2.data(), low2.data(), rank, D);
    for (int i = 0; i < D; ++i) EXPECT_NEAR(run.y[(size_t)r * D + i], y[i], 1e-12) << "row " << r << " col " << i;
  }
  // The comparison only pins the cap if some hidden units are deep in it.
  EXPECT_GT(largest_gelu, 10.0);
}

TEST(ffn_forward, dense_matches_naive_loops) {
  Rng rng(12);
  const int rows = 6, D = 10;
  Dense m(D, rng);
  auto x = random_normal(size_t(rows) * D, rng, 1.5);
  auto run = run_dense<double>(x, m.W1, m.b1, m.W2, m.b2, rows, D);
  for (int r = 0; r < rows; ++r) {
    auto pre = naive_affine(m.W1, m.b1.data(), x.data() + (size_t)r * D, D, m.F);
    std::vector<double> hidden(m.F);
    for (int j = 0; j < m.F; ++j) hidden[j] = naive_gelu(pre[j]);
    auto y = naive_affine(m.W2, m.b2.data(), hidden.data(), m.F, D);
    for (int i = 0; i < D; ++i) EXPECT_NEAR(run.y[(size_t)r * D + i], y[i], 1e-12) << "row " << r << " col " << i;
  }
}

TEST(ffn_grad, lowrank_input_and_all_parameters) {
  Rng rng(13);
  const int rows = 5, D = 6, rank = 3;
  LowRank m(D, rank, rng);
  auto x = random_normal(size_t(rows) * D, rng, 1.5);
  auto w = random_normal(size_t(rows) * D, rng);
  auto loss = [&] {
    return weighted_sum(run_lowrank<double>(x, m.V1, m.U1, m.b1, m.V2, m.U2, m.b2, rows, D, rank).y, w);
  };
  auto run = run_lowrank<double>(x, m.V1, m.U1, m.b1, m.V2, m.U2, m.b2, rows, D, rank);
  std::vector<double> dx(x.size()), dV1(m.V1.size()), dU1(m.U1.size()), db1(m.b1.size()), dV2(m.V2.size()),
      dU2(m.U2.size()), db2(m.b2.size());
  const LowRankFfnGrads<double> grads{dV1.data(), dU1.data(), db1.data(), dV2.data(), dU2.data(), db2.data()};
  lowrank_ffn_backward<double>(dx.data(), grads, w.data(), run.saved(), x.data(), m.params(), rows, D, rank);
  expect_gradients_match(loss, {{"x", &x, &dx},
                                {"V1", &m.V1, &dV1},
                                {"U1", &m.U1, &dU1},
                                {"b1", &m.b1, &db1},
                                {"V2", &m.V2, &dV2},
                                {"U2", &m.U2, &dU2},
                                {"b2", &m.b2, &db2}});
}

TEST(ffn_grad, lowrank_backward_accumulates) {
  Rng rng(14);
  const int rows = 3, D = 4, rank = 2;
  LowRank m(D, rank, rng);
  auto x = random_normal(size_t(rows) * D, rng);
  auto dy = random_normal(size_t(rows) * D, rng);
  auto run = run_lowrank<double>(x, m.V1, m.U1, m.b1, m.V2, m.U2, m.b2, rows, D, rank);
  std::vector<double> dx_once(x.size()), dU1_once(m.U1.size());
  lowrank_ffn_backward<double>(dx_once.data(), {nullptr, dU1_once.data(), nullptr, nullptr, nullptr, nullptr},
                               dy.data(), run.saved(), x.data(), m.params(), rows, D, rank);
  std::vector<double> dx_twice(x.size(), 0.0), dU1_twice(m.U1.size(), 0.0);
  for (int k = 0; k < 2; ++k)
    lowrank_ffn_backward<double>(dx_twice.data(), {nullptr, dU1_twice.data(), nullptr, nullptr, nullptr, nullptr},
                                 dy.data(), run.saved(), x.data(), m.params(), rows, D, rank);
  for (size_t i = 0; i < dx_once.size(); ++i) EXPECT_NEAR(dx_twice[i], 2 * dx_once[i], 1e-12);
  for (size_t i = 0; i < dU1_once.size(); ++i) EXPECT_NEAR(dU1_twice[i], 2 * dU1_once[i], 1e-12);
}

TEST(ffn_grad, dense_input_and_all_parameters) {
  Rng rng(15);
  const int rows = 5, D = 6;
  Dense m(D, rng);
  auto x = random_normal(size_t(rows) * D, rng, 1.5);
  auto w = random_normal(size_t(rows) * D, rng);
  auto loss = [&] { return weighted_sum(run_dense<double>(x, m.W1, m.b1, m.W2, m.b2, rows, D).y, w); };
  auto run = run_dense<double>(x, m.W1, m.b1, m.W2, m.b2, rows, D);
  std::vector<double> dx(x.size()), dW1(m.W1.size()), db1(m.b1.size()), dW2(m.W2.size()), db2(m.b2.size());
  const DenseMlpGrads<double> grads{dW1.data(), db1.data(), dW2.data(), db2.data()};
  const DenseMlpParams<double> params{m.W1.data(), m.b1.data(), m.W2.data(), m.b2.data()};
  dense_mlp_backward<double>(dx.data(), grads, w.data(), run.saved(), x.data(), params, rows, D);
  expect_gradients_match(loss, {{"x", &x, &dx},
                                {"W1", &m.W1, &dW1},
                                {"b1", &m.b1, &db1},
                                {"W2", &m.W2, &dW2},
                                {"b2", &m.b2, &db2}});
}

// phase8-small's FFN width (D = 512, ρ = 64) on 32 rows. Outputs are O(1); float accumulates ~10³-term
// dot products, so 2e-5 absolute (≈ 100 float ulps at 1) is the stated tolerance, forward and dx.
TEST(ffn_forward, lowrank_float_matches_double) {
  Rng rng(16);
  const int rows = 32, D = 512, rank = 64;
  LowRank m(D, rank, rng);
  auto x = random_normal(size_t(rows) * D, rng);
  auto dy = random_normal(size_t(rows) * D, rng);
  auto rd = run_lowrank<double>(x, m.V1, m.U1, m.b1, m.V2, m.U2, m.b2, rows, D, rank);
  auto rf = run_lowrank<float>(convert<float>(x), convert<float>(m.V1), convert<float>(m.U1), convert<float>(m.b1),
                               convert<float>(m.V2), convert<float>(m.U2), convert<float>(m.b2), rows, D, rank);
  double worst = 0;
  for (size_t i = 0; i < rd.y.size(); ++i) worst = std::max(worst, std::abs(double(rf.y[i]) - rd.y[i]));
  EXPECT_LT(worst, 2e-5);

  std::vector<double> dxd(x.size());
  lowrank_ffn_backward<double>(dxd.data(), {}, dy.data(), rd.saved(), x.data(), m.params(), rows, D, rank);
  auto xf = convert<float>(x), dyf = convert<float>(dy), V1f = convert<float>(m.V1), U1f = convert<float>(m.U1),
       b1f = convert<float>(m.b1), V2f = convert<float>(m.V2), U2f = convert<float>(m.U2), b2f = convert<float>(m.b2);
  std::vector<float> dxf(x.size());
  const LowRankFfnParams<float> pf{V1f.data(), U1f.data(), b1f.data(), V2f.data(), U2f.data(), b2f.data()};
  lowrank_ffn_backward<float>(dxf.data(), {}, dyf.data(), rf.saved(), xf.data(), pf, rows, D, rank);
  worst = 0;
  for (size_t i = 0; i < dxd.size(); ++i) worst = std::max(worst, std::abs(double(dxf[i]) - dxd[i]));
  EXPECT_LT(worst, 2e-5);
}

TEST(ffn_forward, dense_float_matches_double) {
  Rng rng(17);
  const int rows = 32, D = 256;
  Dense m(D, rng);
  auto x = random_normal(size_t(rows) * D, rng);
  auto rd = run_dense<double>(x, m.W1, m.b1, m.W2, m.b2, rows, D);
  auto rf = run_dense<float>(convert<float>(x), convert<float>(m.W1), convert<float>(m.b1), convert<float>(m.W2),
                             convert<float>(m.b2), rows, D);
  double worst = 0;
  for (size_t i = 0; i < rd.y.size(); ++i) worst = std::max(worst, std::abs(double(rf.y[i]) - rd.y[i]));
  EXPECT_LT(worst, 2e-5);
}

}  // namespace muse::test
