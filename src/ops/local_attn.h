// Windowed hyperbolic attention, the local path of every block (SPEC §2.5, §2.3 alibi, §2.7 key gate).
//
// q, k, v [B, N, D] hold H heads of d_h = D/H packed in D (head h = columns h·d_h … (h+1)·d_h − 1). Per
// batch row b, head h and query i:
//
//   s_ij = −softplus(β_h)·d_c(exp_c q_i, exp_c k_j)  [− m_h·(i − j) with alibi]  [+ log μ_{b,j,h}]
//   o_i  = Σ_{j ∈ window(i)} softmax_j(s_ij)·v_j                   (values stay in the tangent space)
//
// with d_c by the log-domain formula of §2.1 (ops/poincare.h: no ball point is ever formed), alibi slopes
// m_h = 2^{−8(h+1)/H}, and window(i) = {j ≤ i in the block of W tokens containing i} (block mode) or
// {i − W < j ≤ i} (sliding mode). Positions outside the window are never read, so a non-finite value
// there cannot leak. The output projection W_o is applied by the caller; the curvature c is a plain
// positive scalar here (the model maps c_raw → c and chains dc itself).
//
// The forward saves the log-sum-exp of each query's scores; the backward recomputes scores and
// probabilities from it instead of storing N×W matrices. Work is O(B·N·W·D), parallel over (b, h).
#pragma once

namespace muse {

struct LocalAttnConfig {
  int B = 0, N = 0, H = 0, D = 0;  // D must be a multiple of H
  int window = 64;                  // W ≥ 1
  bool sliding = true;              // false: non-overlapping blocks of W tokens
  bool alibi = false;
};

// First key position query i attends to (the last is i itself).
inline int local_attn_window_start(int i, const LocalAttnConfig& cfg) {
  if (cfg.sliding) return i - cfg.window + 1 > 0 ? i - cfg.window + 1 : 0;
  return i - i % cfg.window;
}

// Alibi slope of head h of H: 2^{−8(h+1)/H}.
double local_attn_alibi_slope(int h, int H);

// o [B, N, D]; lse [B, N, H] receives log Σ_j e^{s_ij} (saved for the backward). beta [H] is the raw
// temperature (scale softplus(β_h)); log_mu [B, N, H] is the key-gate bias of key j (null: no gate).
template <typename T>
void local_attn_forward(T* o, T* lse, const T* q, const T* k, const T* v, T c, const T* beta, const T* log_mu,
                        const LocalAttnConfig& cfg);

// Accumulates dq, dk, dv [B, N, D], dc (scalar), dbeta [H] and dlog_mu [B, N, H] (each may be null;
// dlog_mu is ignored when log_mu is null) from d_o [B, N, D], given the forward's inputs, its output o
// and its lse. dc and dbeta are reduced from per-(b, h) partials in index order (thread-count
// independent).
template <typename T>
void local_attn_backward(T* dq, T* dk, T* dv, T* dc, T* dbeta, T* dlog_mu, const T* d_o, const T* o, const T* lse,
                         const T* q, const T* k, const T* v, T c, const T* beta, const T* log_mu,
                         const LocalAttnConfig& cfg);

}  // namespace muse
