// CUDA mixing epilogue of a block (SPEC §2.7, §2.8, §6 item 6): curvature mix, Phase 7 hybrid gate and the
// gated residual update h_out = h + LN_h(cap30(ξ⊙y_att + (1−ξ)⊙y_glob)), on device pointers, fp32 storage and
// arithmetic, with the contracts of ops/hybrid.h.
//
// Differences from the CPU signatures (no host synchronisation): the scalars c (curvature) and s (Phase 7 gate
// slope) are computed from parameters on the device, so they come in as device pointers to one float, and
// their gradients dc, ds are device pointers to one float. Backward ops that reduce over rows take a
// caller-owned device `workspace` of <op>_workspace_floats(...) floats (allocate once for the largest shape,
// reuse on one stream), which may be null when the op has nothing to reduce. Reductions are two-stage in a
// fixed order (bit-reproducible for a given shape). Every *_backward ACCUMULATES (+=) into each non-null
// gradient, except where accumulate = false asks it to write its per-row outputs (a backward pass's first
// writer of a buffer: no zeroing pass, no read of zeros).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "ops/hybrid.h"

namespace muse::cuda {

// y_att = α·y_loc + (1−α)·y_lin, α = σ(10·(c − 0.55)); all [rows, width]; c: device pointer to one float.
void curvature_mix_forward(float* y_att, const float* y_loc, const float* y_lin, const float* c, int rows, int width,
                           cudaStream_t stream = 0);
// The same, y_att rounded to bf16 (the output projection's operand in the model's bf16 math).
void curvature_mix_forward(__nv_bfloat16* y_att, const float* y_loc, const float* y_lin, const float* c, int rows,
                           int width, cudaStream_t stream = 0);

// workspace: curvature_mix_backward_workspace_floats(rows, width), needed only when dc is non-null. With
// accumulate = false, dy_loc and dy_lin are written instead of added to (they need no zeroing; dc still adds).
size_t curvature_mix_backward_workspace_floats(int rows, int width);
void curvature_mix_backward(float* dy_loc, float* dy_lin, float* dc, const float* dy_att, const float* y_loc,
                            const float* y_lin, const float* c, int rows, int width, float* workspace,
                            cudaStream_t stream = 0, bool accumulate = true);

// ξ_r = σ(s·|Im g_r|); g [rows, 2] interleaved; s: device pointer to one float.
void phase7_gate_forward(float* xi, const float* g, const float* s, int rows, cudaStream_t stream = 0);

// workspace: phase7_gate_backward_workspace_floats(rows), needed only when ds is non-null.
size_t phase7_gate_backward_workspace_floats(int rows);
void phase7_gate_backward(float* dg, float* ds, const float* dxi, const float* xi, const float* g, const float* s,
                          int rows, float* workspace, cudaStream_t stream = 0);

// One warp per row: z = ξ·y_att + (1−ξ)·y_glob, capped = cap30(z) (saved), LN_h statistics (saved), and
// h_out = h + LN_h(capped) in one pass. h_out may be h.
void residual_mix_forward(float* h_out, const ResidualMixSaved<float>& saved, const float* h, const float* y_att,
                          const float* y_glob, const float* xi, const float* gain, const float* bias, int rows, int D,
                          cudaStream_t stream = 0);

// dh += dh_out (dh must not alias dh_out); dy_att, dy_glob [rows, D], dxi [rows], dgain, dbias [D]; each may be
// null. workspace: residual_mix_backward_workspace_floats(rows, D), needed only for dgain or dbias. With
// accumulate = false, dy_att, dy_glob and dxi are written instead of added to (they need no zeroing).
size_t residual_mix_backward_workspace_floats(int rows, int D);
void residual_mix_backward(float* dh, float* dy_att, float* dy_glob, float* dxi, float* dgain, float* dbias,
                           const float* dh_out, const ResidualMixSaved<float>& saved, const float* y_att,
                           const float* y_glob, const float* xi, const float* gain, int rows, int D, float* workspace,
                           cudaStream_t stream = 0, bool accumulate = true);

}  // namespace muse::cuda
