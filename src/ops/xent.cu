#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "common/async_copy.cuh"
#include "common/cuda_check.cuh"
#include "ops/xent.cuh"

namespace muse::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 512;  // per row
constexpr int kWarps = kThreads / kWarp;
constexpr int kReduceThreads = 256;
// The row kernel's static shared memory (warp statistics), left out of what its staged row may take.
constexpr size_t kStaticSharedBytes = 1024;

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

// Folds one logit into a thread's online statistics and Σz.
__device__ __forceinline__ void fold(MaxSum& acc, float& sum_z, float zv) {
  if (zv > acc.m) {
    acc.s = acc.s * expf(acc.m - zv) + 1.f;  // expf(−inf) = 0 on the first element
    acc.m = zv;
  } else if (acc.m != -INFINITY) {
    acc.s += expf(zv - acc.m);  // a NaN logit lands here and propagates
  }
  sum_z += zv;
}

// One block per row, 16-byte loads (Vp is a multiple of 4 and rows are 16-byte aligned, checked by the
// launchers), kBatch of them in flight per thread. Each thread folds its columns into (m, s) and Σz, the
// warps combine by butterfly shuffles, then thread 0 combines the warp results in warp order
// (deterministic). With `result`, the row is then overwritten by its gradient: (1/count)·(exp(z_v − lse) −
// ε/V) for v < V, then −(1/count)·(1−ε) at the target (the CPU op's two additions, from zero); zeros
// elsewhere. With `staged` the block first copies the row into shared memory (Vp floats) with every copy in
// flight at once (one block fills an SM then), and both passes read it from there.
__global__ void __launch_bounds__(kThreads) xent_rows_kernel(float* row_loss, float* row_lse, float* logits,
                                                             const int32_t* targets, int V, int Vp, float smoothing,
                                                             const float* result, __nv_bfloat16* dlogits_bf16,
                                                             int32_t ignore_index, bool staged) {
  constexpr int kBatch = 4;
  extern __shared__ float4 staged_row[];
  __shared__ float warp_m[kWarps], warp_s[kWarps], warp_z[kWarps], row_lse_shared;
  const int r = blockIdx.x;
  const int32_t y = targets[r];
  float4* z = reinterpret_cast<float4*>(logits + long(r) * Vp);
  const int real4 = (V + 3) / 4, all4 = Vp / 4;  // float4s holding real columns; all of them
  const bool gradient = result != nullptr;
  const int counted = gradient ? int(result[1]) : 0;
  // The gradient goes over the logits, or (bf16 output) to this row of dlogits_bf16, 4 columns at a time.
  __nv_bfloat162* out_bf16 = dlogits_bf16 ? reinterpret_cast<__nv_bfloat162*>(dlogits_bf16 + long(r) * Vp) : nullptr;
  auto write_gradient = [&](int i, float4 d) {
    if (out_bf16) {
      out_bf16[2 * i] = __floats2bfloat162_rn(d.x, d.y);
      out_bf16[2 * i + 1] = __floats2bfloat162_rn(d.z, d.w);
    } else {
      z[i] = d;
    }
  };
  if (y == ignore_index) {  // block-uniform
    if (threadIdx.x == 0) row_loss[r] = row_lse[r] = 0.f;
    if (gradient)
      for (int i = threadIdx.x; i < all4; i += kThreads) write_gradient(i, make_float4(0.f, 0.f, 0.f, 0.f));
    return;
  }
  const float4* source = z;
  if (staged) {
    for (int i = threadIdx.x; i < real4; i += kThreads) copy_async_16(staged_row + i, z + i);
    wait_async_copies();
    __syncthreads();
    source = staged_row;
  }
  MaxSum acc{-INFINITY, 0.f};
  float sum_z = 0.f;
  for (int base = threadIdx.x; base < real4; base += kBatch * kThreads) {
    float4 q[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = base + k * kThreads;
      if (i < real4) q[k] = source[i];
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = base + k * kThreads;
      if (i >= real4) continue;
      const int v = 4 * i;  // v < V: i < real4
      fold(acc, sum_z, q[k].x);
      if (v + 1 < V) fold(acc, sum_z, q[k].y);
      if (v + 2 < V) fold(acc, sum_z, q[k].z);
      if (v + 3 < V) fold(acc, sum_z, q[k].w);
    }
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
  if (threadIdx.x == 0) {
    MaxSum total{warp_m[0], warp_s[0]};
    float total_z = warp_z[0];
    for (int w = 1; w < kWarps; ++w) {
      total = combine(total, MaxSum{warp_m[w], warp_s[w]});
      total_z += warp_z[w];
    }
    if (y < 0 || y >= V) {  // invalid target: make it visible
      row_loss[r] = row_lse[r] = row_lse_shared = NAN;
    } else {
      // The last few operations in double, as the CPU op does.
      const double lse = double(total.m) + log(double(total.s));
      const float zy = reinterpret_cast<const float*>(z)[y];
      double loss = lse - double(zy);
      if (smoothing != 0.f)
        loss = (1.0 - double(smoothing)) * loss + double(smoothing) * (lse - double(total_z) / V);
      row_loss[r] = float(loss);
      row_lse[r] = row_lse_shared = float(lse);
    }
  }
  if (!gradient) return;  // block-uniform
  __syncthreads();  // row_lse_shared is written
  const float lse = row_lse_shared;
  const float scale = counted > 0 ? 1.f / float(counted) : 0.f;  // this row counts, so counted ≥ 1
  const float uniform = smoothing / float(V);
  const float target_term = scale * (1.f - smoothing);
  auto gradient_of = [&](float zv, int v) {
    if (v >= V) return 0.f;
    float d = scale * (expf(zv - lse) - uniform);
    if (v == y) d -= target_term;
    return d;
  };
  for (int i = threadIdx.x; i < all4; i += kThreads) {
    float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
    if (i < real4) q = source[i];
    const int v = 4 * i;
    write_gradient(i, make_float4(gradient_of(q.x, v), gradient_of(q.y, v + 1), gradient_of(q.z, v + 2),
                                  gradient_of(q.w, v + 3)));
  }
}

// result = {Σ kept row losses / count, count} (without row_loss: {0, count}): one block, each thread sums its
// strided rows in double, then a fixed shared-memory tree.
__global__ void xent_mean_kernel(float* result, const float* row_loss, const int32_t* targets, int rows,
                                 int32_t ignore_index) {
  __shared__ double partial_sum[kReduceThreads];
  __shared__ int partial_count[kReduceThreads];
  double sum = 0;
  int count = 0;
  for (int r = threadIdx.x; r < rows; r += kReduceThreads) {
    if (targets[r] == ignore_index) continue;
    if (row_loss) sum += double(row_loss[r]);
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

}  // namespace

void xent_rows(float* row_loss, float* row_lse, float* logits, const int32_t* targets, int rows, int V, int Vp,
               float smoothing, const float* result, __nv_bfloat16* dlogits_bf16, int32_t ignore_index,
               cudaStream_t stream) {
  if (rows <= 0) return;
  if (Vp % 4 != 0 || reinterpret_cast<uintptr_t>(logits) % 16 != 0)
    throw std::invalid_argument("xent: the padded vocabulary must be a multiple of 4 and the logits 16-byte aligned");
  // With a gradient the row is staged in shared memory when it fits one block's; the kernel may use all of
  // it, which is allowed once (an attribute of the kernel), not on every call.
  const size_t row_bytes = size_t(Vp) * sizeof(float);
  static const size_t shared_limit = [] {
    int device = 0, limit = 0;
    MUSE_CUDA_CHECK(cudaGetDevice(&device));
    MUSE_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const size_t dynamic = size_t(limit) - kStaticSharedBytes;
    MUSE_CUDA_CHECK(
        cudaFuncSetAttribute(xent_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dynamic)));
    return dynamic;
  }();
  const bool staged = result != nullptr && row_bytes <= shared_limit;
  const size_t shared = staged ? row_bytes : 0;
  xent_rows_kernel<<<rows, kThreads, shared, stream>>>(row_loss, row_lse, logits, targets, V, Vp, smoothing, result,
                                                        dlogits_bf16, ignore_index, staged);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void xent_mean(float* result, const float* row_loss, const int32_t* targets, int rows, int32_t ignore_index,
               cudaStream_t stream) {
  xent_mean_kernel<<<1, kReduceThreads, 0, stream>>>(result, row_loss, targets, rows, ignore_index);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void xent_count(float* result, const int32_t* targets, int rows, int32_t ignore_index, cudaStream_t stream) {
  xent_mean(result, nullptr, targets, rows, ignore_index, stream);
}

void xent_forward(float* row_loss, float* row_lse, float* result, const float* logits, const int32_t* targets,
                  int rows, int V, int Vp, float smoothing, int32_t ignore_index, cudaStream_t stream) {
  // Without a count the kernel only reads the logits.
  xent_rows(row_loss, row_lse, const_cast<float*>(logits), targets, rows, V, Vp, smoothing, nullptr, nullptr,
            ignore_index, stream);
  xent_mean(result, row_loss, targets, rows, ignore_index, stream);
}

}  // namespace muse::cuda
