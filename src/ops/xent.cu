#include <cmath>

#include "common/cuda_check.cuh"
#include "ops/xent.cuh"

namespace muse::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 512;  // per row
constexpr int kWarps = kThreads / kWarp;
constexpr int kReduceThreads = 256;

// Online softmax statistics: running maximum m and Σ exp(z − m).
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};  // nothing seen on either side
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = combine(v, other);
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One block per row. Each thread folds its strided columns into (m, s) and Σz, the warps combine by
// butterfly shuffles, then thread 0 combines the warp results in warp order (deterministic).
__global__ void xent_forward_kernel(float* row_loss, float* row_lse, const float* logits, const int32_t* targets,
                                    int V, int Vp, float smoothing, int32_t ignore_index) {
  __shared__ float warp_m[kWarps], warp_s[kWarps], warp_z[kWarps];
  const int r = blockIdx.x;
  const int32_t y = targets[r];
  if (y == ignore_index) {  // block-uniform
    if (threadIdx.x == 0) row_loss[r] = row_lse[r] = 0.f;
    return;
  }
  const float* z = logits + long(r) * Vp;
  MaxSum acc{-INFINITY, 0.f};
  float sum_z = 0.f;
  for (int v = threadIdx.x; v < V; v += kThreads) {
    const float zv = z[v];
    if (zv > acc.m) {
      acc.s = acc.s * expf(acc.m - zv) + 1.f;  // expf(−inf) = 0 on the first element
      acc.m = zv;
    } else if (acc.m != -INFINITY) {
      acc.s += expf(zv - acc.m);  // a NaN logit lands here and propagates
    }
    sum_z += zv;
  }
  acc = warp_combine(acc);
  sum_z = warp_sum(sum_z);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    warp_m[warp] = acc.m;
    warp_s[warp] = acc.s;
    warp_z[warp] = sum_z;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  MaxSum total{warp_m[0], warp_s[0]};
  float total_z = warp_z[0];
  for (int w = 1; w < kWarps; ++w) {
    total = combine(total, MaxSum{warp_m[w], warp_s[w]});
    total_z += warp_z[w];
  }
  if (y < 0 || y >= V) {  // invalid target: make it visible
    row_loss[r] = row_lse[r] = NAN;
    return;
  }
  // The last few operations in double, as the CPU op does.
  const double lse = double(total.m) + log(double(total.s));
  double loss = lse - double(z[y]);
  if (smoothing != 0.f)
    loss = (1.0 - double(smoothing)) * loss + double(smoothing) * (lse - double(total_z) / V);
  row_loss[r] = float(loss);
  row_lse[r] = float(lse);
}

// result = {Σ kept row losses / count, count}: one block, each thread sums its strided rows in double, then a
// fixed shared-memory tree.
__global__ void xent_mean_kernel(float* result, const float* row_loss, const int32_t* targets, int rows,
                                 int32_t ignore_index) {
  __shared__ double partial_sum[kReduceThreads];
  __shared__ int partial_count[kReduceThreads];
  double sum = 0;
  int count = 0;
  for (int r = threadIdx.x; r < rows; r += kReduceThreads) {
    if (targets[r] == ignore_index) continue;
    sum += double(row_loss[r]);
    ++count;
  }
  partial_sum[threadIdx.x] = sum;
  partial_count[threadIdx.x] = count;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      partial_sum[threadIdx.x] += partial_sum[threadIdx.x + stride];
      partial_count[threadIdx.x] += partial_count[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int n = partial_count[0];
    result[0] = n > 0 ? float(partial_sum[0] / n) : 0.f;
    result[1] = float(n);
  }
}

// One block per row: z[v] ← scale·(exp(z_v − lse) − ε/V) for v < V, then −scale·(1−ε) at the target (the
// CPU op's two additions, from zero), written over the logits (each element read, then written, by the same
// thread); zeros elsewhere.
__global__ void xent_backward_in_place_kernel(float* z, float dloss, const float* row_lse, const int32_t* targets,
                                              int V, int Vp, float smoothing, const float* result,
                                              int32_t ignore_index) {
  const int count = int(result[1]);
  const int r = blockIdx.x;
  const int32_t y = targets[r];
  float* row = z + long(r) * Vp;
  if (count <= 0 || y == ignore_index) {
    for (int v = threadIdx.x; v < Vp; v += blockDim.x) row[v] = 0.f;
    return;
  }
  const float scale = dloss / float(count);
  const float uniform = smoothing / float(V);
  const float target_term = scale * (1.f - smoothing);
  const float lse = row_lse[r];
  for (int v = threadIdx.x; v < Vp; v += blockDim.x) {
    float d = 0.f;
    if (v < V) {
      d = scale * (expf(row[v] - lse) - uniform);
      if (v == y) d -= target_term;
    }
    row[v] = d;
  }
}

}  // namespace

void xent_forward(float* row_loss, float* row_lse, float* result, const float* logits, const int32_t* targets,
                  int rows, int V, int Vp, float smoothing, int32_t ignore_index, cudaStream_t stream) {
  if (rows > 0) {
    xent_forward_kernel<<<rows, kThreads, 0, stream>>>(row_loss, row_lse, logits, targets, V, Vp, smoothing,
                                                        ignore_index);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
  xent_mean_kernel<<<1, kReduceThreads, 0, stream>>>(result, row_loss, targets, rows, ignore_index);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void xent_backward_in_place(float* logits_in_dlogits_out, float dloss, const float* row_lse, const int32_t* targets,
                            int rows, int V, int Vp, float smoothing, const float* result, int32_t ignore_index,
                            cudaStream_t stream) {
  if (rows <= 0) return;
  xent_backward_in_place_kernel<<<rows, kThreads, 0, stream>>>(logits_in_dlogits_out, dloss, row_lse, targets, V, Vp,
                                                                smoothing, result, ignore_index);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace muse::cuda
