// CUDA mixing epilogue: curvature mix, Phase 7 hybrid gate, gated residual update with cap30 + LN_h fused in
// one row pass (see hybrid.cuh and docs/kernels/bk_ssm_hybrid.md). fp32 storage and arithmetic.
#include <algorithm>
#include <cstdint>

#include "common/bf16_pack.cuh"
#include "common/cuda_check.cuh"
#include "common/math.h"
#include "common/row_columns.cuh"
#include "ops/hybrid.cuh"
#include "ops/layernorm.cuh"
#include "ops/layernorm.h"

namespace muse::cuda {

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kRowWarps = 8;            // warps per block for one-warp-per-row kernels
constexpr int kReduceThreads = 256;     // block size of the first stage of the scalar reductions
constexpr int kReduceMaxBlocks = 1024;  // fixed upper bound of its grid (the grid depends on the size only)

int ceil_div(long a, long b) { return int((a + b - 1) / b); }
int reduce_blocks(long n) { return std::max(1, std::min(ceil_div(n, kReduceThreads), kReduceMaxBlocks)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFull, v, offset);
  return v;
}

// Sum over a block of kReduceThreads threads in a fixed order; valid in thread 0. Every thread must call it.
__device__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float s = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kReduceThreads / kWarp; ++w) s += scratch[w];
  return s;
}

// Σ partial[0..count) in a fixed order by one warp.
__device__ float warp_sum_partials(const float* partial, int count) {
  float s = 0.f;
  for (int i = threadIdx.x; i < count; i += kWarp) s += partial[i];
  return warp_sum(s);
}

__device__ __forceinline__ float mix_alpha(float c) {
  return sigmoid(float(kCurvatureMixSlope) * (c - float(kCurvatureMixCentre)));
}

// ---- curvature mix ---------------------------------------------------------------------------------------

__device__ __forceinline__ void store4(float* y, float4 v) { *reinterpret_cast<float4*>(y) = v; }
__device__ __forceinline__ void store4(__nv_bfloat16* y, float4 v) { *reinterpret_cast<uint2*>(y) = narrow4(v); }

// kVectors: four elements per thread by 16-byte accesses (n a multiple of 4, every array 16-byte aligned);
// otherwise one.
template <bool kVectors, class Out>
__global__ void curvature_mix_forward_kernel(Out* y_att, const float* y_loc, const float* y_lin, const float* c,
                                             long n) {
  const long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * (kVectors ? 4 : 1);
  if (i >= n) return;
  const float alpha = mix_alpha(c[0]);
  const float beta = 1.f - alpha;
  if constexpr (kVectors) {
    const float4 a = *reinterpret_cast<const float4*>(y_loc + i), b = *reinterpret_cast<const float4*>(y_lin + i);
    store4(y_att + i, make_float4(alpha * a.x + beta * b.x, alpha * a.y + beta * b.y, alpha * a.z + beta * b.z,
                                  alpha * a.w + beta * b.w));
  } else {
    const float v = alpha * y_loc[i] + beta * y_lin[i];
    if constexpr (sizeof(Out) == 4)
      y_att[i] = v;
    else
      y_att[i] = __float2bfloat16_rn(v);
  }
}

template <class Out>
void launch_curvature_mix_forward(Out* y_att, const float* y_loc, const float* y_lin, const float* c, long n,
                                  cudaStream_t stream) {
  if (n <= 0) return;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (n % 4 == 0 && aligned(y_att) && aligned(y_loc) && aligned(y_lin))
    curvature_mix_forward_kernel<true><<<ceil_div(n / 4, 256), 256, 0, stream>>>(y_att, y_loc, y_lin, c, n);
  else
    curvature_mix_forward_kernel<false><<<ceil_div(n, 256), 256, 0, stream>>>(y_att, y_loc, y_lin, c, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

// Grid-stride over the n elements with a grid fixed by n; partial[block] = Σ dy_att⊙(y_loc − y_lin).
__global__ void curvature_mix_backward_kernel(float* dy_loc, float* dy_lin, float* partial, const float* dy_att,
                                              const float* y_loc, const float* y_lin, const float* c, bool accumulate,
                                              long n) {
  __shared__ float scratch[kReduceThreads / kWarp];
  const float alpha = mix_alpha(c[0]);
  const float beta = 1.f - alpha;
  float dot = 0.f;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
    const float d = dy_att[i];
    if (dy_loc) dy_loc[i] = (accumulate ? dy_loc[i] : 0.f) + alpha * d;
    if (dy_lin) dy_lin[i] = (accumulate ? dy_lin[i] : 0.f) + beta * d;
    if (partial) dot += d * (y_loc[i] - y_lin[i]);
  }
  if (partial) {
    const float s = block_sum(dot, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
  }
}

__global__ void curvature_mix_finish_kernel(float* dc, const float* partial, int blocks, const float* c) {
  const float s = warp_sum_partials(partial, blocks);
  if (threadIdx.x == 0) {
    const float alpha = mix_alpha(c[0]);
    dc[0] += float(kCurvatureMixSlope) * alpha * (1.f - alpha) * s;
  }
}

// ---- Phase 7 gate ----------------------------------------------------------------------------------------

__global__ void phase7_gate_forward_kernel(float* xi, const float* g, const float* s, int rows) {
  const long r = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r < rows) xi[r] = sigmoid(s[0] * fabsf(g[2 * r + 1]));
}

__global__ void phase7_gate_backward_kernel(float* dg, float* partial, const float* dxi, const float* xi,
                                            const float* g, const float* s, int rows) {
  __shared__ float scratch[kReduceThreads / kWarp];
  const float slope = s[0];
  float acc = 0.f;
  for (long r = (long)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += (long)gridDim.x * blockDim.x) {
    const float im = g[2 * r + 1];
    const float dpre = dxi[r] * xi[r] * (1.f - xi[r]);
    if (dg) dg[2 * r + 1] += dpre * slope * (im < 0.f ? -1.f : 1.f);
    acc += dpre * fabsf(im);
  }
  if (partial) {
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
  }
}

__global__ void sum_partials_kernel(float* out, const float* partial, int blocks) {
  const float s = warp_sum_partials(partial, blocks);
  if (threadIdx.x == 0) out[0] += s;
}

// ---- gated residual update -------------------------------------------------------------------------------

// One warp per row: mix, cap30, LayerNorm statistics (two passes, as ops/layernorm) and the residual add.
// Every lane re-reads only the elements of `capped` it wrote itself.
__global__ void residual_mix_forward_kernel(float* h_out, float* capped, float* mean, float* rstd, const float* h,
                                            const float* y_att, const float* y_glob, const float* xi,
                                            const float* gain, const float* bias, int rows, int D) {
  const long row = (long)blockIdx.x * kRowWarps + threadIdx.y;
  if (row >= rows) return;  // warp-uniform
  const int lane = threadIdx.x;
  const long o = row * D;
  const float gate = xi[row], rest = 1.f - xi[row];
  const float limit = float(kResidualCap);
  float sum = 0.f;
  for (int base = lane; base < D; base += kColumnBatch * kWarp) {
    float att[kColumnBatch], glob[kColumnBatch];
    load_columns(att, y_att + o, base, D), load_columns(glob, y_glob + o, base, D);
#pragma unroll
    for (int u = 0; u < kColumnBatch; ++u) {
      const int i = base + u * kWarp;
      if (i >= D) break;
      const float x = cap(gate * att[u] + rest * glob[u], limit);
      capped[o + i] = x;
      sum += x;
    }
  }
  const float mu = warp_sum(sum) / float(D);
  float var = 0.f;
  for (int i = lane; i < D; i += kWarp) {
    const float d = capped[o + i] - mu;
    var += d * d;
  }
  const float rs = 1.f / sqrtf(warp_sum(var) / float(D) + float(kLayerNormEps));
  for (int base = lane; base < D; base += kColumnBatch * kWarp) {
    float h_in[kColumnBatch], x[kColumnBatch], g[kColumnBatch], c[kColumnBatch];
    load_columns(h_in, h + o, base, D), load_columns(x, capped + o, base, D);
    load_columns(g, gain, base, D), load_columns(c, bias, base, D);
#pragma unroll
    for (int u = 0; u < kColumnBatch; ++u) {
      const int i = base + u * kWarp;
      if (i >= D) break;
      h_out[o + i] = h_in[u] + ((x[u] - mu) * rs * g[u] + c[u]);
    }
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// One warp per row: dh += dh_out, LN_h backward to dcapped, through cap30 to dz, then the branch gradients.
__global__ void residual_mix_backward_rows_kernel(float* dh, float* dy_att, float* dy_glob, float* dxi,
                                                  const float* dh_out, const float* capped, const float* mean,
                                                  const float* rstd, const float* y_att, const float* y_glob,
                                                  const float* xi, const float* gain, bool branch, bool accumulate,
                                                  int rows, int D) {
  const long row = (long)blockIdx.x * kRowWarps + threadIdx.y;
  if (row >= rows) return;  // warp-uniform
  const int lane = threadIdx.x;
  const long o = row * D;
  const float mu = mean[row], rs = rstd[row];
  float mean_g = 0.f, mean_gx = 0.f;
  if (branch) {
    // dy·gain is rounded the same way here and below (__fmul_rn is never fused into an FMA), so the
    // difference dy·gain − mean(dy·gain) is exact where it should vanish (D = 1, constant rows), as on the CPU.
    for (int i = lane; i < D; i += kWarp) {
      const float g = __fmul_rn(dh_out[o + i], gain[i]);
      mean_g += g;
      mean_gx += g * (capped[o + i] - mu) * rs;
    }
    mean_g = warp_sum(mean_g) / float(D);
    mean_gx = warp_sum(mean_gx) / float(D);
  }
  const float gate = xi[row], rest = 1.f - xi[row];
  const float limit = float(kResidualCap);
  float dgate = 0.f;
  for (int base = lane; base < D; base += kColumnBatch * kWarp) {
    float dy[kColumnBatch], old_h[kColumnBatch], x[kColumnBatch], g[kColumnBatch], old_att[kColumnBatch],
        old_glob[kColumnBatch], att[kColumnBatch], glob[kColumnBatch];
    // Null where the pass does not need the array (no branch gradients, or no such output).
    auto row_of = [&](const float* p, bool wanted) { return wanted && p ? p + o : nullptr; };
    load_columns(dy, dh_out + o, base, D), load_columns(old_h, row_of(dh, true), base, D);
    load_columns(x, row_of(capped, branch), base, D), load_columns(g, branch ? gain : nullptr, base, D);
    load_columns(old_att, row_of(dy_att, branch && accumulate), base, D);
    load_columns(old_glob, row_of(dy_glob, branch && accumulate), base, D);
    load_columns(att, row_of(y_att, branch), base, D), load_columns(glob, row_of(y_glob, branch), base, D);
#pragma unroll
    for (int u = 0; u < kColumnBatch; ++u) {
      const int i = base + u * kWarp;
      if (i >= D) break;
      if (dh) dh[o + i] = old_h[u] + dy[u];
      if (branch) {
        const float xhat = (x[u] - mu) * rs;
        const float dcapped = rs * (__fmul_rn(dy[u], g[u]) - mean_g - xhat * mean_gx);
        const float t = x[u] / limit;
        const float dz = dcapped * (1.f - t * t);
        if (dy_att) dy_att[o + i] = old_att[u] + gate * dz;
        if (dy_glob) dy_glob[o + i] = old_glob[u] + rest * dz;
        dgate += dz * (att[u] - glob[u]);
      }
    }
  }
  if (branch && dxi) {
    dgate = warp_sum(dgate);
    if (lane == 0) dxi[row] = (accumulate ? dxi[row] : 0.f) + dgate;
  }
}

}  // namespace

// ---- launchers -------------------------------------------------------------------------------------------

void curvature_mix_forward(float* y_att, const float* y_loc, const float* y_lin, const float* c, int rows, int width,
                           cudaStream_t stream) {
  launch_curvature_mix_forward(y_att, y_loc, y_lin, c, (long)rows * width, stream);
}

void curvature_mix_forward(__nv_bfloat16* y_att, const float* y_loc, const float* y_lin, const float* c, int rows,
                           int width, cudaStream_t stream) {
  launch_curvature_mix_forward(y_att, y_loc, y_lin, c, (long)rows * width, stream);
}

size_t curvature_mix_backward_workspace_floats(int rows, int width) {
  return size_t(reduce_blocks((long)std::max(rows, 0) * std::max(width, 0)));
}

void curvature_mix_backward(float* dy_loc, float* dy_lin, float* dc, const float* dy_att, const float* y_loc,
                            const float* y_lin, const float* c, int rows, int width, float* workspace,
                            cudaStream_t stream, bool accumulate) {
  const long n = (long)rows * width;
  if (n <= 0 || !(dy_loc || dy_lin || dc)) return;
  const int blocks = reduce_blocks(n);
  float* partial = dc ? workspace : nullptr;
  curvature_mix_backward_kernel<<<blocks, kReduceThreads, 0, stream>>>(dy_loc, dy_lin, partial, dy_att, y_loc, y_lin,
                                                                       c, accumulate, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
  if (dc) {
    curvature_mix_finish_kernel<<<1, kWarp, 0, stream>>>(dc, partial, blocks, c);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
}

void phase7_gate_forward(float* xi, const float* g, const float* s, int rows, cudaStream_t stream) {
  if (rows <= 0) return;
  phase7_gate_forward_kernel<<<ceil_div(rows, 256), 256, 0, stream>>>(xi, g, s, rows);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t phase7_gate_backward_workspace_floats(int rows) { return size_t(reduce_blocks(rows)); }

void phase7_gate_backward(float* dg, float* ds, const float* dxi, const float* xi, const float* g, const float* s,
                          int rows, float* workspace, cudaStream_t stream) {
  if (rows <= 0 || !(dg || ds)) return;
  const int blocks = reduce_blocks(rows);
  float* partial = ds ? workspace : nullptr;
  phase7_gate_backward_kernel<<<blocks, kReduceThreads, 0, stream>>>(dg, partial, dxi, xi, g, s, rows);
  MUSE_CUDA_CHECK(cudaGetLastError());
  if (ds) {
    sum_partials_kernel<<<1, kWarp, 0, stream>>>(ds, partial, blocks);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
}

void residual_mix_forward(float* h_out, const ResidualMixSaved<float>& saved, const float* h, const float* y_att,
                          const float* y_glob, const float* xi, const float* gain, const float* bias, int rows, int D,
                          cudaStream_t stream) {
  if (rows <= 0 || D <= 0) return;
  residual_mix_forward_kernel<<<ceil_div(rows, kRowWarps), dim3(kWarp, kRowWarps), 0, stream>>>(
      h_out, saved.capped, saved.mean, saved.rstd, h, y_att, y_glob, xi, gain, bias, rows, D);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t residual_mix_backward_workspace_floats(int rows, int D) {
  return layernorm_params_workspace_floats(rows, D);
}

void residual_mix_backward(float* dh, float* dy_att, float* dy_glob, float* dxi, float* dgain, float* dbias,
                           const float* dh_out, const ResidualMixSaved<float>& saved, const float* y_att,
                           const float* y_glob, const float* xi, const float* gain, int rows, int D, float* workspace,
                           cudaStream_t stream, bool accumulate) {
  if (rows <= 0 || D <= 0) return;
  const bool branch = dy_att || dy_glob || dxi;
  if (dh || branch) {
    residual_mix_backward_rows_kernel<<<ceil_div(rows, kRowWarps), dim3(kWarp, kRowWarps), 0, stream>>>(
        dh, dy_att, dy_glob, dxi, dh_out, saved.capped, saved.mean, saved.rstd, y_att, y_glob, xi, gain, branch,
        accumulate, rows, D);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
  if (dgain || dbias) {
    // LN_h's parameters see the capped branch output as their input.
    layernorm_backward_params(dgain, dbias, dh_out, saved.capped, saved.mean, saved.rstd, rows, D, workspace,
                              residual_mix_backward_workspace_floats(rows, D), stream);
  }
}

}  // namespace muse::cuda
