#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <complex>

#include "ops/bk.h"
#include "support/gradcheck.h"
#include "support/test_util.h"

namespace muse::test {

using cd = std::complex<double>;

// ---------------------------------------------------------------------------------------------
// Dense references.

// Inverse of the n×n complex matrix M (row-major) by Gauss-Jordan elimination with partial pivoting.
std::vector<cd> dense_inverse(std::vector<cd> M, int n) {
  std::vector<cd> inv(size_t(n) * n, cd(0));
  for (int i = 0; i < n; ++i) inv[size_t(i) * n + i] = 1;
  for (int col = 0; col < n; ++col) {
    int pivot = col;
    for (int r = col + 1; r < n; ++r)
      if (std::abs(M[size_t(r) * n + col]) > std::abs(M[size_t(pivot) * n + col])) pivot = r;
    for (int c = 0; c < n; ++c) {
      std::swap(M[size_t(col) * n + c], M[size_t(pivot) * n + c]);
      std::swap(inv[size_t(col) * n + c], inv[size_t(pivot) * n + c]);
    }
    const cd scale = 1.0 / M[size_t(col) * n + col];
    for (int c = 0; c < n; ++c) {
      M[size_t(col) * n + c] *= scale;
      inv[size_t(col) * n + c] *= scale;
    }
    for (int r = 0; r < n; ++r) {
      if (r == col) continue;
      const cd factor = M[size_t(r) * n + col];
      for (int c = 0; c < n; ++c) {
        M[size_t(r) * n + c] -= factor * M[size_t(col) * n + c];
        inv[size_t(r) * n + c] -= factor * inv[size_t(col) * n + c];
      }
    }
  }
  return inv;
}

// H − zI for the leading n sites of one sequence: diagonal a_t − z, J_t = √J2_t on the bond (t−1, t).
std::vector<cd> shifted_hamiltonian(const double* a, const double* J2, cd z, int n) {
  std::vector<cd> M(size_t(n) * n, cd(0));
  for (int t = 0; t < n; ++t) {
    M[size_t(t) * n + t] = a[t] - z;
    if (t > 0) M[size_t(t) * n + t - 1] = M[size_t(t - 1) * n + t] = std::sqrt(J2[t]);
  }
  return M;
}

// ---------------------------------------------------------------------------------------------
// The whole layer, with its inputs and outputs held in vectors.

template <typename T>
struct LayerInputs {
  int B, N, D;
  bool hopping;
  std::vector<T> u, w_v, b_v, w_J, b_J, eps_p, E0;
  BkParams<T> params() const {
    return {w_v.data(), b_v.data(), w_J.data(), b_J.data(), eps_p.data(), E0.data()};
  }
};

template <typename T>
struct LayerOutputs {
  std::vector<T> g, F, v, J, J2;
  BkSaved<T> saved() { return {v.data(), J.data(), J2.data()}; }
};

// Generic (not init-sized) parameters so every path carries a real gradient.
LayerInputs<double> random_layer_inputs(Rng& rng, int B, int N, int D, bool hopping, double w_std) {
  LayerInputs<double> in{B, N, D, hopping, {}, {}, {}, {}, {}, {}, {}};
  in.u = random_normal(size_t(B) * N * D, rng);
  in.w_v = random_normal(D, rng, w_std);
  in.b_v = {0.3};
  in.eps_p = {-0.2};
  if (hopping) {
    in.w_J = random_normal(2 * D, rng, w_std);
    in.b_J = {0.25};
    in.E0 = {0.4};
  }
  return in;
}

template <typename T>
LayerInputs<T> convert_inputs(const LayerInputs<double>& in) {
  return {in.B,           in.N,           in.D,         in.hopping,        convert<T>(in.u),
          convert<T>(in.w_v), convert<T>(in.b_v), convert<T>(in.w_J), convert<T>(in.b_J), convert<T>(in.eps_p),
          convert<T>(in.E0)};
}

template <typename T>
LayerOutputs<T> run_layer(const LayerInputs<T>& in) {
  const size_t rows = size_t(in.B) * in.N;
  LayerOutputs<T> out{std::vector<T>(2 * rows), std::vector<T>(3 * rows), std::vector<T>(rows),
                      std::vector<T>(in.hopping ? rows : 0), std::vector<T>(in.hopping ? rows : 0)};
  bk_layer_forward(out.g.data(), out.F.data(), out.saved(), in.u.data(), in.params(), in.hopping, in.B, in.N, in.D);
  return out;
}

template <typename T>
struct LayerGradients {
  std::vector<T> du, w_v, b_v, w_J, b_J, eps_p, E0;
};

template <typename T>
LayerGradients<T> run_layer_backward(const LayerInputs<T>& in, LayerOutputs<T>& out, const std::vector<T>& dg,
                                     const std::vector<T>& dF) {
  LayerGradients<T> d{std::vector<T>(in.u.size()), std::vector<T>(in.D), std::vector<T>(1),
                      std::vector<T>(2 * in.D),    std::vector<T>(1),    std::vector<T>(1),
                      std::vector<T>(1)};
  const BkGrads<T> grads{d.w_v.data(), d.b_v.data(), d.w_J.data(), d.b_J.data(), d.eps_p.data(), d.E0.data()};
  bk_layer_backward(d.du.data(), grads, dg.data(), dF.data(), in.u.data(), out.g.data(), out.saved(), in.params(),
                    in.hopping, in.B, in.N, in.D);
  return d;
}

// ---------------------------------------------------------------------------------------------
// Forward against dense inverses.

TEST(bk_forward, causal_matches_last_entry_of_leading_block_inverses) {
  Rng rng(1);
  const int B = 2, N = 12;
  const double E0 = 0.7, eta = 0.4;
  auto a = random_uniform(B * N, rng, -1.5, 2.5), J2 = random_uniform(B * N, rng, 0.2, 1.5);
  std::vector<double> g(2 * B * N);
  bk_causal_forward(g.data(), a.data(), J2.data(), E0, eta, B, N);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < N; ++t) {
      const int n = t + 1;
      const auto inv = dense_inverse(shifted_hamiltonian(&a[b * N], &J2[b * N], cd(E0, eta), n), n);
      const cd expected = inv[size_t(n) * n - 1];
      EXPECT_NEAR(g[2 * (b * N + t)], expected.real(), 2e-13) << "b=" << b << " t=" << t;
      EXPECT_NEAR(g[2 * (b * N + t) + 1], expected.imag(), 2e-13) << "b=" << b << " t=" << t;
    }
}

TEST(bk_forward, bidirectional_matches_dense_inverse) {
  Rng rng(2);
  const int B = 2, N = 12;
  const double E0 = -0.3, eta = 0.35;
  auto a = random_uniform(B * N, rng, -1.5, 2.5), J2 = random_uniform(B * N, rng, 0.2, 1.5);
  std::vector<double> G(2 * B * N), left(G.size()), right(G.size());
  bk_bidirectional_forward(G.data(), left.data(), right.data(), a.data(), J2.data(), E0, eta, B, N);
  for (int b = 0; b < B; ++b) {
    const auto inv = dense_inverse(shifted_hamiltonian(&a[b * N], &J2[b * N], cd(E0, eta), N), N);
    for (int t = 0; t < N; ++t) {
      EXPECT_NEAR(G[2 * (b * N + t)], inv[size_t(t) * N + t].real(), 1e-12) << "b=" << b << " t=" << t;
      EXPECT_NEAR(G[2 * (b * N + t) + 1], inv[size_t(t) * N + t].imag(), 1e-12) << "b=" << b << " t=" << t;
    }
    // The last site sees no future, so the bidirectional and causal values agree there.
    EXPECT_NEAR(G[2 * (b * N + N - 1)], left[2 * (b * N + N - 1)], 1e-14);
  }
}

TEST(bk_forward, pointwise_is_the_reciprocal_of_the_shifted_diagonal) {
  Rng rng(3);
  const int B = 3, N = 5;
  const double E0 = 0.2, eta = 0.6;
  auto a = random_uniform(B * N, rng, -2.0, 3.0);
  std::vector<double> g(2 * B * N), G(g.size()), left(g.size()), right(g.size());
  bk_causal_forward(g.data(), a.data(), static_cast<const double*>(nullptr), E0, eta, B, N);
  bk_bidirectional_forward(G.data(), left.data(), right.data(), a.data(), static_cast<const double*>(nullptr), E0,
                           eta, B, N);
  for (int i = 0; i < B * N; ++i) {
    const cd expected = 1.0 / (a[i] - cd(E0, eta));
    EXPECT_NEAR(g[2 * i], expected.real(), 1e-15);
    EXPECT_NEAR(g[2 * i + 1], expected.imag(), 1e-15);
    EXPECT_EQ(G[2 * i], g[2 * i]);
    EXPECT_EQ(G[2 * i + 1], g[2 * i + 1]);
  }
}

// The O(N) sweep backward against the dense formula ∂L/∂a_k = −Re Σ_i conj(G_ik²)·Ḡ_i, with
// ∂L/∂E0 = −Σ_k ∂L/∂a_k and ∂L/∂η = Σ_ik Im(conj(G_ik²)·Ḡ_i).
TEST(bk_forward, bidirectional_backward_matches_dense_formula) {
  Rng rng(4);
  const int N = 12;
  const double E0 = 0.1, eta = 0.5;
  auto a = random_uniform(N, rng, -1.5, 2.5), J2 = random_uniform(N, rng, 0.2, 1.5);
  auto dG = random_normal(2 * N, rng);
  std::vector<double> G(2 * N), left(2 * N), right(2 * N), da(N), dE0(1), deta(1);
  bk_bidirectional_forward(G.data(), left.data(), right.data(), a.data(), J2.data(), E0, eta, 1, N);
  bk_bidirectional_backward(da.data(), static_cast<double*>(nullptr), dE0.data(), deta.data(), dG.data(), G.data(),
                            left.data(), right.data(), J2.data(), 1, N);
  const auto inv = dense_inverse(shifted_hamiltonian(a.data(), J2.data(), cd(E0, eta), N), N);
  cd total(0);
  for (int k = 0; k < N; ++k) {
    cd s(0);
    for (int i = 0; i < N; ++i) {
      const cd Gik = inv[size_t(i) * N + k];
      s += std::conj(Gik * Gik) * cd(dG[2 * i], dG[2 * i + 1]);
    }
    EXPECT_NEAR(da[k], -s.real(), 1e-11) << "k=" << k;
    total += s;
  }
  EXPECT_NEAR(dE0[0], total.real(), 1e-11);
  EXPECT_NEAR(deta[0], total.imag(), 1e-11);
}

// ---------------------------------------------------------------------------------------------
// Bounds (SPEC §2.4): Im g > 0 and |g| ≤ 1/η for any real a, E0 and any J2 ≥ 0.

template <typename T>
void expect_bounded(const std::vector<T>& g, double eta, double slack, const char* what) {
  for (size_t i = 0; i < g.size() / 2; ++i) {
    EXPECT_GT(g[2 * i + 1], T(0)) << what << " at " << i;
    EXPECT_LE(std::hypot(double(g[2 * i]), double(g[2 * i + 1])), (1.0 + slack) / eta) << what << " at " << i;
  }
}

template <typename T>
void check_bounds(double slack) {
  Rng rng(5);
  const int B = 4, N = 500;
  for (double eta : {0.05, 0.3, 1.0}) {
    auto a = convert<T>(random_normal(B * N, rng, 3.0, 1.0)), J2 = convert<T>(random_uniform(B * N, rng, 0.0, 4.0));
    const T E0 = T(rng.uniform(-2, 2));
    std::vector<T> g(2 * B * N), G(g.size()), left(g.size()), right(g.size());
    bk_causal_forward(g.data(), a.data(), J2.data(), E0, T(eta), B, N);
    bk_bidirectional_forward(G.data(), left.data(), right.data(), a.data(), J2.data(), E0, T(eta), B, N);
    expect_bounded(g, eta, slack, "causal");
    expect_bounded(G, eta, slack, "bidirectional");
    expect_bounded(right, eta, slack, "right sweep");
  }
}

TEST(bk_property, imaginary_part_positive_and_modulus_at_most_one_over_eta) {
  check_bounds<double>(1e-12);
  check_bounds<float>(1e-6);
}

// ---------------------------------------------------------------------------------------------
// Gradient checks (float64, SPEC §3).

TEST(bk_grad, causal_with_hopping) {
  Rng rng(6);
  const int B = 2, N = 9;
  auto a = random_uniform(B * N, rng, -1.0, 2.5), J2 = random_uniform(B * N, rng, 0.2, 1.2);
  std::vector<double> E0{0.3}, eta{0.45};
  auto w = random_normal(2 * B * N, rng);
  auto forward = [&] {
    std::vector<double> g(2 * B * N);
    bk_causal_forward(g.data(), a.data(), J2.data(), E0[0], eta[0], B, N);
    return g;
  };
  std::vector<double> g = forward(), da(B * N), dJ2(B * N), dE0(1), deta(1);
  bk_causal_backward(da.data(), dJ2.data(), dE0.data(), deta.data(), w.data(), g.data(), J2.data(), B, N);
  expect_gradients_match([&] { return weighted_sum(forward(), w); },
                         {{"a", &a, &da}, {"J2", &J2, &dJ2}, {"E0", &E0, &dE0}, {"eta", &eta, &deta}});
}

TEST(bk_grad, pointwise) {
  Rng rng(7);
  const int B = 2, N = 7;
  auto a = random_uniform(B * N, rng, -1.0, 2.5);
  std::vector<double> E0{-0.2}, eta{0.7};
  auto w = random_normal(2 * B * N, rng);
  const double* no_hopping = nullptr;
  auto forward = [&] {
    std::vector<double> g(2 * B * N);
    bk_causal_forward(g.data(), a.data(), no_hopping, E0[0], eta[0], B, N);
    return g;
  };
  std::vector<double> g = forward(), da(B * N), dE0(1), deta(1);
  bk_causal_backward(da.data(), static_cast<double*>(nullptr), dE0.data(), deta.data(), w.data(), g.data(),
                     no_hopping, B, N);
  expect_gradients_match([&] { return weighted_sum(forward(), w); },
                         {{"a", &a, &da}, {"E0", &E0, &dE0}, {"eta", &eta, &deta}});
}

TEST(bk_grad, bidirectional) {
  Rng rng(8);
  const int B = 2, N = 9;
  auto a = random_uniform(B * N, rng, -1.0, 2.5), J2 = random_uniform(B * N, rng, 0.2, 1.2);
  std::vector<double> E0{0.5}, eta{0.4};
  auto w = random_normal(2 * B * N, rng);
  std::vector<double> G(2 * B * N), left(G.size()), right(G.size());
  auto forward = [&] {
    bk_bidirectional_forward(G.data(), left.data(), right.data(), a.data(), J2.data(), E0[0], eta[0], B, N);
    return G;
  };
  forward();
  std::vector<double> da(B * N), dJ2(B * N), dE0(1), deta(1);
  bk_bidirectional_backward(da.data(), dJ2.data(), dE0.data(), deta.data(), w.data(), G.data(), left.data(),
                            right.data(), J2.data(), B, N);
  expect_gradients_match([&] { return weighted_sum(forward(), w); },
                         {{"a", &a, &da}, {"J2", &J2, &dJ2}, {"E0", &E0, &dE0}, {"eta", &eta, &deta}});
}

TEST(bk_grad, features) {
  Rng rng(9);
  const int rows = 11;
  auto g = random_normal(2 * rows, rng, 0.8);
  std::vector<double> eta{0.6};
  auto w = random_normal(3 * rows, rng);
  auto forward = [&] {
    std::vector<double> F(3 * rows);
    bk_features_forward(F.data(), g.data(), eta[0], rows);
    return F;
  };
  std::vector<double> dg(2 * rows), deta(1);
  bk_features_backward(dg.data(), deta.data(), w.data(), g.data(), eta[0], rows);
  expect_gradients_match([&] { return weighted_sum(forward(), w); }, {{"g", &g, &dg}, {"eta", &eta, &deta}});
}

void check_layer_gradients(bool hopping) {
  Rng rng(hopping ? 10 : 11);
  LayerInputs<double> in = random_layer_inputs(rng, 2, 7, 5, hopping, 0.5);
  const size_t rows = size_t(in.B) * in.N;
  auto wg = random_normal(2 * rows, rng), wF = random_normal(3 * rows, rng);
  auto loss = [&] {
    const auto out = run_layer(in);
    return weighted_sum(out.g, wg) + weighted_sum(out.F, wF);
  };
  auto out = run_layer(in);
  auto d = run_layer_backward(in, out, wg, wF);
  std::vector<GradTensor> tensors{
      {"u", &in.u, &d.du}, {"w_v", &in.w_v, &d.w_v}, {"b_v", &in.b_v, &d.b_v}, {"eps_p", &in.eps_p, &d.eps_p}};
  if (hopping) {
    tensors.push_back({"w_J", &in.w_J, &d.w_J});
    tensors.push_back({"b_J", &in.b_J, &d.b_J});
    tensors.push_back({"E0", &in.E0, &d.E0});
  } else {
    EXPECT_EQ(d.w_J, std::vector<double>(2 * in.D, 0.0));  // Phase 7 has no hopping and no E0.
    EXPECT_EQ(d.E0[0], 0.0);
  }
  expect_gradients_match(loss, tensors);
}

TEST(bk_grad, layer_with_hopping) { check_layer_gradients(true); }
TEST(bk_grad, layer_pointwise) { check_layer_gradients(false); }

TEST(bk_grad, gate) {
  Rng rng(12);
  const int rows = 10;
  for (int k : {4, 1}) {
    auto F = random_uniform(3 * rows, rng, -0.9, 0.9);
    auto W = random_normal(3 * k, rng, 1.5), b = random_normal(k, rng, 0.5, 1.0);
    auto w = random_normal(rows * k, rng);
    auto forward = [&] {
      std::vector<double> out(rows * k);
      bk_gate_forward(out.data(), F.data(), W.data(), b.data(), rows, k);
      return out;
    };
    auto out = forward();
    std::vector<double> dF(F.size()), dW(W.size()), db(k);
    bk_gate_backward(dF.data(), dW.data(), db.data(), w.data(), out.data(), F.data(), W.data(), rows, k);
    SCOPED_TRACE("k=" + std::to_string(k));
    expect_gradients_match([&] { return weighted_sum(forward(), w); }, {{"F", &F, &dF}, {"W", &W, &dW}, {"b", &b, &db}});
  }
}

// ---------------------------------------------------------------------------------------------
// Causality of the layer u → F.

template <typename T>
void check_layer_causal(bool hopping) {
  Rng rng(13);
  const int B = 2, N = 10, D = 6;
  const LayerInputs<T> in = convert_inputs<T>(random_layer_inputs(rng, B, N, D, hopping, 0.5));
  auto op = [&](const std::vector<T>& u) {
    LayerInputs<T> perturbed = in;
    perturbed.u = u;
    return run_layer(perturbed).F;
  };
  expect_causal<T>(op, in.u, B, N, D, 3, hopping ? "BK layer with hopping" : "BK layer, pointwise");
}

TEST(bk_causal, layer_with_hopping) {
  check_layer_causal<double>(true);
  check_layer_causal<float>(true);
}

TEST(bk_causal, layer_pointwise) {
  check_layer_causal<double>(false);
  check_layer_causal<float>(false);
}

// Phase 7: perturbing u at position j changes F at position j and nowhere else.
TEST(bk_causal, layer_pointwise_touches_only_its_own_position) {
  Rng rng(14);
  const int B = 2, N = 8, D = 4;
  const LayerInputs<double> in = random_layer_inputs(rng, B, N, D, false, 0.5);
  const auto base = run_layer(in).F;
  for (int j = 0; j < N; ++j) {
    LayerInputs<double> perturbed = in;
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < D; ++i) perturbed.u[(size_t(b) * N + j) * D + i] += 0.5 + 0.1 * i;
    const auto F = run_layer(perturbed).F;
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < N; ++t) {
        bool changed = false;
        for (int c = 0; c < 3; ++c) changed |= F[(size_t(b) * N + t) * 3 + c] != base[(size_t(b) * N + t) * 3 + c];
        EXPECT_EQ(changed, t == j) << "perturbed j=" << j << ", looked at t=" << t << ", batch " << b;
      }
  }
}

// With hopping, the layer is a real sequence mixer: a perturbation reaches later positions.
TEST(bk_causal, hopping_mixes_the_sequence) {
  Rng rng(15);
  const int B = 1, N = 8, D = 4;
  const LayerInputs<double> in = random_layer_inputs(rng, B, N, D, true, 0.5);
  const auto base = run_layer(in).F;
  LayerInputs<double> perturbed = in;
  for (int i = 0; i < D; ++i) perturbed.u[i] += 0.5;
  const auto F = run_layer(perturbed).F;
  // F_3 sees u_0 only through the recurrence (J_3 and a_3 depend on u_2, u_3).
  EXPECT_GT(std::abs(F[3 * 3 + 1] - base[3 * 3 + 1]), 1e-6);
}

// ---------------------------------------------------------------------------------------------
// Float against double at a realistic size, forward and backward.

// Largest |x − y| / (|y| + floor) over the entries.
template <typename T>
double max_relative_error(const std::vector<T>& x, const std::vector<double>& y, double floor) {
  double worst = 0;
  for (size_t i = 0; i < y.size(); ++i)
    worst = std::max(worst, std::abs(double(x[i]) - y[i]) / (std::abs(y[i]) + floor));
  return worst;
}

// Largest |x − y| over the largest |y|: for gradients, whose small entries come from cancellation.
template <typename T>
double max_error_over_scale(const std::vector<T>& x, const std::vector<double>& y) {
  double worst = 0, scale = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    worst = std::max(worst, std::abs(double(x[i]) - y[i]));
    scale = std::max(scale, std::abs(y[i]));
  }
  return worst / std::max(scale, 1e-3);
}

// Measured (seed 16): g, F ≤ 1.8e-6 relative; du ≤ 2.5e-6 of its largest entry; parameter gradients
// ≤ 1e-6 of their size except eps_p (3e-5: a sum over 4096 tokens with heavy cancellation).
TEST(bk_forward, float_matches_double_layer) {
  Rng rng(16);
  const int B = 2, N = 2048, D = 64;
  for (bool hopping : {true, false}) {
    SCOPED_TRACE(hopping ? "hopping" : "pointwise");
    const LayerInputs<double> in = random_layer_inputs(rng, B, N, D, hopping, 0.15);
    const LayerInputs<float> in_f = convert_inputs<float>(in);
    auto out = run_layer(in);
    auto out_f = run_layer(in_f);
    EXPECT_LT(max_relative_error(out_f.g, out.g, 1.0), 5e-6);
    EXPECT_LT(max_relative_error(out_f.F, out.F, 1.0), 5e-6);

    const size_t rows = size_t(B) * N;
    auto wg = random_normal(2 * rows, rng), wF = random_normal(3 * rows, rng);
    auto d = run_layer_backward(in, out, wg, wF);
    auto d_f = run_layer_backward(in_f, out_f, convert<float>(wg), convert<float>(wF));
    EXPECT_LT(max_error_over_scale(d_f.du, d.du), 1e-5);
    EXPECT_LT(max_error_over_scale(d_f.w_v, d.w_v), 1e-5);
    EXPECT_LT(max_error_over_scale(d_f.b_v, d.b_v), 1e-5);
    EXPECT_LT(max_error_over_scale(d_f.eps_p, d.eps_p), 2e-4);
    if (hopping) {
      EXPECT_LT(max_error_over_scale(d_f.w_J, d.w_J), 1e-5);
      EXPECT_LT(max_error_over_scale(d_f.b_J, d.b_J), 1e-5);
      EXPECT_LT(max_error_over_scale(d_f.E0, d.E0), 1e-5);
    }
  }
}

TEST(bk_forward, float_matches_double_long_causal_scan) {
  Rng rng(17);
  const int B = 2, N = 16384;
  const double E0 = 0.2, eta = 0.3;
  auto a = random_normal(B * N, rng, 1.5, 1.0), J2 = random_uniform(B * N, rng, 0.0, 1.0);
  std::vector<double> g(2 * B * N);
  bk_causal_forward(g.data(), a.data(), J2.data(), E0, eta, B, N);
  std::vector<float> g_f(g.size());
  bk_causal_forward(g_f.data(), convert<float>(a).data(), convert<float>(J2).data(), float(E0), float(eta), B, N);
  // Rounding does not grow along the scan: with J2 ≤ 1 it contracts at most sites.
  EXPECT_LT(max_relative_error(g_f, g, 1.0), 2e-6);  // measured 5.1e-7
}

TEST(bk_forward, float_matches_double_gate) {
  Rng rng(18);
  const int rows = 4096, k = 8;
  auto F = random_uniform(3 * rows, rng, -1, 1), W = random_normal(3 * k, rng), b = random_normal(k, rng);
  std::vector<double> out(rows * k);
  bk_gate_forward(out.data(), F.data(), W.data(), b.data(), rows, k);
  std::vector<float> out_f(out.size());
  bk_gate_forward(out_f.data(), convert<float>(F).data(), convert<float>(W).data(), convert<float>(b).data(), rows, k);
  EXPECT_LT(max_relative_error(out_f, out, 1e-3), 2e-6);  // measured 3.8e-7
}

// ---------------------------------------------------------------------------------------------
// Scalar gradients are reduced in a fixed order: bit-identical for any thread count.

TEST(bk_backward, scalar_gradients_do_not_depend_on_thread_count) {
  Rng rng(19);
  const LayerInputs<float> in = convert_inputs<float>(random_layer_inputs(rng, 8, 256, 16, true, 0.3));
  const size_t rows = size_t(in.B) * in.N;
  const auto wg = convert<float>(random_normal(2 * rows, rng)), wF = convert<float>(random_normal(3 * rows, rng));
  const int threads = omp_get_max_threads();
  std::vector<LayerGradients<float>> results;
  for (int n : {1, 2, 3}) {
    omp_set_num_threads(n);
    auto out = run_layer(in);
    results.push_back(run_layer_backward(in, out, wg, wF));
  }
  omp_set_num_threads(threads);
  for (size_t i = 1; i < results.size(); ++i) {
    EXPECT_EQ(results[i].eps_p, results[0].eps_p);
    EXPECT_EQ(results[i].E0, results[0].E0);
    EXPECT_EQ(results[i].b_J, results[0].b_J);
    EXPECT_EQ(results[i].b_v, results[0].b_v);
    EXPECT_EQ(results[i].du, results[0].du);
  }
}

}  // namespace muse::test
