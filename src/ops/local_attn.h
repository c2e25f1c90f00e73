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
#include <vector>

#include "ops/poincare.h"

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

// ---- recurrent decode (SPEC §4) ----------------------------------------------------------------------
// The keys the next query of one sequence can see: a ring buffer of the last W tangent keys and values
// with, per cached key and head, its TangentNorm (√c‖k‖, ln sinh 2a, …) and log μ, so a decode step
// costs one dot product and the pair terms of the distance per key. In block mode the buffer holds the
// current block only and is emptied at each block boundary. cfg.B and cfg.N are ignored by the decode
// functions; c must be the curvature the keys were pushed with.
template <typename T>
struct LocalAttnDecodeState {
  int count = 0;                          // keys held (≤ W)
  int start = 0;                          // slot of the oldest key
  std::vector<T> keys, values;            // [W, D]
  std::vector<TangentNorm<T>> key_norms;  // [W, H]
  std::vector<T> log_mu;                  // [W, H]; empty without the key gate
};

// An empty buffer for cfg.window keys of width cfg.D (with room for log μ when gated).
template <typename T>
void local_attn_decode_reset(LocalAttnDecodeState<T>& state, const LocalAttnConfig& cfg, bool gated);

// Adds the key and value [D] of `position` (and its log μ [H] when gated; null otherwise). In block mode a
// position on a block boundary empties the buffer first; a full buffer drops its oldest key.
template <typename T>
void local_attn_decode_push(LocalAttnDecodeState<T>& state, const T* k, const T* v, const T* log_mu, T c,
                            int position, const LocalAttnConfig& cfg);

// The prefill hand-over: pushes the keys of positions max(0, N − W) … N − 1 of one sequence's k, v [N, D]
// and log_mu [N, H] (null: no gate), the only ones position N and later can attend to.
template <typename T>
void local_attn_decode_prefill(LocalAttnDecodeState<T>& state, const T* k, const T* v, const T* log_mu, T c, int N,
                               const LocalAttnConfig& cfg);

// o [D] for the query q [D] of the newest pushed position against every key in the buffer: the same
// scores, softmax and value sum, in the same key order, as local_attn_forward's row for that position.
template <typename T>
void local_attn_decode_step(T* o, const LocalAttnDecodeState<T>& state, const T* q, T c, const T* beta,
                            const LocalAttnConfig& cfg);

}  // namespace muse
