// CUDA feed-forward branches (SPEC §2.9 low-rank FFN, §2.8 dense GELU MLP): the same contract and the same
// parameter/gradient/saved structs as ops/ffn.h (instantiated for float, device pointers). Every matrix
// product is a cuBLASLt GEMM of ops/linear.cuh (fp32, or TF32 in the model's fast mode); GELU (exact erf form), the cap10 and their
// derivatives are elementwise kernels.
//
// Backward scratch: the intermediate gradients (∂L/∂low2, ∂L/∂pre, ∂L/∂low1) need device memory the caller
// provides (`scratch`, at least *_backward_scratch_floats(...) floats, 256-byte aligned like any
// cudaMalloc pointer). It need not be initialised (the intermediates are written with beta = 0 GEMMs),
// and its contents are garbage afterwards.
//
// Inference may pass saved.hidden == saved.pre (the GELU runs in place); the backward needs them apart.
// The GELU buffers must be 16-byte aligned (its kernels move 4 floats at a time).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "ops/ffn.h"

namespace muse::cuda {

// rows·(2·rank + 4D) floats, each part rounded up to 64 floats.
size_t lowrank_ffn_backward_scratch_floats(int rows, int D, int rank);
// rows·4D floats.
size_t dense_mlp_backward_scratch_floats(int rows, int D);

// y[rows, D] = U₂ V₂ cap10(GELU(U₁ V₁ x + b₁)) + b₂ (+ residual[rows, D] when given: the block's residual
// stream, added by the last GEMM); writes saved.low1, pre, hidden, low2.
void lowrank_ffn_forward(float* y, const LowRankFfnSaved<float>& saved, const float* x,
                         const LowRankFfnParams<float>& params, int rows, int D, int rank, cudaStream_t stream = 0,
                         const float* residual = nullptr);

// dx += ∂L/∂x and every non-null member of grads += its gradient, from dy[rows, D]. dx may be null.
void lowrank_ffn_backward(float* dx, const LowRankFfnGrads<float>& grads, const float* dy,
                          const LowRankFfnSaved<float>& saved, const float* x, const LowRankFfnParams<float>& params,
                          int rows, int D, int rank, float* scratch, cudaStream_t stream = 0);

// The low-rank FFN on bf16 operands (the model's bf16 math): x and the four weight matrices (`weights`,
// bf16 copies of params') arrive in bf16; low1, pre, hidden, low2 are stored in bf16, every GEMM accumulates
// in fp32, and y, the biases (taken from params) and every gradient are fp32. pre holds U₁V₁x *without* b₁
// (the GELU kernels add it: one pass over the 4D-wide layer fewer). Half the bytes of the fp32 op over the
// 4D-wide layer, and bf16 tensor cores. The 4D-wide buffers must be 8-byte aligned, b₁ 16-byte.
void lowrank_ffn_forward_bf16(float* y, const LowRankFfnSaved<__nv_bfloat16>& saved, const __nv_bfloat16* x,
                              const LowRankFfnParams<float>& params, const LowRankFfnParams<__nv_bfloat16>& weights,
                              int rows, int D, int rank, cudaStream_t stream = 0, const float* residual = nullptr);

// Scratch of the bf16 backward, in floats: dy rounded, ∂low2, ∂low1 and ∂pre in bf16.
size_t lowrank_ffn_bf16_backward_scratch_floats(int rows, int D, int rank);

// dx += ∂L/∂x (dx = ∂L/∂x with accumulate = false: dx needs no zeroing) and every non-null member of grads +=
// its gradient (fp32), from fp32 dy.
void lowrank_ffn_backward_bf16(float* dx, const LowRankFfnGrads<float>& grads, const float* dy,
                               const LowRankFfnSaved<__nv_bfloat16>& saved, const __nv_bfloat16* x,
                               const LowRankFfnParams<float>& params, const LowRankFfnParams<__nv_bfloat16>& weights,
                               int rows, int D, int rank, float* scratch, cudaStream_t stream = 0,
                               bool accumulate = true);

// y[rows, D] = W₂ GELU(W₁ x + b₁) + b₂; writes saved.pre, hidden.
void dense_mlp_forward(float* y, const DenseMlpSaved<float>& saved, const float* x, const DenseMlpParams<float>& params,
                       int rows, int D, cudaStream_t stream = 0);

void dense_mlp_backward(float* dx, const DenseMlpGrads<float>& grads, const float* dy, const DenseMlpSaved<float>& saved,
                        const float* x, const DenseMlpParams<float>& params, int rows, int D, float* scratch,
                        cudaStream_t stream = 0);

}  // namespace muse::cuda
