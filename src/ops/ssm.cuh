// CUDA AR-SSM pieces (SPEC §2.6, §6 item 5): everything of ops/ssm.h except the GEMMs (W₁, W₂, W_U, W_V,
// W_O go through muse::cuda::linear_*), on device pointers, fp32 storage and arithmetic. The pieces have the
// contracts of the CPU pieces; the elementwise ones below spell out the steps of ssm_forward/ssm_backward in
// ops/ssm.cpp, so a GPU ssm_forward is:
//   hidden = W₁u + b₁ (GEMM);  ssm_relu_forward(hidden)                    (or a cuBLASLt ReLU epilogue)
//   chi_pre = W₂·hidden + b₂ (GEMM);  proj_u = W_U u;  proj_v = W_V u       (GEMMs)
//   mask: ssm_rank_mask_forward (mask on only)
//   ssm_gate_forward(chi, scan_in, chi_pre, mask, proj_u)                   χ = σ(chi_pre), p = proj_u⊙χ⊙m
//   ssm_scan_forward(S, scan_in, ell or null)
//   ssm_readout_forward(readout, S, proj_v, chi, mask)                      S⊙q, q = proj_v⊙χ⊙m
//   ssm_conv_forward(y, u, conv);  y += readout·W_Oᵀ + b_O                   (GEMM with β = 1)
// and ssm_backward (every buffer below zeroed or freshly accumulated into, as the CPU does):
//   ssm_conv_backward(du, dconv, dy, u, conv);  dreadout = dy·W_O (GEMM, with dW_O, db_O)
//   ssm_readout_backward(dS, dreadout, proj_v, chi, mask)                   dS = dreadout⊙q
//   ssm_scan_backward(dscan_in, dell, dS, S, scan_in, ell)
//   ssm_gate_backward(dproj_u, dproj_v, dchi_pre, dm, dscan_in, dreadout, S, proj_u, proj_v, chi, mask)
//   GEMM backward of W_U, W_V (dproj_u, dproj_v) and W₂ (dchi_pre) → dhidden;  ssm_relu_backward(dhidden, hidden)
//   GEMM backward of W₁ → du;  ssm_rank_mask_backward(ddelta, dF, grads, dm, mask, delta, F) (mask on only)
// scan_in (= p) is recomputed by ssm_gate_forward in the backward or kept from the forward.
//
// Differences from the CPU signatures (no host synchronisation): parameters are device pointers (SsmParams and
// SsmGrads hold device pointers here), and backward ops that reduce over rows take a caller-owned device
// `workspace` of <op>_workspace_floats(...) floats (allocate once for the largest shape, reuse on one stream),
// which may be null when the op has nothing to reduce. Reductions are two-stage in a fixed order (bit-
// reproducible for a given shape). Every *_backward ACCUMULATES (+=) into each non-null gradient, except
// ssm_relu_backward, which masks its buffer in place like ops/ssm.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "ops/ssm.h"

namespace muse::cuda {

// ---- pieces with a CPU counterpart (ops/ssm.h) -----------------------------------------------------------

// y [B, N, D] = depthwise causal conv of u with taps [3, D] (overwrites y).
void ssm_conv_forward(float* y, const float* u, const float* taps, int B, int N, int D, cudaStream_t stream = 0);

// du += … (= … with accumulate = false: du needs no zeroing), dtaps [3, D] += …. workspace:
// ssm_conv_backward_workspace_floats(B, N, D), needed only for dtaps.
size_t ssm_conv_backward_workspace_floats(int B, int N, int D);
void ssm_conv_backward(float* du, float* dtaps, const float* dy, const float* u, const float* taps, int B, int N,
                       int D, float* workspace, cudaStream_t stream = 0, bool accumulate = true);

// S [B, N, R] from p [B, N, R]; ell [R] (λ = σ(ℓ)) or null for the plain prefix sum. Chunked along time
// (docs/kernels/bk_ssm_hybrid.md).
void ssm_scan_forward(float* S, const float* p, const float* ell, int B, int N, int R, cudaStream_t stream = 0);

// dp += …, dell [R] += …. workspace: ssm_scan_backward_workspace_floats(B, R), needed only when ell and dell
// are both non-null.
size_t ssm_scan_backward_workspace_floats(int B, int R);
void ssm_scan_backward(float* dp, float* dell, const float* dS, const float* S, const float* p, const float* ell,
                       int B, int N, int R, float* workspace, cudaStream_t stream = 0);

// m [rows, R] from delta [rows], F [rows, 3] and the rank-mask fields of params. One warp per row (lane k
// evaluates hidden unit k of MLP_r, kSsmRankHidden == 32).
void ssm_rank_mask_forward(float* m, const float* delta, const float* F, const SsmParams<float>& params, int rows,
                           int R, cudaStream_t stream = 0);

// Accumulates ddelta [rows], dF [rows, 3] and the rank-mask fields of g (r_w1, r_b1, r_w2, r_b2, w_pi, b_pi).
// workspace: ssm_rank_mask_backward_workspace_floats(rows), needed when any of those fields is non-null.
size_t ssm_rank_mask_backward_workspace_floats(int rows);
void ssm_rank_mask_backward(float* ddelta, float* dF, const SsmGrads<float>& g, const float* dm, const float* m,
                            const float* delta, const float* F, const SsmParams<float>& params, int rows, int R,
                            float* workspace, cudaStream_t stream = 0);

// ---- the elementwise steps of ssm_forward / ssm_backward (rows = B·N; mask null when the mask is off) ------

// x = max(x, 0) in place, n elements.
void ssm_relu_forward(float* x, long n, cudaStream_t stream = 0);
// dhidden = 0 where hidden ≤ 0, in place (hidden is the forward's ReLU output), as ops/ssm.cpp does.
void ssm_relu_backward(float* dhidden, const float* hidden, long n, cudaStream_t stream = 0);

// chi = σ(chi_pre) (chi may be chi_pre), scan_in = proj_u⊙χ⊙m. All [rows, R].
void ssm_gate_forward(float* chi, float* scan_in, const float* chi_pre, const float* mask, const float* proj_u,
                      int rows, int R, cudaStream_t stream = 0);

// readout = S⊙(proj_v⊙χ⊙m). All [rows, R].
void ssm_readout_forward(float* readout, const float* S, const float* proj_v, const float* chi, const float* mask,
                         int rows, int R, cudaStream_t stream = 0);

// dS += dreadout⊙(proj_v⊙χ⊙m).
void ssm_readout_backward(float* dS, const float* dreadout, const float* proj_v, const float* chi,
                          const float* mask, int rows, int R, cudaStream_t stream = 0);

// With gate = χ⊙m, dq = dreadout⊙S and dgate = dscan_in⊙proj_u + dq⊙proj_v:
//   dproj_u += dscan_in⊙gate,  dproj_v += dq⊙gate,  dchi_pre += dgate⊙m⊙χ(1−χ),  dm += dgate⊙χ (mask on only).
// Each output may be null.
void ssm_gate_backward(float* dproj_u, float* dproj_v, float* dchi_pre, float* dm, const float* dscan_in,
                       const float* dreadout, const float* S, const float* proj_u, const float* proj_v,
                       const float* chi, const float* mask, int rows, int R, cudaStream_t stream = 0);

}  // namespace muse::cuda
