// Causal tangent-space linear attention with the scattering key gate (SPEC §2.7; q, k, v shared with
// the local path, §2.5; decode state §4).
//
// q, k, v [B, N, D] hold H heads of d_h = D/H packed in D (head h = columns h·d_h … (h+1)·d_h − 1).
// mu [B, N, H] is the key gate μ ∈ (0, 1), a multiplier on the key features (null: no gate, μ ≡ 1).
// Per batch row b and head h, with φ(x) = ELU(x/√d_h) + 1 elementwise (φ > 0) and φ̃(k_i) = μ_i·φ(k_i):
//
//   S_i = S_{i−1} + φ̃(k_i) v_iᵀ   (d_h × d_h),     z_i = z_{i−1} + φ̃(k_i),     S_{−1} = 0, z_{−1} = 0
//   ζ_i = z_iᵀ φ(q_i),            o_i = S_iᵀ φ(q_i) / max(ζ_i, 1e-6)
//
// The scan is sequential in time, O(N·d_h²) per (b, h), OpenMP over (b, h). The output projection W_o is
// applied by the caller.
//
// Memory: the forward saves only ζ [B, N, H] (before the clamp, so the backward knows which side of the
// max it is on). The backward replays the forward states in O(d_h²) memory instead of storing N states:
// a forward pass rebuilds S_i, z_i and gives dq; a reverse pass accumulates the adjoint states
// dS_i = Σ_{j≥i} φ(q_j) (do_j/n_j)ᵀ and dz_i = Σ_{j≥i} dζ_j φ(q_j), which give dk, dv, dμ. Workspace per
// (b, h): 2·d_h² + O(d_h) + N scalars; about 3× the forward's arithmetic.
#pragma once

namespace muse {

// Floor of the denominator z_iᵀφ(q_i); below it the output is S_iᵀφ(q_i)/1e-6 and no gradient flows
// through the denominator.
inline constexpr double kLinearAttnDenominatorFloor = 1e-6;

// o [B, N, D]; zeta [B, N, H] receives z_iᵀφ(q_i) before the clamp (saved for the backward).
// final_S [B, H, d_h, d_h] (S[r][c]: key feature r, value channel c) and final_z [B, H, d_h] receive the
// state after the last position, the prefill hand-over to linear_attn_decode_step (both may be null).
template <typename T>
void linear_attn_forward(T* o, T* zeta, T* final_S, T* final_z, const T* q, const T* k, const T* v, const T* mu,
                         int B, int N, int D, int H);

// Accumulates dq, dk, dv [B, N, D] and dmu [B, N, H] (each may be null; dmu is ignored when mu is null)
// from d_o [B, N, D], given the forward's inputs and its saved zeta. Every gradient element belongs to
// one (b, h), so the result does not depend on the thread count.
template <typename T>
void linear_attn_backward(T* dq, T* dk, T* dv, T* dmu, const T* d_o, const T* zeta, const T* q, const T* k,
                          const T* v, const T* mu, int B, int N, int D, int H);

// One decode step for one sequence: given the token's q, k, v [D] and gate mu [H] (null: no gate),
// updates the state S [H, d_h, d_h] and z [H, d_h] in place (S_{−1} = 0, z_{−1} = 0 before the first
// token) and writes o [D]. Same arithmetic as the forward scan, O(H·d_h²) per token.
template <typename T>
void linear_attn_decode_step(T* o, T* S, T* z, const T* q, const T* k, const T* v, const T* mu, int D, int H);

}  // namespace muse
