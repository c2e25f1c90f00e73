#include "ops/layernorm.h"

#include <cmath>

namespace muse {

template <typename T>
void layernorm_forward(T* y, T* mean, T* rstd, T* radius, const T* x, const T* gain, const T* bias, int rows,
                       int D) {
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* xr = x + (long)r * D;
    T sum = 0, sumsq = 0;
    for (int i = 0; i < D; ++i) sum += xr[i];
    const T mu = sum / D;
    for (int i = 0; i < D; ++i) {
      const T d = xr[i] - mu;
      sumsq += d * d;
    }
    const T rs = T(1) / std::sqrt(sumsq / D + T(kLayerNormEps));
    T* yr = y + (long)r * D;
    for (int i = 0; i < D; ++i) yr[i] = (xr[i] - mu) * rs * gain[i] + bias[i];
    mean[r] = mu;
    rstd[r] = rs;
    if (radius) {
      T sq = 0;
      for (int i = 0; i < D; ++i) sq += xr[i] * xr[i];
      radius[r] = T(2) * std::sqrt(sq) / std::sqrt(T(D));
    }
  }
}

template <typename T>
void layernorm_backward(T* dx, T* dgain, T* dbias, const T* dy, const T* dradius, const T* x, const T* gain,
                        const T* mean, const T* rstd, int rows, int D) {
  // Parameter gradients are reductions over rows: done serially so the sum order (and so the result)
  // does not depend on the thread count.
  if (dgain || dbias) {
    for (int r = 0; r < rows; ++r) {
      const T* xr = x + (long)r * D;
      const T* dyr = dy + (long)r * D;
      for (int i = 0; i < D; ++i) {
        if (dgain) dgain[i] += dyr[i] * (xr[i] - mean[r]) * rstd[r];
        if (dbias) dbias[i] += dyr[i];
      }
    }
  }
  if (!dx) return;
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* xr = x + (long)r * D;
    const T* dyr = dy + (long)r * D;
    T* dxr = dx + (long)r * D;
    const T mu = mean[r], rs = rstd[r];
    // With x̂ = (x − μ)·rstd and ĝ = dy·gain: dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)).
    T mean_g = 0, mean_gx = 0;
    for (int i = 0; i < D; ++i) {
      const T g = dyr[i] * gain[i];
      mean_g += g;
      mean_gx += g * (xr[i] - mu) * rs;
    }
    mean_g /= D;
    mean_gx /= D;
    for (int i = 0; i < D; ++i) {
      const T xhat = (xr[i] - mu) * rs;
      dxr[i] += rs * (dyr[i] * gain[i] - mean_g - xhat * mean_gx);
    }
    if (dradius && dradius[r] != T(0)) {
      T sq = 0;
      for (int i = 0; i < D; ++i) sq += xr[i] * xr[i];
      const T norm = std::sqrt(sq);
      if (norm > T(0)) {
        const T scale = dradius[r] * T(2) / (std::sqrt(T(D)) * norm);
        for (int i = 0; i < D; ++i) dxr[i] += scale * xr[i];
      }
    }
  }
}

template void layernorm_forward<float>(float*, float*, float*, float*, const float*, const float*,
                                       const float*, int, int);
template void layernorm_forward<double>(double*, double*, double*, double*, const double*, const double*,
                                        const double*, int, int);
template void layernorm_backward<float>(float*, float*, float*, const float*, const float*, const float*,
                                        const float*, const float*, const float*, int, int);
template void layernorm_backward<double>(double*, double*, double*, const double*, const double*,
                                         const double*, const double*, const double*, const double*, int,
                                         int);

}  // namespace muse
