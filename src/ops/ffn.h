// Feed-forward branches on rows of x[rows, D] (the caller applies LN_ffn before and adds the residual
// after). Hidden width is 4D in both. GELU is the exact erf form of common/math.h.
//
//   Low-rank FFN (Phase 8, SPEC §2.9):
//     y = U₂ · V₂ · cap10(GELU(U₁ · V₁ x + b₁)) + b₂
//     V₁ [ρ, D], U₁ [4D, ρ], b₁ [4D], V₂ [ρ, 4D], U₂ [D, ρ], b₂ [D]   (no bias on V₁, V₂; ρ = rank)
//   The cap cap10(a) = 10·tanh(a/10) bounds the hidden activations (GELU is unbounded above).
//
//   Dense GELU MLP (the `arch = gpt` baseline, SPEC §2.8):
//     y = W₂ · GELU(W₁ x + b₁) + b₂       W₁ [4D, D], b₁ [4D], W₂ [D, 4D], b₂ [D]
//
// Conventions as every op (docs/ARCHITECTURE.md): forward writes y and the saved activations (memory
// owned by the caller, pointed to by the *Saved struct); backward ACCUMULATES into every non-null
// gradient. All matrix products go through linear_forward / linear_backward.
#pragma once

namespace muse {

inline constexpr double kFfnCap = 10.0;
inline constexpr int ffn_hidden(int D) { return 4 * D; }

template <typename T>
struct LowRankFfnParams {
  const T* V1;  // [rank, D]
  const T* U1;  // [4D, rank]
  const T* b1;  // [4D]
  const T* V2;  // [rank, 4D]
  const T* U2;  // [D, rank]
  const T* b2;  // [D]
};

// Same layout as the parameters; a null member skips that gradient.
template <typename T>
struct LowRankFfnGrads {
  T* V1;
  T* U1;
  T* b1;
  T* V2;
  T* U2;
  T* b2;
};

// What the backward needs besides x and the parameters.
template <typename T>
struct LowRankFfnSaved {
  T* low1;    // [rows, rank]  V₁ x
  T* pre;     // [rows, 4D]    U₁ V₁ x + b₁        (GELU input)
  T* hidden;  // [rows, 4D]    cap10(GELU(pre))    (its tanh gives the cap's derivative)
  T* low2;    // [rows, rank]  V₂ hidden
};

// y[rows, D] = FFN(x[rows, D]).
template <typename T>
void lowrank_ffn_forward(T* y, const LowRankFfnSaved<T>& saved, const T* x, const LowRankFfnParams<T>& params,
                         int rows, int D, int rank);

// dx += ∂L/∂x and every non-null member of grads += its gradient, from dy[rows, D].
template <typename T>
void lowrank_ffn_backward(T* dx, const LowRankFfnGrads<T>& grads, const T* dy, const LowRankFfnSaved<T>& saved,
                          const T* x, const LowRankFfnParams<T>& params, int rows, int D, int rank);

template <typename T>
struct DenseMlpParams {
  const T* W1;  // [4D, D]
  const T* b1;  // [4D]
  const T* W2;  // [D, 4D]
  const T* b2;  // [D]
};

template <typename T>
struct DenseMlpGrads {
  T* W1;
  T* b1;
  T* W2;
  T* b2;
};

template <typename T>
struct DenseMlpSaved {
  T* pre;     // [rows, 4D]  W₁ x + b₁
  T* hidden;  // [rows, 4D]  GELU(pre)
};

// y[rows, D] = W₂ GELU(W₁ x + b₁) + b₂.
template <typename T>
void dense_mlp_forward(T* y, const DenseMlpSaved<T>& saved, const T* x, const DenseMlpParams<T>& params, int rows,
                       int D);

template <typename T>
void dense_mlp_backward(T* dx, const DenseMlpGrads<T>& grads, const T* dy, const DenseMlpSaved<T>& saved,
                        const T* x, const DenseMlpParams<T>& params, int rows, int D);

}  // namespace muse
