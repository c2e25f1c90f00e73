// Poincaré-ball primitives (SPEC §2.1) on the ball of curvature −c (c > 0), maps at the origin:
//
//   exp_c(v) = tanh(√c‖v‖)·v/(√c‖v‖)          log_c(y) = artanh(√c‖y‖)·y/(√c‖y‖)      (‖y‖ < 1/√c)
//   d_c(x, y) = (1/√c)·arcosh(1 + 2c‖x−y‖² / ((1 − c‖x‖²)(1 − c‖y‖²)))                (ball coordinates)
//
// Ball coordinates are for the diagnostics (§5) only: 1 − c‖x‖² = sech²(√c‖q‖) underflows in fp32 once
// √c‖q‖ ≳ 8.5. Attention uses the log-domain tangent distance instead, which takes the tangent vectors
// q, k (x = exp_c q, y = exp_c k) and never forms a ball point. With a = √c‖q‖, b = √c‖k‖ (norms floored
// at 1e-6), κ = clamp(1 − q·k/(‖q‖‖k‖), 1e-12, 2) and ls(y) = ln sinh y, the hyperbolic law of cosines
// gives
//
//   ℓ = ln(cosh ρ − 1) = logaddexp( ln2 + 2·ls(max(|a−b|, 1e-6)),  ls(2a) + ls(2b) + ln κ )
//   ρ = √c·d_c = arcosh(1 + e^ℓ)   (evaluated without overflow on either sign of ℓ)
//
// The scalar kernels below return ρ = √c·d_c (a function of a, b, κ alone, so c enters only through a, b);
// the row-wise functions return d_c = ρ/√c itself.
//
// Row-wise functions work on [rows, D] arrays with one scalar curvature c; their backward ACCUMULATES
// (+=) into every non-null gradient pointer (dc is a single scalar, reduced in row order).
#pragma once
#include <algorithm>
#include <cmath>

// The per-token and per-pair functions of the log-domain distance (log_sinh, coth, tangent_norm,
// scaled_distance) are shared with the CUDA kernels (ops/local_attn.cu): under nvcc they are also device
// functions; the host code is unchanged.
#ifndef MUSE_HOST_DEVICE
#ifdef __CUDACC__
#define MUSE_HOST_DEVICE __host__ __device__
#else
#define MUSE_HOST_DEVICE
#endif
#endif

namespace muse {

inline constexpr double kPoincareNormFloor = 1e-6;   // floor on ‖q‖, ‖k‖ in the log-domain distance
inline constexpr double kPoincareGapFloor = 1e-6;    // floor on |a − b|
inline constexpr double kPoincareKappaMin = 1e-12;   // κ = 1 − cos θ is clamped to [1e-12, 2]
inline constexpr double kPoincareKappaMax = 2.0;
// Below this √c‖v‖ the radial factors of the maps use their Taylor series: the closed forms of their
// derivatives are 0/0 at the origin and lose ~eps/r² relative digits near it.
inline constexpr double kPoincareSeriesRadius = 1e-2;

// The elementary functions of the log-domain distance below: the standard library's (the reference), or a
// caller's faster versions with the same names (the CUDA attention kernels', ops/local_attn.cu).
struct StdMath {
  template <typename T> MUSE_HOST_DEVICE static T log(T x) { return std::log(x); }
  template <typename T> MUSE_HOST_DEVICE static T exp(T x) { return std::exp(x); }
  template <typename T> MUSE_HOST_DEVICE static T log1p(T x) { return std::log1p(x); }
  template <typename T> MUSE_HOST_DEVICE static T div(T x, T y) { return x / y; }
};

// ln sinh(y) for y > 0, never overflowing: y − ln2 + ln(1 − e^{−2y}). SPEC writes the last term as
// log1p(−e^{−2y}); ln(−expm1(−2y)) is the same number without cancellation at small y (a, b ≥ 1e-6·√c).
template <typename T, class Math = StdMath> MUSE_HOST_DEVICE inline T log_sinh(T y) {
  return y - T(M_LN2) + Math::log(-std::expm1(T(-2) * y));
}

// coth y = d/dy ln sinh y.
template <typename T> MUSE_HOST_DEVICE inline T coth(T y) { return T(1) / std::tanh(y); }

// Radial factor of exp_c at r = √c‖v‖: f(r) = tanh(r)/r, and f′(r)/r, which the gradients need
// (∂exp_c(v)/∂v = f·I + c·(f′/r)·v vᵀ, ∂exp_c(v)/∂c = (f′/r)·‖v‖²/2 · v).
template <typename T> inline void exp_radial(T r, T& f, T& fprime_over_r) {
  if (r < T(kPoincareSeriesRadius)) {
    const T r2 = r * r;  // tanh(r)/r = 1 − r²/3 + 2r⁴/15 − 17r⁶/315 + 62r⁸/2835 − …
    f = T(1) + r2 * (T(-1.0 / 3) + r2 * (T(2.0 / 15) + r2 * T(-17.0 / 315)));
    fprime_over_r = T(-2.0 / 3) + r2 * (T(8.0 / 15) + r2 * (T(-34.0 / 105) + r2 * T(496.0 / 2835)));
  } else {
    const T t = std::tanh(r);
    f = t / r;
    fprime_over_r = (r * (T(1) - t * t) - t) / (r * r * r);
  }
}

// Radial factor of log_c at s = √c‖y‖ < 1: g(s) = artanh(s)/s and g′(s)/s (same roles as exp_radial).
template <typename T> inline void log_radial(T s, T& g, T& gprime_over_s) {
  if (s < T(kPoincareSeriesRadius)) {
    const T s2 = s * s;  // artanh(s)/s = 1 + s²/3 + s⁴/5 + s⁶/7 + s⁸/9 + …
    g = T(1) + s2 * (T(1.0 / 3) + s2 * (T(1.0 / 5) + s2 * T(1.0 / 7)));
    gprime_over_s = T(2.0 / 3) + s2 * (T(4.0 / 5) + s2 * (T(6.0 / 7) + s2 * T(8.0 / 9)));
  } else {
    const T at = std::atanh(s);
    g = at / s;
    gprime_over_s = (s / (T(1) - s * s) - at) / (s * s * s);
  }
}

// Per-token quantities of the log-domain distance, computed once per query or key (and cached per key
// in decode, §4).
template <typename T> struct TangentNorm {
  T norm;        // max(‖q‖, 1e-6)
  T a;           // √c·norm
  T ls2a;        // ln sinh(2a)
  T coth2a;      // coth(2a) = ½·d ls(2a)/da
  bool floored;  // the 1e-6 floor is active, so the norm carries no gradient
};

// From the squared norm sq = ‖q‖² (the CUDA kernels reduce it across a warp).
template <typename T> MUSE_HOST_DEVICE inline TangentNorm<T> tangent_norm_from_squared(T sq, T sqrt_c) {
  const T raw = std::sqrt(sq);
  TangentNorm<T> t;
  t.floored = raw < T(kPoincareNormFloor);
  t.norm = t.floored ? T(kPoincareNormFloor) : raw;
  t.a = sqrt_c * t.norm;
  t.ls2a = log_sinh(T(2) * t.a);
  t.coth2a = coth(T(2) * t.a);
  return t;
}

template <typename T> MUSE_HOST_DEVICE inline TangentNorm<T> tangent_norm(const T* q, int d, T sqrt_c) {
  T sq = 0;
  for (int e = 0; e < d; ++e) sq += q[e] * q[e];
  return tangent_norm_from_squared(sq, sqrt_c);
}

// Partial derivatives of ρ with respect to the primitive quantities it depends on. Chain rule to the
// vectors: ∂ρ/∂q = (norm_q/‖q‖)·q + dot·k and ∂ρ/∂k = (norm_k/‖k‖)·k + dot·q.
template <typename T> struct ScaledDistanceGrad {
  T norm_q;  // ∂ρ/∂‖q‖ (0 where the floor is active)
  T norm_k;  // ∂ρ/∂‖k‖
  T dot;     // ∂ρ/∂(q·k)
  T sqrt_c;  // ∂ρ/∂√c at fixed tangent vectors
};

// ρ = √c·d_c(exp_c q, exp_c k) from the two tokens' TangentNorm and dot = q·k; fills *grad when non-null.
// Clamped or floored quantities get zero derivative.
template <typename T, class Math = StdMath>
MUSE_HOST_DEVICE inline T scaled_distance(const TangentNorm<T>& q, const TangentNorm<T>& k, T dot,
                                          ScaledDistanceGrad<T>* grad = nullptr) {
  const T inv_norms = Math::div(T(1), q.norm * k.norm);
  const T cos_angle = dot * inv_norms;
  const T kappa_raw = T(1) - cos_angle;
  const bool kappa_clamped = kappa_raw < T(kPoincareKappaMin) || kappa_raw > T(kPoincareKappaMax);
  const T kappa = std::clamp(kappa_raw, T(kPoincareKappaMin), T(kPoincareKappaMax));
  const T gap_raw = std::abs(q.a - k.a);
  const bool gap_floored = gap_raw < T(kPoincareGapFloor);
  const T gap = gap_floored ? T(kPoincareGapFloor) : gap_raw;

  // ln(2 sinh²(a−b)) = ln(cosh(2a−2b) − 1), with ln sinh as in log_sinh; 1 − e^{−2·gap} also gives coth(gap).
  const T one_minus_e = -std::expm1(T(-2) * gap);
  const T radial = T(2) * (gap + Math::log(one_minus_e)) - T(M_LN2);
  const T angular = q.ls2a + k.ls2a + Math::log(kappa);  // ln(sinh 2a · sinh 2b · (1 − cos θ))
  const T hi = std::max(radial, angular);
  const T ell = hi + Math::log1p(Math::exp(std::min(radial, angular) - hi));

  // ρ = arcosh(1 + e^ℓ) and dρ/dℓ = (1 + 2e^{−ℓ})^{−1/2} from u = e^{−|ℓ|}, which never overflows:
  //   ℓ ≥ 0: ρ = ℓ + ln(1 + u + √(1 + 2u)),  dρ/dℓ = 1/√(1 + 2u)
  //   ℓ < 0: ρ = ln(1 + u + √(u(u + 2))),    dρ/dℓ = √(u/(u + 2))
  // one formula with (a, b) = (1, 1 + 2u) or (u, u + 2): no branch, so lanes of either sign run together.
  const T u = Math::exp(-std::abs(ell));
  const bool positive = ell >= T(0);
  const T a = positive ? T(1) : u, b = positive ? T(1) + T(2) * u : u + T(2);
  const T root = std::sqrt(a * b);
  const T rho = (positive ? ell : T(0)) + Math::log1p(u + root);
  const T drho_dell = Math::div(root, b);

  if (grad) {
    const T w_radial = Math::exp(radial - ell), w_angular = Math::exp(angular - ell);  // logaddexp weights
    const T coth_gap = Math::div(T(2) - one_minus_e, one_minus_e);                    // (1 + e)/(1 − e)
    const T d_gap = gap_floored ? T(0) : w_radial * T(2) * coth_gap;
    const T sign = q.a >= k.a ? T(1) : T(-1);
    const T d_a = drho_dell * (sign * d_gap + w_angular * T(2) * q.coth2a);
    const T d_b = drho_dell * (-sign * d_gap + w_angular * T(2) * k.coth2a);
    const T d_kappa = kappa_clamped ? T(0) : Math::div(drho_dell * w_angular, kappa);
    const T sqrt_c = Math::div(q.a, q.norm);
    // a = √c·‖q‖ and κ = 1 − q·k/(‖q‖‖k‖), so ∂κ/∂‖q‖ = cos θ/‖q‖ and ∂κ/∂(q·k) = −1/(‖q‖‖k‖).
    const T d_kappa_cos = d_kappa * cos_angle;
    grad->norm_q = q.floored ? T(0) : d_a * sqrt_c + Math::div(d_kappa_cos, q.norm);
    grad->norm_k = k.floored ? T(0) : d_b * sqrt_c + Math::div(d_kappa_cos, k.norm);
    grad->dot = -d_kappa * inv_norms;
    grad->sqrt_c = d_a * q.norm + d_b * k.norm;
  }
  return rho;
}

// d_c(x, y) in ball coordinates for one pair of D-vectors (‖x‖, ‖y‖ < 1/√c).
template <typename T> inline T ball_distance_pair(const T* x, const T* y, int D, T c) {
  T diff2 = 0, x2 = 0, y2 = 0;
  for (int e = 0; e < D; ++e) {
    diff2 += (x[e] - y[e]) * (x[e] - y[e]);
    x2 += x[e] * x[e];
    y2 += y[e] * y[e];
  }
  // arcosh(1 + δ) = log1p(δ + √(δ(δ + 2))) keeps small distances accurate.
  const T delta = T(2) * c * diff2 / ((T(1) - c * x2) * (T(1) - c * y2));
  return std::log1p(delta + std::sqrt(delta * (delta + T(2)))) / std::sqrt(c);
}

// Adds g·∂d_c/∂x to dx and g·∂d_c/∂y to dy (either may be null) and returns g·∂d_c/∂c. Undefined at
// x = y, where the distance has a cusp.
template <typename T>
inline T ball_distance_pair_backward(T* dx, T* dy, T g, const T* x, const T* y, int D, T c) {
  T diff2 = 0, x2 = 0, y2 = 0;
  for (int e = 0; e < D; ++e) {
    diff2 += (x[e] - y[e]) * (x[e] - y[e]);
    x2 += x[e] * x[e];
    y2 += y[e] * y[e];
  }
  const T alpha = T(1) - c * x2, beta = T(1) - c * y2;
  const T delta = T(2) * c * diff2 / (alpha * beta);
  const T sqrt_c = std::sqrt(c);
  const T acosh = std::log1p(delta + std::sqrt(delta * (delta + T(2))));
  const T dd_ddelta = T(1) / (sqrt_c * std::sqrt(delta * (delta + T(2))));
  // ∂δ/∂x = 4c/(αβ)·((x − y) + (c‖x−y‖²/α)·x), symmetrically for y.
  const T scale = g * dd_ddelta * T(4) * c / (alpha * beta);
  const T x_coef = c * diff2 / alpha, y_coef = c * diff2 / beta;
  for (int e = 0; e < D; ++e) {
    if (dx) dx[e] += scale * ((x[e] - y[e]) + x_coef * x[e]);
    if (dy) dy[e] += scale * ((y[e] - x[e]) + y_coef * y[e]);
  }
  // δ ∝ c/(αβ): ∂δ/∂c = δ·(1/c + ‖x‖²/α + ‖y‖²/β); d_c = arcosh(1 + δ)/√c.
  const T ddelta_dc = delta * (T(1) / c + x2 / alpha + y2 / beta);
  return g * (dd_ddelta * ddelta_dc - acosh / (T(2) * c * sqrt_c));
}

// y[rows, D] = exp_c(v) row by row.
template <typename T> void poincare_exp_forward(T* y, const T* v, T c, int rows, int D);
// dv += ∂/∂v, *dc += Σ_rows ∂/∂c of Σ dy·exp_c(v).
template <typename T> void poincare_exp_backward(T* dv, T* dc, const T* dy, const T* v, T c, int rows, int D);

// v[rows, D] = log_c(y) row by row (requires √c‖y‖ < 1).
template <typename T> void poincare_log_forward(T* v, const T* y, T c, int rows, int D);
template <typename T> void poincare_log_backward(T* dy, T* dc, const T* dv, const T* y, T c, int rows, int D);

// dist[rows] = d_c(x_r, y_r) in ball coordinates.
template <typename T> void ball_distance_forward(T* dist, const T* x, const T* y, T c, int rows, int D);
template <typename T>
void ball_distance_backward(T* dx, T* dy, T* dc, const T* ddist, const T* x, const T* y, T c, int rows, int D);

// dist[rows] = d_c(exp_c q_r, exp_c k_r) from tangent vectors q, k [rows, D] by the log-domain formula.
template <typename T> void tangent_distance_forward(T* dist, const T* q, const T* k, T c, int rows, int D);
template <typename T>
void tangent_distance_backward(T* dq, T* dk, T* dc, const T* ddist, const T* q, const T* k, T c, int rows, int D);

}  // namespace muse
