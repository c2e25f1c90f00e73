// HTT embedding (SPEC §2.2): the embedding matrix E [Vp, D] is a function of two tensor-train cores and a
// per-rank phase. The same E serves the token lookup and the tied output head.
//
//   V ≤ v1·v2, v1 = ⌈√V⌉, v2 = ⌈V/v1⌉;   D ≤ d1·d2, d1 = ⌈√D⌉, d2 = ⌈D/d1⌉;   Vp = V rounded up to 128 (§2.1)
//   token v has digits i1 = ⌊v/v2⌋, i2 = v mod v2;  output column k = p·d2 + q (row-major d1×d2, cropped to D)
//   E[v, p·d2+q] = Σ_s c_s · â_s(i1)[p] · b̂_s(i2)[q]        for v < V and p·d2+q < D; rows ≥ V are 0
//   c_s = cos(θ_s)/√r,   â_s(i) = A[i,s,:] / max(‖A[i,s,:]‖, 1e-6),   b̂_s(u) = B[u,s,:] / max(‖B[u,s,:]‖, 1e-6)
//
// Shapes: A [v1, r, d1], B [v2, r, d2], θ [r]. The normalised cores Â, B̂ have the shapes of A, B; their
// norms (the floored divisors) are [v1, r] and [v2, r].
//
// Tied head: logits [rows, Vp] = h·Eᵀ is linear_forward(logits, h, E, nullptr, rows, D, Vp) and its backward
// linear_backward(dh, dE, nullptr, dlogits, h, E, rows, D, Vp) (ops/linear.h). Rows ≥ V of E are zero, so
// padded logits are 0; cross-entropy ignores them and gives them zero gradient, and htt_materialize_backward
// ignores rows ≥ V of dE in any case.
#pragma once
#include <cstdint>

namespace muse {

inline constexpr double kHttNormFloor = 1e-6;

// Vocabulary padded to a multiple of 128 rows (SPEC §2.1), so the head GEMM has an aligned leading dimension.
inline int padded_vocab(int V) { return (V + 127) / 128 * 128; }

struct HttShape {
  int V, Vp, D, r;
  int v1, v2;  // vocabulary digits: V ≤ v1·v2
  int d1, d2;  // model-width digits: D ≤ d1·d2
};

// The factorisation of §2.2 for vocabulary V, width D and rank r.
HttShape htt_shape(int V, int D, int r);

// v1·r·d1 + v2·r·d2 + r.
long htt_parameter_count(const HttShape& shape);

// Â, ‖A‖ (floored) and B̂, ‖B‖ (floored): the part of the forward that depends on the cores only. Decode
// calls it once after loading, then htt_factored_head_forward per step.
template <typename T>
void htt_normalize_cores(T* A_hat, T* A_norm, T* B_hat, T* B_norm, const T* A, const T* B, const HttShape& shape);

// E [Vp, D] from the cores. Saves Â, ‖A‖, B̂, ‖B‖ (see htt_normalize_cores) for the backward.
template <typename T>
void htt_materialize_forward(T* E, T* A_hat, T* A_norm, T* B_hat, T* B_norm, const T* A, const T* B,
                             const T* theta, const HttShape& shape);

// Contracts dE [Vp, D] into dA, dB, dθ (each may be null; accumulated). Rows ≥ V of dE are ignored.
// With G_v = dE[v] zero-padded to d1·d2 and read as d1×d2, summed over the tokens v = (i, u):
//   dÂ[i,s,:] = c_s Σ_u G_v·b̂_s(u),   dB̂[u,s,:] = c_s Σ_i G_vᵀ·â_s(i),   dc_s = Σ_v â_s(i)ᵀ·G_v·b̂_s(u)
//   dA row = (dâ − â⟨â, dâ⟩)/‖a‖ (dâ/1e-6 where the norm is floored),   dθ_s = −dc_s·sin(θ_s)/√r
// Deterministic: the result does not depend on the thread count.
template <typename T>
void htt_materialize_backward(T* dA, T* dB, T* dtheta, const T* dE, const T* A_hat, const T* A_norm,
                              const T* B_hat, const T* B_norm, const T* theta, const HttShape& shape);

// x[n, D] = E[ids[n]] computed from the normalised cores (htt_normalize_cores) without materialising E:
// r·d1·d2 multiply-adds per token, with the same arithmetic as htt_materialize_forward's rows. Decode and
// prefill use it so E never needs to be held. ids must lie in [0, V).
template <typename T>
void htt_embedding_rows(T* x, const int32_t* ids, int n, const T* A_hat, const T* B_hat, const T* theta,
                        const HttShape& shape);

// x[n, D] = E[ids[n]]. Serves the dense embedding table as well. ids must lie in [0, V) (the model checks).
template <typename T>
void embedding_lookup_forward(T* x, const T* E, const int32_t* ids, int n, int D);

// dE[ids[t]] += dx[t]. Every element of dE is summed in token order whatever the thread count.
template <typename T>
void embedding_lookup_backward(T* dE, const T* dx, const int32_t* ids, int n, int D);

// Decode head without E (§2.2): logits [rows, Vp] for x [rows, D], with columns ≥ V set to 0, equal to the
// tied head x·Eᵀ. With X = reshape(pad(x, d1·d2), d1×d2) and Z[(s,p), u] = c_s·Σ_q X[p,q]·B̂[u,s,q]:
// logits[i·v2+u] = Σ_{(s,p)} Â[i,s,p]·Z[(s,p),u], a (v1 × r·d1)·(r·d1 × v2) GEMM per row. Forward only.
template <typename T>
void htt_factored_head_forward(T* logits, const T* x, const T* A_hat, const T* B_hat, const T* theta, int rows,
                               const HttShape& shape);

}  // namespace muse
