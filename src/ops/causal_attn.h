// Causal scaled-dot-product softmax attention: the attention of the `arch = gpt` baseline block
// (SPEC §2.8). Same layout as the hyperbolic attention: q, k, v, o are [B, N, D] with H heads of
// d_h = D/H packed in D.
//   s_ij = q_i·k_j/√d_h [− m_h·(i − j) with alibi, m_h = 2^{−8(h+1)/H}],  j ≤ i
//   o_i  = Σ_j softmax_j(s_ij)·v_j
// The forward saves the per-(b, h, i) log-sum-exp lse [B, H, N]; the backward recomputes scores from it.
#pragma once

namespace muse {

template <typename T>
void causal_attn_forward(T* o, T* lse, const T* q, const T* k, const T* v, int B, int N, int H, int D, bool alibi);

// Accumulates dq, dk, dv (each may be null) from do_ [B, N, D].
template <typename T>
void causal_attn_backward(T* dq, T* dk, T* dv, const T* do_, const T* q, const T* k, const T* v, const T* o,
                          const T* lse, int B, int N, int H, int D, bool alibi);

// Recurrent decode (SPEC §4) of one sequence: o [D] for the query q [D] of position n − 1 against the
// KV cache keys, values [n, D] of positions 0 … n − 1 (its own key included), with the forward's
// arithmetic. The cache grows with the context: this is the baseline's cost, not an O(1) step.
template <typename T>
void causal_attn_decode_step(T* o, const T* q, const T* keys, const T* values, int n, int H, int D, bool alibi);

}  // namespace muse
