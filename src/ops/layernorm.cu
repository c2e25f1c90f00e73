#include "common/column_reduce.cuh"
#include "common/row_columns.cuh"
#include "common/cuda_check.cuh"
#include "ops/layernorm.cuh"
#include "ops/layernorm.h"
#include "ops/linear.cuh"

namespace muse::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // one warp per row, 8 warps per block

__device__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__global__ void layernorm_forward_kernel(float* y, __nv_bfloat16* y_bf16, float* mean, float* rstd, float* radius,
                                         const float* x, const float* gain, const float* bias, int rows, int D) {
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const float* xr = x + (long)row * D;
  float sum = 0, sq = 0;
  for (int i = lane; i < D; i += kWarp) {
    sum += xr[i];
    sq += xr[i] * xr[i];
  }
  const float mu = warp_sum(sum) / D;
  // Second pass for the variance: the row is in L1, and it avoids E[x²] − μ² cancellation.
  float var = 0;
  for (int i = lane; i < D; i += kWarp) {
    const float d = xr[i] - mu;
    var += d * d;
  }
  const float rs = rsqrtf(warp_sum(var) / D + float(kLayerNormEps));
  float* yr = y ? y + (long)row * D : nullptr;
  __nv_bfloat16* yr_bf16 = y_bf16 ? y_bf16 + (long)row * D : nullptr;
  for (int base = lane; base < D; base += kColumnBatch * kWarp) {
    float xv[kColumnBatch], g[kColumnBatch], c[kColumnBatch];
    load_columns(xv, xr, base, D), load_columns(g, gain, base, D), load_columns(c, bias, base, D);
#pragma unroll
    for (int u = 0; u < kColumnBatch; ++u) {
      const int i = base + u * kWarp;
      if (i >= D) break;
      const float value = (xv[u] - mu) * rs * g[u] + c[u];
      if (yr) yr[i] = value;
      if (yr_bf16) yr_bf16[i] = __float2bfloat16_rn(value);
    }
  }
  sq = warp_sum(sq);
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
    if (radius) radius[row] = 2.f * sqrtf(sq) * rsqrtf(float(D));
  }
}

__global__ void layernorm_backward_input_kernel(float* dx, const float* dy, const float* dradius, const float* x,
                                                const float* gain, const float* mean, const float* rstd, int rows,
                                                int D) {
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const float* xr = x + (long)row * D;
  const float* dyr = dy + (long)row * D;
  const float mu = mean[row], rs = rstd[row];
  float mean_g = 0, mean_gx = 0, sq = 0;
  for (int i = lane; i < D; i += kWarp) {
    const float g = dyr[i] * gain[i];
    mean_g += g;
    mean_gx += g * (xr[i] - mu) * rs;
    sq += xr[i] * xr[i];
  }
  mean_g = warp_sum(mean_g) / D;
  mean_gx = warp_sum(mean_gx) / D;
  sq = warp_sum(sq);
  float radius_scale = 0;
  if (dradius && sq > 0) radius_scale = dradius[row] * 2.f * rsqrtf(float(D)) * rsqrtf(sq);
  float* dxr = dx + (long)row * D;
  for (int base = lane; base < D; base += kColumnBatch * kWarp) {
    float xv[kColumnBatch], dyv[kColumnBatch], g[kColumnBatch], old[kColumnBatch];
    load_columns(xv, xr, base, D), load_columns(dyv, dyr, base, D), load_columns(g, gain, base, D);
    load_columns(old, dxr, base, D);
#pragma unroll
    for (int u = 0; u < kColumnBatch; ++u) {
      const int i = base + u * kWarp;
      if (i >= D) break;
      const float xhat = (xv[u] - mu) * rs;
      dxr[i] = old[u] + (rs * (dyv[u] * g[u] - mean_g - xhat * mean_gx) + radius_scale * xv[u]);
    }
  }
}

// Terms of dgain (Σ dy·x̂) and dbias (Σ dy) for common/column_reduce.cuh.
struct ParamTerms {
  const float *dy, *x, *mean, *rstd;
  int D;
  __device__ void operator()(long r, int c, float (&acc)[2]) const {
    const float d = dy[r * D + c];
    acc[0] += d * (x[r * D + c] - mean[r]) * rstd[r];
    acc[1] += d;
  }
};

}  // namespace

void layernorm_forward(float* y, float* mean, float* rstd, float* radius, const float* x, const float* gain,
                       const float* bias, int rows, int D, cudaStream_t stream, __nv_bfloat16* y_bf16) {
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  layernorm_forward_kernel<<<grid, block, 0, stream>>>(y, y_bf16, mean, rstd, radius, x, gain, bias, rows, D);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void layernorm_backward(float* dx, float* dgain, float* dbias, const float* dy, const float* dradius,
                        const float* x, const float* gain, const float* mean, const float* rstd, int rows, int D,
                        cudaStream_t stream) {
  if (dx) {
    const dim3 block(kWarp, kRowsPerBlock);
    const dim3 grid((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    layernorm_backward_input_kernel<<<grid, block, 0, stream>>>(dx, dy, dradius, x, gain, mean, rstd, rows, D);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
  if (dgain || dbias) {
    // The partials live in the GEMM workspace: it is free between the GEMMs of the same stream.
    layernorm_backward_params(dgain, dbias, dy, x, mean, rstd, rows, D,
                              static_cast<float*>(BlasLt::current().workspace()),
                              BlasLt::kWorkspaceBytes / sizeof(float), stream);
  }
}

size_t layernorm_params_workspace_floats(int rows, int D) { return column_reduce_workspace_floats<2>(rows, D); }

void layernorm_backward_params(float* dgain, float* dbias, const float* dy, const float* x, const float* mean,
                               const float* rstd, int rows, int D, float* workspace, size_t workspace_floats,
                               cudaStream_t stream) {
  if (!dgain && !dbias) return;
  column_reduce<2>({dgain, dbias}, ParamTerms{dy, x, mean, rstd, D}, rows, D, workspace, workspace_floats, stream);
}

}  // namespace muse::cuda
