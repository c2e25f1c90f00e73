#include "ops/hybrid.h"

#include <cmath>
#include <vector>

#include "ops/layernorm.h"

namespace muse {

template <typename T>
void curvature_mix_forward(T* y_att, const T* y_loc, const T* y_lin, T c, int rows, int width) {
  const T alpha = curvature_mix_alpha(c);
  const T beta = T(1) - alpha;
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const long o = (long)r * width;
    for (int i = 0; i < width; ++i) y_att[o + i] = alpha * y_loc[o + i] + beta * y_lin[o + i];
  }
}

template <typename T>
void curvature_mix_backward(T* dy_loc, T* dy_lin, T* dc, const T* dy_att, const T* y_loc, const T* y_lin, T c,
                            int rows, int width) {
  const T alpha = curvature_mix_alpha(c);
  const T beta = T(1) - alpha;
  // Per-row partial sums of dy_att⊙(y_loc − y_lin), added up serially in row order afterwards, so dc
  // does not depend on the thread count.
  std::vector<T> row_dot(dc ? rows : 0);
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const long o = (long)r * width;
    T dot = 0;
    for (int i = 0; i < width; ++i) {
      const T d = dy_att[o + i];
      if (dy_loc) dy_loc[o + i] += alpha * d;
      if (dy_lin) dy_lin[o + i] += beta * d;
      if (dc) dot += d * (y_loc[o + i] - y_lin[o + i]);
    }
    if (dc) row_dot[r] = dot;
  }
  if (dc) {
    T sum = 0;
    for (int r = 0; r < rows; ++r) sum += row_dot[r];
    *dc += T(kCurvatureMixSlope) * alpha * beta * sum;
  }
}

// O(rows) work: serial, which also fixes the summation order of ds.
template <typename T>
void phase7_gate_forward(T* xi, const T* g, T s, int rows) {
  for (int r = 0; r < rows; ++r) xi[r] = sigmoid(s * std::abs(g[2 * r + 1]));
}

template <typename T>
void phase7_gate_backward(T* dg, T* ds, const T* dxi, const T* xi, const T* g, T s, int rows) {
  T ds_sum = 0;
  for (int r = 0; r < rows; ++r) {
    const T im = g[2 * r + 1];
    const T dpre = dxi[r] * xi[r] * (T(1) - xi[r]);
    if (dg) dg[2 * r + 1] += dpre * s * (im < T(0) ? T(-1) : T(1));
    ds_sum += dpre * std::abs(im);
  }
  if (ds) *ds += ds_sum;
}

template <typename T>
void residual_mix_forward(T* h_out, const ResidualMixSaved<T>& saved, const T* h, const T* y_att, const T* y_glob,
                          const T* xi, const T* gain, const T* bias, int rows, int D) {
  const T limit = T(kResidualCap);
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const long o = (long)r * D;
    const T gate = xi[r], rest = T(1) - xi[r];
    for (int i = 0; i < D; ++i) saved.capped[o + i] = cap(gate * y_att[o + i] + rest * y_glob[o + i], limit);
  }
  // LN_h goes to its own buffer so that h_out may be h.
  std::vector<T> normed((size_t)rows * D);
  layernorm_forward<T>(normed.data(), saved.mean, saved.rstd, nullptr, saved.capped, gain, bias, rows, D);
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const long o = (long)r * D;
    for (int i = 0; i < D; ++i) h_out[o + i] = h[o + i] + normed[o + i];
  }
}

template <typename T>
void residual_mix_backward(T* dh, T* dy_att, T* dy_glob, T* dxi, T* dgain, T* dbias, const T* dh_out,
                           const ResidualMixSaved<T>& saved, const T* y_att, const T* y_glob, const T* xi,
                           const T* gain, int rows, int D) {
  const T limit = T(kResidualCap);
  if (dh) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; ++r) {
      const long o = (long)r * D;
      for (int i = 0; i < D; ++i) dh[o + i] += dh_out[o + i];
    }
  }
  const bool need_branch_grads = dy_att || dy_glob || dxi;
  std::vector<T> dcapped(need_branch_grads ? (size_t)rows * D : 0);
  layernorm_backward<T>(need_branch_grads ? dcapped.data() : nullptr, dgain, dbias, dh_out, nullptr, saved.capped,
                        gain, saved.mean, saved.rstd, rows, D);
  if (!need_branch_grads) return;
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const long o = (long)r * D;
    const T gate = xi[r], rest = T(1) - xi[r];
    T dgate = 0;
    for (int i = 0; i < D; ++i) {
      const T t = saved.capped[o + i] / limit;
      const T dz = dcapped[o + i] * (T(1) - t * t);
      if (dy_att) dy_att[o + i] += gate * dz;
      if (dy_glob) dy_glob[o + i] += rest * dz;
      dgate += dz * (y_att[o + i] - y_glob[o + i]);
    }
    if (dxi) dxi[r] += dgate;
  }
}

#define MUSE_INSTANTIATE_HYBRID(T)                                                                             \
  template void curvature_mix_forward<T>(T*, const T*, const T*, T, int, int);                                 \
  template void curvature_mix_backward<T>(T*, T*, T*, const T*, const T*, const T*, T, int, int);              \
  template void phase7_gate_forward<T>(T*, const T*, T, int);                                                  \
  template void phase7_gate_backward<T>(T*, T*, const T*, const T*, const T*, T, int);                         \
  template void residual_mix_forward<T>(T*, const ResidualMixSaved<T>&, const T*, const T*, const T*, const T*, \
                                        const T*, const T*, int, int);                                         \
  template void residual_mix_backward<T>(T*, T*, T*, T*, T*, T*, const T*, const ResidualMixSaved<T>&, const T*, \
                                         const T*, const T*, const T*, int, int);
MUSE_INSTANTIATE_HYBRID(float)
MUSE_INSTANTIATE_HYBRID(double)
#undef MUSE_INSTANTIATE_HYBRID

}  // namespace muse
