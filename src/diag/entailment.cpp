#include "diag/entailment.h"

#include <algorithm>
#include <cmath>

namespace muse {

namespace {

template <typename T> T squared_norm(const T* x, int D) {
  T s = 0;
  for (int e = 0; e < D; ++e) s += x[e] * x[e];
  return s;
}

// The scalar quantities Ξ is a function of: a = ⟨x,y⟩, p = ‖x‖², q = ‖y‖², r = ‖x−y‖² (accumulated
// from the difference, not as p + q − 2a, which cancels for nearby points).
template <typename T> struct PairMoments {
  T a = 0, p = 0, q = 0, r = 0;
};

template <typename T> PairMoments<T> pair_moments(const T* x, const T* y, int D) {
  PairMoments<T> m;
  for (int e = 0; e < D; ++e) {
    m.a += x[e] * y[e];
    m.p += x[e] * x[e];
    m.q += y[e] * y[e];
    m.r += (x[e] - y[e]) * (x[e] - y[e]);
  }
  return m;
}

// The arccos argument of Ξ and, when grad is non-null, its partial derivatives with respect to
// (a, p, q, r, c). With num = a(1 + cp) − p(1 + cq) and w = 1 + c²pq − 2ca, arg = num/√(p·r·w), so
// ∂arg/∂z = ∂num/∂z / √(prw) − arg·½·∂ln(prw)/∂z.
template <typename T> struct ArgGrad {
  T a, p, q, r, c;
};

template <typename T> T exterior_arg(const PairMoments<T>& m, T c, ArgGrad<T>* grad) {
  const T num = m.a * (T(1) + c * m.p) - m.p * (T(1) + c * m.q);
  const T w = T(1) + c * c * m.p * m.q - T(2) * c * m.a;
  const T den = std::sqrt(m.p * m.r * w);
  const T arg = num / den;
  if (grad) {
    const T half_arg = arg / T(2);
    grad->a = (T(1) + c * m.p) / den - half_arg * (T(-2) * c / w);
    grad->p = (c * m.a - T(1) - c * m.q) / den - half_arg * (T(1) / m.p + c * c * m.q / w);
    grad->q = (-c * m.p) / den - half_arg * (c * c * m.p / w);
    grad->r = -half_arg / m.r;
    grad->c = (m.a * m.p - m.p * m.q) / den - half_arg * ((T(2) * c * m.p * m.q - T(2) * m.a) / w);
  }
  return arg;
}

// arccos of the clipped argument; *dxi_darg receives its derivative (0 where the clip is active).
template <typename T> T clipped_arccos(T arg, T* dxi_darg) {
  const T lo = T(-1 + kConeArgClip), hi = T(1 - kConeArgClip);
  if (arg <= lo || arg >= hi) {
    *dxi_darg = T(0);
    return std::acos(std::clamp(arg, lo, hi));
  }
  *dxi_darg = T(-1) / std::sqrt(T(1) - arg * arg);
  return std::acos(arg);
}

}  // namespace

template <typename T> T half_aperture(const T* x, int D, T c, T K) {
  const T n = std::sqrt(squared_norm(x, D));
  const T s = K * (T(1) - c * n * n) / (std::sqrt(c) * n);
  return std::asin(std::clamp(s, T(-1), T(1)));
}

template <typename T> T half_aperture_backward(T* dx, T g, const T* x, int D, T c, T K) {
  const T n = std::sqrt(squared_norm(x, D));
  const T sqrt_c = std::sqrt(c);
  const T s = K * (T(1) - c * n * n) / (sqrt_c * n);
  if (s <= T(-1) || s >= T(1)) return T(0);  // the clip is active: ψ is constant (0 or π/2)
  const T dpsi_ds = g / std::sqrt(T(1) - s * s);
  // s = K(1/(√c·n) − √c·n):  ∂s/∂n = −K(1 + cn²)/(√c·n²),  ∂s/∂c = −K(1 + cn²)/(2c√c·n).
  const T ds_dn = -K * (T(1) + c * n * n) / (sqrt_c * n * n);
  const T ds_dc = -K * (T(1) + c * n * n) / (T(2) * c * sqrt_c * n);
  if (dx) {
    const T scale = dpsi_ds * ds_dn / n;
    for (int e = 0; e < D; ++e) dx[e] += scale * x[e];
  }
  return dpsi_ds * ds_dc;
}

template <typename T> T exterior_angle(const T* x, const T* y, int D, T c) {
  T unused;
  return clipped_arccos(exterior_arg(pair_moments(x, y, D), c, static_cast<ArgGrad<T>*>(nullptr)), &unused);
}

template <typename T> T exterior_angle_backward(T* dx, T* dy, T g, const T* x, const T* y, int D, T c) {
  const PairMoments<T> m = pair_moments(x, y, D);
  ArgGrad<T> ag;
  T dxi_darg;
  clipped_arccos(exterior_arg(m, c, &ag), &dxi_darg);
  const T k = g * dxi_darg;
  if (k == T(0)) return T(0);
  // a = ⟨x,y⟩, p = ‖x‖², q = ‖y‖², r = ‖x−y‖².
  for (int e = 0; e < D; ++e) {
    const T diff = x[e] - y[e];
    if (dx) dx[e] += k * (ag.a * y[e] + T(2) * ag.p * x[e] + T(2) * ag.r * diff);
    if (dy) dy[e] += k * (ag.a * x[e] + T(2) * ag.q * y[e] - T(2) * ag.r * diff);
  }
  return k * ag.c;
}

template <typename T> bool cone_pair_valid(const T* x, const T* y, int D) {
  if (std::sqrt(squared_norm(x, D)) < T(kConeMinNorm)) return false;
  for (int e = 0; e < D; ++e)
    if (x[e] != y[e]) return true;
  return false;
}

template <typename T> T cone_energy(const T* x, const T* y, int D, T c, T K) {
  return std::max(exterior_angle(x, y, D, c) - half_aperture(x, D, c, K), T(0));
}

template <typename T> T cone_energy_backward(T* dx, T* dy, T g, const T* x, const T* y, int D, T c, T K) {
  if (exterior_angle(x, y, D, c) - half_aperture(x, D, c, K) <= T(0)) return T(0);  // relu inactive
  // E = Ξ − ψ(x): ψ's share enters with weight −g.
  return exterior_angle_backward(dx, dy, g, x, y, D, c) + half_aperture_backward(dx, -g, x, D, c, K);
}

template <typename T>
ConeStats cone_stats(const T* x, const T* y, int rows, int D, T c, const ConeOptions& o) {
  ConeStats s;
  s.pairs = rows;
  double energy = 0, aperture = 0, angle = 0;
  for (int r = 0; r < rows; ++r) {
    const T* xr = x + size_t(r) * D;
    const T* yr = y + size_t(r) * D;
    if (!cone_pair_valid(xr, yr, D)) {
      ++s.skipped;
      continue;
    }
    const T psi = half_aperture(xr, D, c, T(o.K)), xi = exterior_angle(xr, yr, D, c);
    const T e = std::max(xi - psi, T(0));
    energy += e;
    aperture += psi;
    angle += xi;
    if (e > T(o.violation)) ++s.violations;
  }
  const int64_t valid = s.pairs - s.skipped;
  if (valid > 0) {
    s.violation_rate = double(s.violations) / double(valid);
    s.mean_energy = energy / double(valid);
    s.mean_half_aperture = aperture / double(valid);
    s.mean_exterior_angle = angle / double(valid);
  }
  return s;
}

template <typename T>
T order_loss(T* dx, T* dy, T* dc, T g, const T* x, const T* y, const std::vector<uint8_t>& labels, int D, T c,
             const ConeOptions& o) {
  const int rows = int(labels.size());
  int count[2] = {0, 0};
  for (int r = 0; r < rows; ++r)
    if (cone_pair_valid(x + size_t(r) * D, y + size_t(r) * D, D)) ++count[labels[r] ? 1 : 0];
  const T K = T(o.K), margin = T(o.margin);
  T loss = 0, grad_c = 0;
  for (int r = 0; r < rows; ++r) {
    const T* xr = x + size_t(r) * D;
    const T* yr = y + size_t(r) * D;
    if (!cone_pair_valid(xr, yr, D)) continue;
    const bool positive = labels[r] != 0;
    const T weight = T(1) / T(count[positive ? 1 : 0]);
    const T e = cone_energy(xr, yr, D, c, K);
    // Positives pay their energy; negatives pay for being less than γ outside the cone.
    const T term = positive ? e : std::max(margin - e, T(0));
    loss += weight * term;
    if (!dx && !dy && !dc) continue;
    if (!positive && margin - e <= T(0)) continue;
    const T ge = g * weight * (positive ? T(1) : T(-1));
    grad_c += cone_energy_backward(dx ? dx + size_t(r) * D : nullptr, dy ? dy + size_t(r) * D : nullptr, ge, xr, yr,
                                   D, c, K);
  }
  if (dc) *dc += grad_c;
  return loss;
}

#define MUSE_INSTANTIATE_ENTAILMENT(T)                                                                        \
  template T half_aperture<T>(const T*, int, T, T);                                                          \
  template T half_aperture_backward<T>(T*, T, const T*, int, T, T);                                          \
  template T exterior_angle<T>(const T*, const T*, int, T);                                                  \
  template T exterior_angle_backward<T>(T*, T*, T, const T*, const T*, int, T);                              \
  template bool cone_pair_valid<T>(const T*, const T*, int);                                                 \
  template T cone_energy<T>(const T*, const T*, int, T, T);                                                  \
  template T cone_energy_backward<T>(T*, T*, T, const T*, const T*, int, T, T);                              \
  template ConeStats cone_stats<T>(const T*, const T*, int, int, T, const ConeOptions&);                     \
  template T order_loss<T>(T*, T*, T*, T, const T*, const T*, const std::vector<uint8_t>&, int, T,           \
                           const ConeOptions&);
MUSE_INSTANTIATE_ENTAILMENT(float)
MUSE_INSTANTIATE_ENTAILMENT(double)
#undef MUSE_INSTANTIATE_ENTAILMENT

}  // namespace muse
