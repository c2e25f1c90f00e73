// The block's mixing epilogue (SPEC §2.7, §2.8): how the attention paths are mixed by curvature, the
// Phase 7 hybrid gate from the Green function, and the gated residual update
//   h_out = h + LN_h(cap30(ξ⊙y_att + (1−ξ)⊙y_glob)).
// Rows are the flattened [B, N] positions; every op here is pointwise in the row, hence causal.
// Conventions as every op (docs/ARCHITECTURE.md): forward writes outputs and saved tensors (caller-owned),
// backward ACCUMULATES into every non-null gradient; scalar parameters come in by value and their
// gradients are single accumulators summed over rows in a fixed order (independent of the thread count).
#pragma once

#include "common/math.h"

namespace muse {

// ---- Curvature mix (Phase 8, §2.7) -------------------------------------------------------------------
// α = σ(10·(c − 0.55)): the local (hyperbolic) path dominates for strongly curved layers, the linear path
// for flat ones. c is the layer curvature (0.01 + softplus(c_raw), from the local path).
//   y_att = α·y_loc + (1−α)·y_lin,   y_loc, y_lin, y_att [rows, width]
// width is D whether the mix is applied after W_o or, as §2.7 suggests to save a GEMM, to the per-head
// outputs before the shared W_o (both are [rows, D]).
inline constexpr double kCurvatureMixCentre = 0.55;
inline constexpr double kCurvatureMixSlope = 10.0;

template <typename T>
inline T curvature_mix_alpha(T c) {
  return sigmoid(T(kCurvatureMixSlope) * (c - T(kCurvatureMixCentre)));
}

template <typename T>
void curvature_mix_forward(T* y_att, const T* y_loc, const T* y_lin, T c, int rows, int width);

// dy_loc += α·dy_att,  dy_lin += (1−α)·dy_att,  dc += 10·α(1−α)·Σ dy_att⊙(y_loc − y_lin).
template <typename T>
void curvature_mix_backward(T* dy_loc, T* dy_lin, T* dc, const T* dy_att, const T* y_loc, const T* y_lin, T c,
                            int rows, int width);

// ---- Phase 7 hybrid gate (§2.8) ----------------------------------------------------------------------
// ξ_t = σ(s·|Im g_t|), g [rows, 2] = interleaved (Re, Im) of the pointwise Green function, s learned
// (init 1). Im g > 0 always (η > 0), so |·| has no kink on real inputs; the backward still uses sign(Im g).
// (Phase 8's ξ = σ(w_ξ·F + b_ξ) is the BK family's feature gate.)
template <typename T>
void phase7_gate_forward(T* xi, const T* g, T s, int rows);

// With ∂L/∂(s|Im g|) = dξ·ξ(1−ξ):  d(Im g) += that·s·sign(Im g),  ds += Σ that·|Im g|.  Re g gets nothing.
// xi is the forward's output.
template <typename T>
void phase7_gate_backward(T* dg, T* ds, const T* dxi, const T* xi, const T* g, T s, int rows);

// ---- Gated residual update (§2.8) --------------------------------------------------------------------
//   z = ξ⊙y_att + (1−ξ)⊙y_glob     (ξ [rows] broadcast over D; y_att is y_loc in the Phase 7 block)
//   capped = cap30(z) = 30·tanh(z/30)
//   o = LN_h(capped)               (ops/layernorm, gain/bias [D])
//   h_out = h + o                  h, h_out [rows, D]; h_out == h (in place) is allowed.
inline constexpr double kResidualCap = 30.0;

template <typename T>
struct ResidualMixSaved {
  T* capped;  // [rows, D]  cap30(z): the LayerNorm input, and its tanh gives the cap's derivative
  T* mean;    // [rows]     LN_h statistics
  T* rstd;    // [rows]
};

template <typename T>
void residual_mix_forward(T* h_out, const ResidualMixSaved<T>& saved, const T* h, const T* y_att, const T* y_glob,
                          const T* xi, const T* gain, const T* bias, int rows, int D);

// dh += dh_out (the residual passes it through unchanged: a caller keeping one residual-gradient buffer
// passes dh = null and keeps using dh_out; dh must not alias dh_out). With dz = LN_h'ᵀ dh_out ⊙ cap30'(z):
//   dy_att += ξ⊙dz,  dy_glob += (1−ξ)⊙dz,  dξ_r += Σ_i dz_ri (y_att − y_glob)_ri,  dgain, dbias from LN_h.
template <typename T>
void residual_mix_backward(T* dh, T* dy_att, T* dy_glob, T* dxi, T* dgain, T* dbias, const T* dh_out,
                           const ResidualMixSaved<T>& saved, const T* y_att, const T* y_glob, const T* xi,
                           const T* gain, int rows, int D);

}  // namespace muse
