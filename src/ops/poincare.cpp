#include "ops/poincare.h"

#include <cmath>
#include <vector>

namespace muse {

namespace {

template <typename T> T squared_norm(const T* x, int D) {
  T s = 0;
  for (int e = 0; e < D; ++e) s += x[e] * x[e];
  return s;
}

template <typename T> T dot_product(const T* x, const T* y, int D) {
  T s = 0;
  for (int e = 0; e < D; ++e) s += x[e] * y[e];
  return s;
}

// The curvature gradient is a sum over rows: rows write their own term and the terms are added in row
// order, so the result does not depend on the thread count.
template <typename T> void add_in_row_order(T* dc, const std::vector<T>& per_row) {
  for (const T term : per_row) *dc += term;
}

// exp_c and log_c share their structure, out = φ(√c‖in‖)·in with φ = exp_radial or log_radial.
template <typename T, typename Radial>
void radial_map_forward(T* out, const T* in, T c, int rows, int D, Radial radial) {
  const T sqrt_c = std::sqrt(c);
  #pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* x = in + (long)r * D;
    T phi, phi_prime_over_r;
    radial(sqrt_c * std::sqrt(squared_norm(x, D)), phi, phi_prime_over_r);
    for (int e = 0; e < D; ++e) out[(long)r * D + e] = phi * x[e];
  }
}

// d(φ(ρ)·x)/dx = φ·I + c·(φ′/ρ)·x xᵀ and d/dc = (φ′/ρ)·‖x‖²/2 · x, with ρ = √c‖x‖.
template <typename T, typename Radial>
void radial_map_backward(T* din, T* dc, const T* dout, const T* in, T c, int rows, int D, Radial radial) {
  const T sqrt_c = std::sqrt(c);
  std::vector<T> dc_rows(dc ? rows : 0);
  #pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* x = in + (long)r * D;
    const T* g = dout + (long)r * D;
    const T x2 = squared_norm(x, D);
    T phi, phi_prime_over_r;
    radial(sqrt_c * std::sqrt(x2), phi, phi_prime_over_r);
    const T gx = dot_product(g, x, D);
    if (din) {
      const T radial_coef = c * phi_prime_over_r * gx;
      for (int e = 0; e < D; ++e) din[(long)r * D + e] += phi * g[e] + radial_coef * x[e];
    }
    if (dc) dc_rows[r] = phi_prime_over_r * x2 * gx / T(2);
  }
  if (dc) add_in_row_order(dc, dc_rows);
}

}  // namespace

template <typename T> void poincare_exp_forward(T* y, const T* v, T c, int rows, int D) {
  radial_map_forward(y, v, c, rows, D, exp_radial<T>);
}

template <typename T> void poincare_exp_backward(T* dv, T* dc, const T* dy, const T* v, T c, int rows, int D) {
  radial_map_backward(dv, dc, dy, v, c, rows, D, exp_radial<T>);
}

template <typename T> void poincare_log_forward(T* v, const T* y, T c, int rows, int D) {
  radial_map_forward(v, y, c, rows, D, log_radial<T>);
}

template <typename T> void poincare_log_backward(T* dy, T* dc, const T* dv, const T* y, T c, int rows, int D) {
  radial_map_backward(dy, dc, dv, y, c, rows, D, log_radial<T>);
}

template <typename T> void ball_distance_forward(T* dist, const T* x, const T* y, T c, int rows, int D) {
  #pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) dist[r] = ball_distance_pair(x + (long)r * D, y + (long)r * D, D, c);
}

template <typename T>
void ball_distance_backward(T* dx, T* dy, T* dc, const T* ddist, const T* x, const T* y, T c, int rows, int D) {
  std::vector<T> dc_rows(dc ? rows : 0);
  #pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const long off = (long)r * D;
    const T dc_row =
        ball_distance_pair_backward(dx ? dx + off : nullptr, dy ? dy + off : nullptr, ddist[r], x + off, y + off, D, c);
    if (dc) dc_rows[r] = dc_row;
  }
  if (dc) add_in_row_order(dc, dc_rows);
}

template <typename T> void tangent_distance_forward(T* dist, const T* q, const T* k, T c, int rows, int D) {
  const T sqrt_c = std::sqrt(c);
  #pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* qr = q + (long)r * D;
    const T* kr = k + (long)r * D;
    const T rho = scaled_distance(tangent_norm(qr, D, sqrt_c), tangent_norm(kr, D, sqrt_c), dot_product(qr, kr, D));
    dist[r] = rho / sqrt_c;
  }
}

template <typename T>
void tangent_distance_backward(T* dq, T* dk, T* dc, const T* ddist, const T* q, const T* k, T c, int rows, int D) {
  const T sqrt_c = std::sqrt(c);
  std::vector<T> dc_rows(dc ? rows : 0);
  #pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* qr = q + (long)r * D;
    const T* kr = k + (long)r * D;
    const TangentNorm<T> nq = tangent_norm(qr, D, sqrt_c), nk = tangent_norm(kr, D, sqrt_c);
    ScaledDistanceGrad<T> grad;
    const T rho = scaled_distance(nq, nk, dot_product(qr, kr, D), &grad);
    // d_c = ρ/√c: ∂d_c/∂(q, k) = ∂ρ/∂(q, k)/√c and ∂d_c/∂c = (∂ρ/∂√c − ρ/√c)/(2c).
    const T g = ddist[r] / sqrt_c;
    if (dq) {
      const T self = g * grad.norm_q / nq.norm, cross = g * grad.dot;
      for (int e = 0; e < D; ++e) dq[(long)r * D + e] += self * qr[e] + cross * kr[e];
    }
    if (dk) {
      const T self = g * grad.norm_k / nk.norm, cross = g * grad.dot;
      for (int e = 0; e < D; ++e) dk[(long)r * D + e] += self * kr[e] + cross * qr[e];
    }
    if (dc) dc_rows[r] = ddist[r] * (grad.sqrt_c - rho / sqrt_c) / (T(2) * c);
  }
  if (dc) add_in_row_order(dc, dc_rows);
}

#define MUSE_INSTANTIATE_POINCARE(T)                                                                   \
  template void poincare_exp_forward<T>(T*, const T*, T, int, int);                                    \
  template void poincare_exp_backward<T>(T*, T*, const T*, const T*, T, int, int);                     \
  template void poincare_log_forward<T>(T*, const T*, T, int, int);                                    \
  template void poincare_log_backward<T>(T*, T*, const T*, const T*, T, int, int);                     \
  template void ball_distance_forward<T>(T*, const T*, const T*, T, int, int);                         \
  template void ball_distance_backward<T>(T*, T*, T*, const T*, const T*, const T*, T, int, int);      \
  template void tangent_distance_forward<T>(T*, const T*, const T*, T, int, int);                      \
  template void tangent_distance_backward<T>(T*, T*, T*, const T*, const T*, const T*, T, int, int);

MUSE_INSTANTIATE_POINCARE(float)
MUSE_INSTANTIATE_POINCARE(double)

}  // namespace muse
