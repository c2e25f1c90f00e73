// CUDA LayerNorm + radius: the same contract as ops/layernorm.h, on device pointers (fp32). One warp per row.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace muse::cuda {

// With y_bf16, the output is also written rounded to bf16 there (the bf16 operand of the GEMMs that read it,
// in the model's bf16 math); y may then be null.
void layernorm_forward(float* y, float* mean, float* rstd, float* radius, const float* x, const float* gain,
                       const float* bias, int rows, int D, cudaStream_t stream = 0, __nv_bfloat16* y_bf16 = nullptr);

// Accumulates into dx, dgain and dbias like the CPU op. dradius may be null.
void layernorm_backward(float* dx, float* dgain, float* dbias, const float* dy, const float* dradius,
                        const float* x, const float* gain, const float* mean, const float* rstd, int rows, int D,
                        cudaStream_t stream = 0);

// The parameter part alone: dgain += Σ_rows dy·x̂, dbias += Σ_rows dy (either may be null), deterministic,
// with the partial sums in a workspace of layernorm_params_workspace_floats(rows, D) floats (the fused
// residual-mix epilogue of ops/hybrid.cuh shares it; layernorm_backward uses the GEMM workspace).
size_t layernorm_params_workspace_floats(int rows, int D);
void layernorm_backward_params(float* dgain, float* dbias, const float* dy, const float* x, const float* mean,
                               const float* rstd, int rows, int D, float* workspace, size_t workspace_floats,
                               cudaStream_t stream = 0);

}  // namespace muse::cuda
