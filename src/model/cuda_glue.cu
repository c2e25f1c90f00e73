#include "model/cuda_glue.cuh"

#include <algorithm>

#include "common/cuda_check.cuh"
#include "common/math.h"

namespace muse::cuda {

namespace {

constexpr int kThreads = 256;
constexpr double kCurvatureMin = 0.01, kCurvatureMax = 10.0, kMixCentre = 0.55;  // model/muse_block.h, ops/hybrid.h

int blocks_for(size_t n) { return int(std::min<size_t>((n + kThreads - 1) / kThreads, 65535)); }

__global__ void add_scaled_kernel(float* y, const float* x, float scale, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    y[i] += scale * x[i];
}

__global__ void scale_kernel(float* y, float scale, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    y[i] *= scale;
}

__global__ void add_positions_kernel(float* x, const float* pos, size_t n, int N, int D) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const size_t row = i / D;
    x[i] += pos[(row % N) * D + i % D];
  }
}

__global__ void positions_backward_kernel(float* dpos, const float* dx, int B, int N, int D) {
  const size_t n = size_t(N) * D;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    float s = dpos[i];
    for (int b = 0; b < B; ++b) s += dx[size_t(b) * n + i];
    dpos[i] = s;
  }
}

__device__ float curvature_of(float c_raw) {
  return fminf(float(kCurvatureMin) + softplus(c_raw), float(kCurvatureMax));
}

__global__ void curvature_forward_kernel(float* c, float* mix_c, const float* c_raw, bool curvature_mix) {
  const float value = curvature_of(c_raw[0]);
  c[0] = value;
  mix_c[0] = curvature_mix ? value : float(kMixCentre);
}

__global__ void curvature_backward_kernel(float* dc_raw, const float* dc, const float* c_raw) {
  const float x = c_raw[0];
  if (float(kCurvatureMin) + softplus(x) < float(kCurvatureMax)) dc_raw[0] += dc[0] * sigmoid(x);
}

__global__ void log_kernel(float* out, const float* x, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    out[i] = logf(x[i]);
}

__global__ void log_backward_kernel(float* dx, const float* dlog, const float* x, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    dx[i] += dlog[i] / x[i];
}

__global__ void accumulate_loss_kernel(double* acc, const float* result, double scale) {
  acc[0] += scale * double(result[0]);
}

}  // namespace

void add_scaled(float* y, const float* x, float scale, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  add_scaled_kernel<<<blocks_for(n), kThreads, 0, stream>>>(y, x, scale, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

// 1·x[i] is x[i] exactly, so this is the plain sum.
void add_inplace(float* y, const float* x, size_t n, cudaStream_t stream) { add_scaled(y, x, 1.f, n, stream); }

void scale_inplace(float* y, float scale, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  scale_kernel<<<blocks_for(n), kThreads, 0, stream>>>(y, scale, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void add_positions(float* x, const float* pos, int B, int N, int D, cudaStream_t stream) {
  const size_t n = size_t(B) * N * D;
  if (n == 0) return;
  add_positions_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, pos, n, N, D);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void positions_backward(float* dpos, const float* dx, int B, int N, int D, cudaStream_t stream) {
  const size_t n = size_t(N) * D;
  if (n == 0) return;
  positions_backward_kernel<<<blocks_for(n), kThreads, 0, stream>>>(dpos, dx, B, N, D);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void curvature_forward(float* c, float* mix_c, const float* c_raw, bool curvature_mix, cudaStream_t stream) {
  curvature_forward_kernel<<<1, 1, 0, stream>>>(c, mix_c, c_raw, curvature_mix);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void curvature_backward(float* dc_raw, const float* dc, const float* c_raw, cudaStream_t stream) {
  curvature_backward_kernel<<<1, 1, 0, stream>>>(dc_raw, dc, c_raw);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void log_elementwise(float* out, const float* x, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  log_kernel<<<blocks_for(n), kThreads, 0, stream>>>(out, x, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void log_backward(float* dx, const float* dlog, const float* x, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  log_backward_kernel<<<blocks_for(n), kThreads, 0, stream>>>(dx, dlog, x, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void accumulate_loss(double* acc, const float* result, double scale, cudaStream_t stream) {
  accumulate_loss_kernel<<<1, 1, 0, stream>>>(acc, result, scale);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace muse::cuda
