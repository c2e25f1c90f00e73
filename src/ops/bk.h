// BK-Core (SPEC §2.4): the diagonal Green function of the tridiagonal "Hamiltonian"
//   H = tridiag(J_t; a_t; J_t),  a_t = 1 + v_t on the diagonal, J_t on the bond (t−1, t),
// at the complex energy z = E₀ + iη, the features F built from it, and the σ-gates of the features
// (§2.7, §2.6). Only J_t² enters the diagonal of (H − z)^{-1}, so the ops take J2 = J_t².
//
// Complex values are stored interleaved as [..., 2] arrays of T: (Re, Im). Gradients of complex
// outputs follow the same layout: dg[..., 0] = ∂L/∂Re g, dg[..., 1] = ∂L/∂Im g, i.e. the conjugate
// cotangent ḡ = ∂L/∂Re g + i·∂L/∂Im g of SPEC §2.4.
//
// Boundedness (why no clamps are needed): every denominator below has Im ≤ −η when J2 ≥ 0, so
// Im g > 0 and |g| ≤ 1/η for the causal and the bidirectional resolvent alike.
//
// Every *_backward ACCUMULATES (+=) into the gradients it is given; a null pointer skips that one.
// Scalar gradients (dE0, deta) are reduced in a fixed order (per batch row, then over rows in index
// order), so results do not depend on the OpenMP thread count.
#pragma once

namespace muse {

// η = softplus(ε_p) + 0.05: the floor keeps |g| ≤ 20 and |∂g/∂a| = |g|² ≤ 400.
inline constexpr double kBkEtaFloor = 0.05;

// ---------------------------------------------------------------------------------------------
// Causal resolvent (SPEC §2.4), sequential in time, parallel over batch:
//   g_t = 1 / (a_t − z − J2_t · g_{t−1}),  g_{−1} = 0,  z = E0 + i·eta
// g_t = [(H_{0:t} − z)^{-1}]_{tt}, the Green function of the leading t+1 sites at the newest one.
// a [B, N], J2 [B, N] (J2[b, 0] is ignored; J2 == nullptr is the Phase 7 pointwise case
// g_t = 1/(a_t − z)), g [B, N, 2].
template <typename T>
void bk_causal_forward(T* g, const T* a, const T* J2, T E0, T eta, int B, int N);

// Reverse scan with the conjugates (SPEC §2.4), from the saved output g:
//   λ_{N−1} = ḡ_{N−1},  λ_t = ḡ_t + conj(J2_{t+1} g_{t+1}²)·λ_{t+1},   w_t = conj(g_t²)·λ_t
//   ∂L/∂a_t = −Re w_t,  ∂L/∂J2_t = Re(conj(g_{t−1})·w_t) (t ≥ 1),  ∂L/∂E0 = Σ Re w_t,  ∂L/∂η = Σ Im w_t
// dg [B, N, 2]; da, dJ2 [B, N]; dE0, deta point to one scalar each. J2 must match the forward.
template <typename T>
void bk_causal_backward(T* da, T* dJ2, T* dE0, T* deta, const T* dg, const T* g, const T* J2, int B, int N);

// ---------------------------------------------------------------------------------------------
// Bidirectional resolvent G_t = [(H − z)^{-1}]_{tt} of the whole N×N tridiagonal matrix, by two
// ratio sweeps (no continuants, so nothing over- or underflows):
//   left_t  = 1/(d_t − J2_t·left_{t−1}),       left_{−1} = 0       (= the causal g)
//   right_t = 1/(d_t − J2_{t+1}·right_{t+1}),  right_N = 0
//   G_t     = 1/(d_t − J2_t·left_{t−1} − J2_{t+1}·right_{t+1}),    d_t = a_t − z
// It sees the future, so models never use it; it exists for analysis and tests.
// a, J2 [B, N] (J2[b, 0] ignored, nullptr = no bonds); G, left, right [B, N, 2] (left and right are
// saved for the backward).
template <typename T>
void bk_bidirectional_forward(T* G, T* left, T* right, const T* a, const T* J2, T E0, T eta, int B, int N);

// Exact O(N) backward: reverse-mode through the two sweeps. With w_t = conj(G_t²)·Ḡ_t,
//   A_t = w_t + J2_{t+1}·conj(left_t²)·A_{t+1}     (reverse sweep, A_N = 0)
//   C_t = w_t + J2_t·conj(right_t²)·C_{t−1}         (forward sweep, C_{−1} = 0)
//   s_t = A_t + C_t − w_t  (= Σ_i conj(G_it²)·Ḡ_i)
//   ∂L/∂a_t = −Re s_t,  ∂L/∂E0 = Σ Re s_t,  ∂L/∂η = Σ Im s_t,
//   ∂L/∂J2_t = Re(conj(left_{t−1})·A_t) + Re(conj(right_t)·C_{t−1})   (t ≥ 1)
template <typename T>
void bk_bidirectional_backward(T* da, T* dJ2, T* dE0, T* deta, const T* dG, const T* G, const T* left,
                               const T* right, const T* J2, int B, int N);

// ---------------------------------------------------------------------------------------------
// Features F_t = (η·Re g_t, η·Im g_t, η·|g_t|) ∈ ℝ³, in the closed unit disc since |g| ≤ 1/η.
// g [rows, 2], F [rows, 3].
template <typename T>
void bk_features_forward(T* F, const T* g, T eta, int rows);

// dg += η·(dF₀ + dF₂·Re g/|g|, dF₁ + dF₂·Im g/|g|),  deta += Σ (dF₀·Re g + dF₁·Im g + dF₂·|g|).
template <typename T>
void bk_features_backward(T* dg, T* deta, const T* dF, const T* g, T eta, int rows);

// ---------------------------------------------------------------------------------------------
// The BK layer of a block (SPEC §2.4, §2.8) from the normalised input u [B, N, D]:
//   v_t = 5·tanh((w_v·u_t + b_v)/5),  a_t = 1 + v_t
//   J_t = J_max·tanh(w_J·[u_{t−1}; u_t] + b_J),  u_{−1} = 0,  J2 = J_t²       (hopping, Phase 8)
//   η = softplus(ε_p) + 0.05,  z = E₀ + iη
//   g = causal resolvent (above), F = features(g, η)
// Phase 7 (hopping off): J ≡ 0 and E₀ ≡ 0, so g_t = 1/(a_t − iη) is pointwise; w_J, b_J and E0 are
// neither read nor given gradients.
template <typename T>
struct BkParams {
  const T* w_v;    // [D]
  const T* b_v;    // [1]
  const T* w_J;    // [2D]: entries [0, D) multiply u_{t−1}, entries [D, 2D) multiply u_t (hopping only)
  const T* b_J;    // [1] (hopping only)
  const T* eps_p;  // [1]
  const T* E0;     // [1] (hopping only)
  T j_max = T(1);  // configured bound of |J|, not learned
};

// Gradients matching BkParams; each may be null.
template <typename T>
struct BkGrads {
  T* w_v = nullptr;
  T* b_v = nullptr;
  T* w_J = nullptr;
  T* b_J = nullptr;
  T* eps_p = nullptr;
  T* E0 = nullptr;
};

// Activations the forward writes for the backward (the caller owns the memory).
template <typename T>
struct BkSaved {
  T* v;   // [B, N] potential v_t
  T* J;   // [B, N] hopping J_t (hopping only; may be null otherwise)
  T* J2;  // [B, N] J_t² (hopping only; may be null otherwise)
};

// g [B, N, 2], F [B, N, 3].
template <typename T>
void bk_layer_forward(T* g, T* F, const BkSaved<T>& saved, const T* u, const BkParams<T>& params, bool hopping,
                      int B, int N, int D);

// dg [B, N, 2] and dF [B, N, 3] are the incoming gradients (either may be null); accumulates du [B, N, D]
// (may be null) and the parameter gradients. Needs the forward's g and saved activations.
template <typename T>
void bk_layer_backward(T* du, const BkGrads<T>& grads, const T* dg, const T* dF, const T* u, const T* g,
                       const BkSaved<T>& saved, const BkParams<T>& params, bool hopping, int B, int N, int D);

// ---------------------------------------------------------------------------------------------
// Recurrent decode (SPEC §4). Per sequence the layer carries g_prev = g_{t−1} [2] and, with hopping,
// prev_half = w_J,prev·u_{t−1} (the half of J_t's pre-activation that belongs to the previous row); both
// are zero before the first token, which reproduces the forward's t = 0 case exactly.

// The state after a parallel bk_layer_forward over one sequence u [N, D] with output g [N, 2] (N ≥ 1):
// g_prev [2] and prev_half [1] (prev_half may be null without hopping).
template <typename T>
void bk_decode_prefill(T* g_prev, T* prev_half, const T* u, const T* g, const BkParams<T>& params, bool hopping, int N,
                       int D);

// One token for each of B sequences: g [B, 2] and F [B, 3] from u [B, D], with the same arithmetic as a
// row of bk_layer_forward; advances g_prev [B, 2] and prev_half [B] (null without hopping) in place.
template <typename T>
void bk_decode_step(T* g, T* F, T* g_prev, T* prev_half, const T* u, const BkParams<T>& params, bool hopping, int B,
                    int D);

// ---------------------------------------------------------------------------------------------
// Feature gate: out[r, j] = σ(W_j·F_r + b_j), F [rows, 3], W [k, 3], b [k], out [rows, k].
// The key gate μ (k = H), the hybrid gate ξ (k = 1) and the SSM physics gate (k = 1) of §2.6–§2.8.
template <typename T>
void bk_gate_forward(T* out, const T* F, const T* W, const T* b, int rows, int k);

// With s = dout·out·(1 − out): dF += s·W, dW += Σ_rows sᵀ·F, db += Σ_rows s (out is the forward's output).
template <typename T>
void bk_gate_backward(T* dF, T* dW, T* db, const T* dout, const T* out, const T* F, const T* W, int rows, int k);

}  // namespace muse
