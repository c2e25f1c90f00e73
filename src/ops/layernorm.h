// LayerNorm (eps 1e-5, learned gain and bias) and, in the same row pass, the radius
// δ = 2‖x‖/√D of the un-normalised input, which Phase 8 uses as the hyperbolic distance of the
// token from the origin (SPEC §2.6).
#pragma once

namespace muse {

inline constexpr double kLayerNormEps = 1e-5;

// y = (x − mean)·rstd·gain + bias per row of x[rows, D]. Saves mean[rows] and rstd[rows] for the
// backward. radius[rows] (may be null) receives 2‖x‖/√D.
template <typename T>
void layernorm_forward(T* y, T* mean, T* rstd, T* radius, const T* x, const T* gain, const T* bias, int rows,
                       int D);

// Accumulates dx, dgain, dbias (each may be null). dradius (may be null) is the gradient flowing into
// the radius output.
template <typename T>
void layernorm_backward(T* dx, T* dgain, T* dbias, const T* dy, const T* dradius, const T* x, const T* gain,
                        const T* mean, const T* rstd, int rows, int D);

}  // namespace muse
