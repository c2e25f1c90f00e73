#include "ops/bk.h"

#include <cmath>
#include <complex>
#include <vector>

#include "common/math.h"
#include "ops/linear.h"

namespace muse {

namespace {

template <typename T>
using Complex = std::complex<T>;

template <typename T>
Complex<T> load(const T* p, long i) {
  return {p[2 * i], p[2 * i + 1]};
}

template <typename T>
void store(T* p, long i, Complex<T> x) {
  p[2 * i] = x.real();
  p[2 * i + 1] = x.imag();
}

// 1/x written out: std::complex division goes through the libgcc __divdc3 call, which guards against
// overflow we cannot have here (|x| ≥ η > 0) and is several times slower.
template <typename T>
Complex<T> reciprocal(Complex<T> x) {
  const T n = x.real() * x.real() + x.imag() * x.imag();
  return {x.real() / n, -x.imag() / n};
}

// Sums per-batch partials in batch order so the scalar gradient does not depend on the thread count.
template <typename T>
void add_in_order(T* out, const std::vector<T>& partials) {
  if (!out) return;
  T sum = 0;
  for (T p : partials) sum += p;
  *out += sum;
}

template <typename T>
T eta_of(T eps_p) {
  return softplus(eps_p) + T(kBkEtaFloor);
}

constexpr double kPotentialCap = 5.0;  // v = cap_5(w_v·u + b_v)

}  // namespace

// ---------------------------------------------------------------------------------------------
template <typename T>
void bk_causal_forward(T* g, const T* a, const T* J2, T E0, T eta, int B, int N) {
  const Complex<T> z(E0, eta);
#pragma omp parallel for schedule(static)
  for (int b = 0; b < B; ++b) {
    const long base = (long)b * N;
    Complex<T> previous(0, 0);
    for (int t = 0; t < N; ++t) {
      Complex<T> denominator = a[base + t] - z;
      if (J2 && t > 0) denominator -= J2[base + t] * previous;
      previous = reciprocal(denominator);
      store(g, base + t, previous);
    }
  }
}

template <typename T>
void bk_causal_backward(T* da, T* dJ2, T* dE0, T* deta, const T* dg, const T* g, const T* J2, int B, int N) {
  std::vector<T> dE0_partial(B, T(0)), deta_partial(B, T(0));
#pragma omp parallel for schedule(static)
  for (int b = 0; b < B; ++b) {
    const long base = (long)b * N;
    Complex<T> lambda(0, 0), next_g(0, 0);
    T sum_re = 0, sum_im = 0;
    for (int t = N - 1; t >= 0; --t) {
      const Complex<T> gt = load(g, base + t);
      lambda = load(dg, base + t) + (J2 && t + 1 < N ? std::conj(J2[base + t + 1] * next_g * next_g) * lambda
                                                     : Complex<T>(0, 0));
      const Complex<T> w = std::conj(gt * gt) * lambda;  // = ∂L/∂z (as ∂/∂Re + i ∂/∂Im)
      if (da) da[base + t] -= w.real();
      if (dJ2 && J2 && t > 0) dJ2[base + t] += (std::conj(load(g, base + t - 1)) * w).real();
      sum_re += w.real();
      sum_im += w.imag();
      next_g = gt;
    }
    dE0_partial[b] = sum_re;
    deta_partial[b] = sum_im;
  }
  add_in_order(dE0, dE0_partial);
  add_in_order(deta, deta_partial);
}

// ---------------------------------------------------------------------------------------------
template <typename T>
void bk_bidirectional_forward(T* G, T* left, T* right, const T* a, const T* J2, T E0, T eta, int B, int N) {
  const Complex<T> z(E0, eta);
  // J2 on bond (t−1, t), zero outside the chain or without bonds.
  auto bond = [&](long base, int t) { return (J2 && t > 0 && t < N) ? J2[base + t] : T(0); };
#pragma omp parallel for schedule(static)
  for (int b = 0; b < B; ++b) {
    const long base = (long)b * N;
    Complex<T> carry(0, 0);
    for (int t = 0; t < N; ++t) {
      carry = reciprocal(a[base + t] - z - bond(base, t) * carry);
      store(left, base + t, carry);
    }
    carry = Complex<T>(0, 0);
    for (int t = N - 1; t >= 0; --t) {
      carry = reciprocal(a[base + t] - z - bond(base, t + 1) * carry);
      store(right, base + t, carry);
    }
    for (int t = 0; t < N; ++t) {
      Complex<T> denominator = a[base + t] - z;
      if (t > 0) denominator -= bond(base, t) * load(left, base + t - 1);
      if (t + 1 < N) denominator -= bond(base, t + 1) * load(right, base + t + 1);
      store(G, base + t, reciprocal(denominator));
    }
  }
}

template <typename T>
void bk_bidirectional_backward(T* da, T* dJ2, T* dE0, T* deta, const T* dG, const T* G, const T* left,
                               const T* right, const T* J2, int B, int N) {
  auto bond = [&](long base, int t) { return (J2 && t > 0 && t < N) ? J2[base + t] : T(0); };
  std::vector<T> dE0_partial(B, T(0)), deta_partial(B, T(0));
#pragma omp parallel for schedule(static)
  for (int b = 0; b < B; ++b) {
    const long base = (long)b * N;
    auto w_at = [&](int t) {
      const Complex<T> Gt = load(G, base + t);
      return std::conj(Gt * Gt) * load(dG, base + t);
    };
    // A_t: the adjoint of the left sweep seeded by every G_i, i ≥ t (see the header).
    std::vector<Complex<T>> A(N);
    Complex<T> carry(0, 0);
    for (int t = N - 1; t >= 0; --t) {
      const Complex<T> lt = load(left, base + t);
      carry = w_at(t) + bond(base, t + 1) * std::conj(lt * lt) * carry;
      A[t] = carry;
    }
    T sum_re = 0, sum_im = 0;
    Complex<T> C_previous(0, 0);
    for (int t = 0; t < N; ++t) {
      const Complex<T> rt = load(right, base + t);
      const Complex<T> w = w_at(t);
      const Complex<T> C = w + bond(base, t) * std::conj(rt * rt) * C_previous;
      const Complex<T> s = A[t] + C - w;
      if (da) da[base + t] -= s.real();
      if (dJ2 && J2 && t > 0)
        dJ2[base + t] += (std::conj(load(left, base + t - 1)) * A[t]).real() + (std::conj(rt) * C_previous).real();
      sum_re += s.real();
      sum_im += s.imag();
      C_previous = C;
    }
    dE0_partial[b] = sum_re;
    deta_partial[b] = sum_im;
  }
  add_in_order(dE0, dE0_partial);
  add_in_order(deta, deta_partial);
}

// ---------------------------------------------------------------------------------------------
template <typename T>
void bk_features_forward(T* F, const T* g, T eta, int rows) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T re = g[2L * r], im = g[2L * r + 1];
    F[3L * r] = eta * re;
    F[3L * r + 1] = eta * im;
    F[3L * r + 2] = eta * std::hypot(re, im);
  }
}

template <typename T>
void bk_features_backward(T* dg, T* deta, const T* dF, const T* g, T eta, int rows) {
  if (dg) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; ++r) {
      const T re = g[2L * r], im = g[2L * r + 1];
      const T modulus = std::hypot(re, im);  // > 0: g = 1/(finite denominator)
      const T d_modulus = dF[3L * r + 2];
      dg[2L * r] += eta * (dF[3L * r] + d_modulus * re / modulus);
      dg[2L * r + 1] += eta * (dF[3L * r + 1] + d_modulus * im / modulus);
    }
  }
  if (deta) {
    T sum = 0;
    for (int r = 0; r < rows; ++r) {
      const T re = g[2L * r], im = g[2L * r + 1];
      sum += dF[3L * r] * re + dF[3L * r + 1] * im + dF[3L * r + 2] * std::hypot(re, im);
    }
    *deta += sum;
  }
}

// ---------------------------------------------------------------------------------------------
template <typename T>
void bk_layer_forward(T* g, T* F, const BkSaved<T>& saved, const T* u, const BkParams<T>& params, bool hopping,
                      int B, int N, int D) {
  const int rows = B * N;
  const T cap_v = T(kPotentialCap);
  linear_forward(saved.v, u, params.w_v, params.b_v, rows, D, 1);
  std::vector<T> a(rows);
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    saved.v[r] = cap(saved.v[r], cap_v);
    a[r] = T(1) + saved.v[r];
  }
  if (hopping) {
    // w_J viewed as [2, D]: column 0 of `halves` is w_J,prev·u_t (used at t + 1), column 1 is w_J,cur·u_t.
    std::vector<T> halves(2L * rows);
    linear_forward(halves.data(), u, params.w_J, static_cast<const T*>(nullptr), rows, D, 2);
    const T j_max = params.j_max, b_J = *params.b_J;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; ++r) {
      const int t = r % N;
      const T pre = halves[2L * r + 1] + b_J + (t > 0 ? halves[2L * (r - 1)] : T(0));
      saved.J[r] = j_max * std::tanh(pre);
      saved.J2[r] = saved.J[r] * saved.J[r];
    }
  }
  const T eta = eta_of(*params.eps_p);
  const T E0 = hopping ? *params.E0 : T(0);
  bk_causal_forward(g, a.data(), hopping ? saved.J2 : static_cast<const T*>(nullptr), E0, eta, B, N);
  bk_features_forward(F, g, eta, rows);
}

template <typename T>
void bk_layer_backward(T* du, const BkGrads<T>& grads, const T* dg, const T* dF, const T* u, const T* g,
                       const BkSaved<T>& saved, const BkParams<T>& params, bool hopping, int B, int N, int D) {
  const int rows = B * N;
  const T eta = eta_of(*params.eps_p);

  std::vector<T> g_bar(2L * rows, T(0));
  if (dg)
    for (long i = 0; i < 2L * rows; ++i) g_bar[i] = dg[i];
  T d_eta = 0, d_E0 = 0;
  if (dF) bk_features_backward(g_bar.data(), &d_eta, dF, g, eta, rows);

  std::vector<T> d_pre_v(rows, T(0)), dJ2(hopping ? rows : 0, T(0));
  bk_causal_backward(d_pre_v.data(), hopping ? dJ2.data() : static_cast<T*>(nullptr), &d_E0, &d_eta, g_bar.data(),
                     g, hopping ? saved.J2 : static_cast<const T*>(nullptr), B, N);

  // d_pre_v holds ∂L/∂a = ∂L/∂v; through the cap: ∂v/∂pre = 1 − (v/5)².
  const T cap_v = T(kPotentialCap);
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T ratio = saved.v[r] / cap_v;
    d_pre_v[r] *= T(1) - ratio * ratio;
  }
  linear_backward(du, grads.w_v, grads.b_v, d_pre_v.data(), u, params.w_v, rows, D, 1);

  if (hopping) {
    // ∂J2/∂pre = 2J·J_max·(1 − (J/J_max)²); J2 at t = 0 is unused by the scan, so its pre gets nothing.
    const T j_max = params.j_max;
    std::vector<T> d_pre_J(rows);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; ++r) {
      const T ratio = saved.J[r] / j_max;
      d_pre_J[r] = (r % N == 0) ? T(0) : dJ2[r] * T(2) * saved.J[r] * j_max * (T(1) - ratio * ratio);
    }
    std::vector<T> d_halves(2L * rows);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; ++r) {
      const int t = r % N;
      d_halves[2L * r] = t + 1 < N ? d_pre_J[r + 1] : T(0);
      d_halves[2L * r + 1] = d_pre_J[r];
    }
    linear_backward(du, grads.w_J, static_cast<T*>(nullptr), d_halves.data(), u, params.w_J, rows, D, 2);
    if (grads.b_J) {
      T sum = 0;
      for (int r = 0; r < rows; ++r) sum += d_pre_J[r];
      *grads.b_J += sum;
    }
    if (grads.E0) *grads.E0 += d_E0;
  }
  if (grads.eps_p) *grads.eps_p += d_eta * sigmoid(*params.eps_p);
}

// ---------------------------------------------------------------------------------------------
template <typename T>
void bk_decode_prefill(T* g_prev, T* prev_half, const T* u, const T* g, const BkParams<T>& params, bool hopping, int N,
                       int D) {
  const long last = N - 1;
  g_prev[0] = g[2 * last];
  g_prev[1] = g[2 * last + 1];
  // w_J viewed as [2, D]: its first row is w_J,prev.
  if (hopping) linear_forward(prev_half, u + last * D, params.w_J, static_cast<const T*>(nullptr), 1, D, 1);
}

template <typename T>
void bk_decode_step(T* g, T* F, T* g_prev, T* prev_half, const T* u, const BkParams<T>& params, bool hopping, int B,
                    int D) {
  std::vector<T> v(B), halves(hopping ? 2L * B : 0);
  linear_forward(v.data(), u, params.w_v, params.b_v, B, D, 1);
  if (hopping) linear_forward(halves.data(), u, params.w_J, static_cast<const T*>(nullptr), B, D, 2);
  const T eta = eta_of(*params.eps_p);
  const Complex<T> z(hopping ? *params.E0 : T(0), eta);
  for (int b = 0; b < B; ++b) {
    Complex<T> denominator = (T(1) + cap(v[b], T(kPotentialCap))) - z;
    if (hopping) {
      const T J = params.j_max * std::tanh(halves[2L * b + 1] + *params.b_J + prev_half[b]);
      denominator -= (J * J) * load(g_prev, b);
      prev_half[b] = halves[2L * b];
    }
    const Complex<T> gb = reciprocal(denominator);
    store(g, b, gb);
    store(g_prev, b, gb);
  }
  bk_features_forward(F, g, eta, B);
}

// ---------------------------------------------------------------------------------------------
template <typename T>
void bk_gate_forward(T* out, const T* F, const T* W, const T* b, int rows, int k) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* f = F + 3L * r;
    for (int j = 0; j < k; ++j)
      out[(long)r * k + j] = sigmoid(W[3 * j] * f[0] + W[3 * j + 1] * f[1] + W[3 * j + 2] * f[2] + b[j]);
  }
}

template <typename T>
void bk_gate_backward(T* dF, T* dW, T* db, const T* dout, const T* out, const T* F, const T* W, int rows, int k) {
  auto slope = [&](long i) { return dout[i] * out[i] * (T(1) - out[i]); };
  if (dF) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < k; ++j) {
        const T s = slope((long)r * k + j);
        for (int c = 0; c < 3; ++c) dF[3L * r + c] += s * W[3 * j + c];
      }
  }
  if (dW || db) {
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < k; ++j) {
        const T s = slope((long)r * k + j);
        if (dW)
          for (int c = 0; c < 3; ++c) dW[3 * j + c] += s * F[3L * r + c];
        if (db) db[j] += s;
      }
  }
}

// ---------------------------------------------------------------------------------------------
#define MUSE_BK_INSTANTIATE(T)                                                                                   \
  template void bk_causal_forward<T>(T*, const T*, const T*, T, T, int, int);                                   \
  template void bk_causal_backward<T>(T*, T*, T*, T*, const T*, const T*, const T*, int, int);                  \
  template void bk_bidirectional_forward<T>(T*, T*, T*, const T*, const T*, T, T, int, int);                    \
  template void bk_bidirectional_backward<T>(T*, T*, T*, T*, const T*, const T*, const T*, const T*, const T*, \
                                             int, int);                                                         \
  template void bk_features_forward<T>(T*, const T*, T, int);                                                    \
  template void bk_features_backward<T>(T*, T*, const T*, const T*, T, int);                                     \
  template void bk_layer_forward<T>(T*, T*, const BkSaved<T>&, const T*, const BkParams<T>&, bool, int, int,   \
                                    int);                                                                        \
  template void bk_layer_backward<T>(T*, const BkGrads<T>&, const T*, const T*, const T*, const T*,             \
                                     const BkSaved<T>&, const BkParams<T>&, bool, int, int, int);               \
  template void bk_decode_prefill<T>(T*, T*, const T*, const T*, const BkParams<T>&, bool, int, int);            \
  template void bk_decode_step<T>(T*, T*, T*, T*, const T*, const BkParams<T>&, bool, int, int);                 \
  template void bk_gate_forward<T>(T*, const T*, const T*, const T*, int, int);                                  \
  template void bk_gate_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*, int, int);

MUSE_BK_INSTANTIATE(float)
MUSE_BK_INSTANTIATE(double)

}  // namespace muse
