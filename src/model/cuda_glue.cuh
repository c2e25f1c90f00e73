// The small elementwise steps the GPU model (model/cuda_model.h) needs between the op kernels: residual
// adds, learned positions, the curvature c = f(c_raw) and its derivative, the key gate's log, the loss
// accumulator. Device pointers, fp32, on the given stream; deterministic (no atomics).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace muse::cuda {

// y[i] += x[i], n elements.
void add_inplace(float* y, const float* x, size_t n, cudaStream_t stream);
// y[i] += scale·x[i].
void add_scaled(float* y, const float* x, float scale, size_t n, cudaStream_t stream);
// y[i] *= scale.
void scale_inplace(float* y, float scale, size_t n, cudaStream_t stream);

// x[b, n, :] += pos[n, :] (learned positions, SPEC §2.3), B·N rows of width D.
void add_positions(float* x, const float* pos, int B, int N, int D, cudaStream_t stream);
// dpos[n, :] += Σ_b dx[b, n, :], summed over b in order.
void positions_backward(float* dpos, const float* dx, int B, int N, int D, cudaStream_t stream);

// c = min(0.01 + softplus(c_raw), 10) (SPEC §2.1) into c[0], and into mix_c[0] the curvature the curvature mix
// reads: c itself, or the mix's centre 0.55 when the mix is off (α = 1/2).
void curvature_forward(float* c, float* mix_c, const float* c_raw, bool curvature_mix, cudaStream_t stream);
// dc_raw[0] += dc[0]·∂c/∂c_raw.
void curvature_backward(float* dc_raw, const float* dc, const float* c_raw, cudaStream_t stream);

// out[i] = log(x[i]).
void log_elementwise(float* out, const float* x, size_t n, cudaStream_t stream);
// dx[i] += dlog[i] / x[i] (the backward of log_elementwise).
void log_backward(float* dx, const float* dlog, const float* x, size_t n, cudaStream_t stream);

// acc[0] += scale·result[0] (double): the mean losses of the micro-batches of one step, read once per step.
void accumulate_loss(double* acc, const float* result, double scale, cudaStream_t stream);

}  // namespace muse::cuda
