// CUDA LayerNorm + radius: the same contract as ops/layernorm.h, on device pointers (fp32 for now;
// bf16 storage arrives with the GPU training path). One warp per row.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace muse::cuda {

void layernorm_forward(float* y, float* mean, float* rstd, float* radius, const float* x, const float* gain,
                       const float* bias, int rows, int D, cudaStream_t stream = 0);

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
