// AR-SSM, the global path of a block (SPEC §2.6), from the normalised input u [B, N, D]:
//
//   y_conv,t = w₀⊙u_{t−2} + w₁⊙u_{t−1} + w₂⊙u_t          depthwise causal conv, u_{−1} = u_{−2} = 0
//   χ_t = σ(W₂·ReLU(W₁u_t + b₁) + b₂) ∈ (0,1)^R          complexity gate, W₁ [D/4, D], W₂ [R, D/4]
//   p_t = (W_U u_t)⊙χ_t⊙m_t,   q_t = (W_V u_t)⊙χ_t⊙m_t    W_U, W_V [R, D]
//   S_t = λ⊙S_{t−1} + (1−λ)⊙p_t,  S_{−1} = 0,  λ = σ(ℓ)  Phase 8 (decay on)
//   S_t = S_{t−1} + p_t                                   Phase 7 (decay off: a plain prefix sum, |S| grows ∝ t)
//   y_t = y_conv,t + W_O(S_t⊙q_t) + b_O                   W_O [D, R]
//
// Rank mask (Phase 8 with `rank_mask` on; otherwise m ≡ 1), from the radius δ [B, N] (δ_t = 2‖h_t‖/√D of
// the block input, computed by layernorm_forward) and the BK features F [B, N, 3] (§2.4):
//   ω_t = σ(MLP_r(δ_t))·σ(w_π·F_t + b_π),   MLP_r(δ) = Σ_k r_w2[k]·GELU(r_w1[k]·δ + r_b1[k]) + r_b2
//   m_{t,r} = σ(4·(r_min + ω_t(R − r_min) − r − 0.5)),  r = 0..R−1,  r_min = 4
// so channel r is on while r is below the token's effective rank r_min + ω_t(R − r_min).
//
// Conventions as every op (docs/ARCHITECTURE.md): row-major, float and double, *_backward ACCUMULATES
// into every non-null gradient, parameter-gradient reductions run in a fixed order.
#pragma once
#include <vector>

namespace muse {

inline constexpr int kSsmRankMin = 4;       // r_min: channels r < r_min are never masked off
inline constexpr int kSsmRankHidden = 32;   // width of MLP_r

struct SsmConfig {
  int B = 1, N = 1, D = 4, R = 4;
  bool decay = true;       // Phase 8: learned decay λ = σ(ℓ) with the (1 − λ) input scaling; off = Phase 7
  bool rank_mask = true;   // the Phase 8 ablation switch; the mask runs only when decay is on too
  int gate_hidden() const { return D / 4; }
  bool mask_on() const { return decay && rank_mask; }
};

// Parameters. ℓ is read only with decay on; the rank-mask fields only with mask_on().
template <typename T>
struct SsmParams {
  const T* conv = nullptr;    // [3, D]: rows w₀ (applied to u_{t−2}), w₁ (u_{t−1}), w₂ (u_t)
  const T* W1 = nullptr;      // [D/4, D]
  const T* b1 = nullptr;      // [D/4]
  const T* W2 = nullptr;      // [R, D/4]
  const T* b2 = nullptr;      // [R]
  const T* WU = nullptr;      // [R, D]
  const T* WV = nullptr;      // [R, D]
  const T* WO = nullptr;      // [D, R]
  const T* bO = nullptr;      // [D]
  const T* ell = nullptr;     // [R] decay logits, λ = σ(ℓ)
  const T* r_w1 = nullptr;    // [32] MLP_r
  const T* r_b1 = nullptr;    // [32]
  const T* r_w2 = nullptr;    // [32]
  const T* r_b2 = nullptr;    // [1]
  const T* w_pi = nullptr;    // [3] weights of F in the Green-function factor of ω
  const T* b_pi = nullptr;    // [1]
};

// Gradients, the same fields and shapes; each accumulated into when non-null.
template <typename T>
struct SsmGrads {
  T* conv = nullptr;
  T* W1 = nullptr;
  T* b1 = nullptr;
  T* W2 = nullptr;
  T* b2 = nullptr;
  T* WU = nullptr;
  T* WV = nullptr;
  T* WO = nullptr;
  T* bO = nullptr;
  T* ell = nullptr;
  T* r_w1 = nullptr;
  T* r_b1 = nullptr;
  T* r_w2 = nullptr;
  T* r_b2 = nullptr;
  T* w_pi = nullptr;
  T* b_pi = nullptr;
};

// What ssm_forward keeps for the backward (resized by the forward; rows = B·N).
template <typename T>
struct SsmSaved {
  std::vector<T> hidden;   // ReLU(W₁u + b₁)  [rows, D/4]
  std::vector<T> chi;      // χ               [rows, R]
  std::vector<T> mask;     // m               [rows, R]  (empty when the mask is off)
  std::vector<T> proj_u;   // W_U u           [rows, R]
  std::vector<T> proj_v;   // W_V u           [rows, R]
  std::vector<T> state;    // S_t             [rows, R]
};

// ---- the whole op ------------------------------------------------------------------------------------

// y [B, N, D]. delta [B, N] and F [B, N, 3] are read only when cfg.mask_on() (may be null otherwise).
template <typename T>
void ssm_forward(T* y, SsmSaved<T>& saved, const T* u, const T* delta, const T* F, const SsmParams<T>& p,
                 const SsmConfig& cfg);

// Accumulates du [B, N, D], ddelta [B, N], dF [B, N, 3] and every non-null field of g. ddelta and dF
// receive nothing when the mask is off (y does not depend on them).
template <typename T>
void ssm_backward(T* du, T* ddelta, T* dF, const SsmGrads<T>& g, const T* dy, const T* u, const T* delta,
                  const T* F, const SsmParams<T>& p, const SsmSaved<T>& saved, const SsmConfig& cfg);

// ---- pieces ------------------------------------------------------------------------------------------

// y [B, N, D] = depthwise causal conv of u with taps [3, D] (zero left padding).
template <typename T>
void ssm_conv_forward(T* y, const T* u, const T* taps, int B, int N, int D);
// du_t += w₂⊙dy_t + w₁⊙dy_{t+1} + w₀⊙dy_{t+2};  dtaps_k += Σ_t dy_t⊙u_{t−2+k}.
template <typename T>
void ssm_conv_backward(T* du, T* dtaps, const T* dy, const T* u, const T* taps, int B, int N, int D);

// S [B, N, R] from p [B, N, R]: the decayed scan with λ = σ(ell), or the plain prefix sum when ell is null.
template <typename T>
void ssm_scan_forward(T* S, const T* p, const T* ell, int B, int N, int R);
// With the adjoint G_t = dS_t + λ⊙G_{t+1} (λ ≡ 1 without ell):  dp_t += (1−λ)⊙G_t (G_t without ell),
// dℓ += λ(1−λ)·Σ_t G_t⊙(S_{t−1} − p_t)  (summed over batches in index order).
template <typename T>
void ssm_scan_backward(T* dp, T* dell, const T* dS, const T* S, const T* p, const T* ell, int B, int N, int R);

// m [rows, R] from delta [rows] and F [rows, 3], reading the rank-mask fields of params.
template <typename T>
void ssm_rank_mask_forward(T* m, const T* delta, const T* F, const SsmParams<T>& params, int rows, int R);
// Accumulates ddelta, dF and the rank-mask fields of g from dm [rows, R] and the saved m.
template <typename T>
void ssm_rank_mask_backward(T* ddelta, T* dF, const SsmGrads<T>& g, const T* dm, const T* m, const T* delta,
                            const T* F, const SsmParams<T>& params, int rows, int R);

// ---- init and diagnostics ----------------------------------------------------------------------------

// ℓ [R] per SPEC §2.6/§2.10: 1 − λ_r on a log-uniform grid from 1e-3 (r = 0, the slowest channel, which
// the rank mask never removes) to 1e-1 (r = R − 1). The rest of the op's init is the model's: linear
// weights and conv taps N(0, 0.02²) (W_O also scaled by 1/√(2L)), biases 0, w_π = 0, b_π = 2.
template <typename T>
void ssm_init_decay_logits(T* ell, int R);

// Effective rank: mean over the rows of Σ_r m_{t,r} (R when the mask is off).
template <typename T>
double ssm_effective_rank(const SsmSaved<T>& saved, const SsmConfig& cfg);

// ---- recurrent decode (SPEC §4) ----------------------------------------------------------------------

// Per sequence b: S [B, R] and the conv tail [B, 2, D] = (u_{t−2}, u_{t−1}).
template <typename T>
struct SsmDecodeState {
  std::vector<T> S;
  std::vector<T> conv_tail;
};

// The state before the first token: zeros.
template <typename T>
void ssm_decode_reset(SsmDecodeState<T>& state, int B, int D, int R);

// Hands over the state after a parallel ssm_forward over a prompt u [B, N, D] (N ≥ 1).
template <typename T>
void ssm_decode_prefill(SsmDecodeState<T>& state, const T* u, const SsmSaved<T>& saved, const SsmConfig& cfg);

// One token per sequence: y [B, D] from u [B, D], delta [B], F [B, 3]; advances state. cfg.N is ignored.
template <typename T>
void ssm_decode_step(T* y, SsmDecodeState<T>& state, const T* u, const T* delta, const T* F,
                     const SsmParams<T>& p, const SsmConfig& cfg);

}  // namespace muse
