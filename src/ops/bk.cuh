// CUDA BK-Core (SPEC §2.4, §2.7, §6 item 2): the same contracts as ops/bk.h on device pointers, fp32
// storage and fp32 arithmetic (recurrences in fp32). Complex values are interleaved (Re, Im) floats.
//
// Differences from the CPU signatures, all forced by "no host synchronisation":
//   * Parameters live on the device, so bk_layer_* read b_v, b_J, ε_p, E₀ through BkParams' device pointers
//     (j_max stays a host value, as on the CPU). The stand-alone causal/features ops keep E0 and eta by value
//     (the CPU contract; they serve tests and analysis — the model goes through bk_layer_*).
//   * Scalar outputs (dE0, deta) are device pointers to one float each.
//   * Backward ops that reduce over rows take a caller-owned device `workspace` of at least
//     <op>_workspace_floats(...) floats (allocate once for the largest shape, reuse on one stream; two
//     streams need two workspaces). It may be null when the op has nothing to reduce (see each op).
//     Reductions are two-stage in a fixed order: results are bit-reproducible for a given shape.
//
// Every *_backward ACCUMULATES (+=) into each non-null gradient, like the CPU op.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "ops/bk.h"

namespace muse::cuda {

// g_t = 1/(a_t − z − J2_t·g_{t−1}), z = E0 + i·eta. a, J2 [B, N] (J2 null: pointwise), g [B, N, 2].
// One warp per batch row; the warp loads 32 steps at a time and broadcasts them through shuffles.
void bk_causal_forward(float* g, const float* a, const float* J2, float E0, float eta, int B, int N,
                       cudaStream_t stream = 0);

// da, dJ2 [B, N]; dE0, deta: one device float each. workspace: bk_causal_backward_workspace_floats(B)
// floats, needed only when dE0 or deta is non-null.
size_t bk_causal_backward_workspace_floats(int B);
void bk_causal_backward(float* da, float* dJ2, float* dE0, float* deta, const float* dg, const float* g,
                        const float* J2, int B, int N, float* workspace, cudaStream_t stream = 0);

// F_t = (η·Re g_t, η·Im g_t, η·|g_t|). g [rows, 2], F [rows, 3].
void bk_features_forward(float* F, const float* g, float eta, int rows, cudaStream_t stream = 0);

// dg [rows, 2]; deta one device float. workspace: bk_features_backward_workspace_floats(rows), needed only
// when deta is non-null.
size_t bk_features_backward_workspace_floats(int rows);
void bk_features_backward(float* dg, float* deta, const float* dF, const float* g, float eta, int rows,
                          float* workspace, cudaStream_t stream = 0);

// The BK layer (v, a, J, J2, η, g, F) from u [B, N, D]. params: device pointers (j_max a host value).
// Two launches: one warp per row for the projections w_v·u (and w_J·u, both halves), then one warp per batch
// row for the scan, with J = J_max·tanh(·) and the features F fused into it.
void bk_layer_forward(float* g, float* F, const BkSaved<float>& saved, const float* u, const BkParams<float>& params,
                      bool hopping, int B, int N, int D, cudaStream_t stream = 0);

// workspace: bk_layer_backward_workspace_floats(B, N, D) floats (always needed).
size_t bk_layer_backward_workspace_floats(int B, int N, int D);
void bk_layer_backward(float* du, const BkGrads<float>& grads, const float* dg, const float* dF, const float* u,
                       const float* g, const BkSaved<float>& saved, const BkParams<float>& params, bool hopping,
                       int B, int N, int D, float* workspace, cudaStream_t stream = 0);

// out[r, j] = σ(W_j·F_r + b_j). F [rows, 3], W [k, 3], b [k], out [rows, k].
void bk_gate_forward(float* out, const float* F, const float* W, const float* b, int rows, int k,
                     cudaStream_t stream = 0);

// workspace: bk_gate_backward_workspace_floats(rows, k), needed only when dW or db is non-null.
size_t bk_gate_backward_workspace_floats(int rows, int k);
void bk_gate_backward(float* dF, float* dW, float* db, const float* dout, const float* out, const float* F,
                      const float* W, int rows, int k, float* workspace, cudaStream_t stream = 0);

}  // namespace muse::cuda
