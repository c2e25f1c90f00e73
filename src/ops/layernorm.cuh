// CUDA LayerNorm + radius: the same contract as ops/layernorm.h, on device pointers (fp32 for now;
// bf16 storage arrives with the GPU training path). One warp per row.
#pragma once
#include <cuda_runtime.h>

namespace muse::cuda {

void layernorm_forward(float* y, float* mean, float* rstd, float* radius, const float* x, const float* gain,
                       const float* bias, int rows, int D, cudaStream_t stream = 0);

// Accumulates into dx, dgain and dbias like the CPU op. dradius may be null.
void layernorm_backward(float* dx, float* dgain, float* dbias, const float* dy, const float* dradius,
                        const float* x, const float* gain, const float* mean, const float* rstd, int rows, int D,
                        cudaStream_t stream = 0);

}  // namespace muse::cuda
