#include <algorithm>
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

// 16 bytes of a row (one load, one store): 4 fp32 or 8 bf16 logits, widened to fp32.
template <class Logit>
struct Pack;
template <>
struct Pack<float> {
  static constexpr int kValues = 4;
  __device__ static void unpack(const uint4& raw, float (&z)[kValues]) {
    z[0] = __uint_as_float(raw.x), z[1] = __uint_as_float(raw.y), z[2] = __uint_as_float(raw.z);
    z[3] = __uint_as_float(raw.w);
  }
  __device__ static uint4 pack(const float (&d)[kValues]) {
    return make_uint4(__float_as_uint(d[0]), __float_as_uint(d[1]), __float_as_uint(d[2]), __float_as_uint(d[3]));
  }
};
template <>
struct Pack<__nv_bfloat16> {
  static constexpr int kValues = 8;
  __device__ static void unpack(const uint4& raw, float (&z)[kValues]) {
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      // A bf16 is the high half of the fp32 with the same bits.
      z[2 * k] = __uint_as_float(words[k] << 16);
      z[2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
    }
  }
  __device__ static uint4 pack(const float (&d)[kValues]) {
    unsigned words[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const __nv_bfloat162 two = __floats2bfloat162_rn(d[2 * k], d[2 * k + 1]);
      words[k] = *reinterpret_cast<const unsigned*>(&two);
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
};

__device__ __forceinline__ float widen(float z) { return z; }
__device__ __forceinline__ float widen(__nv_bfloat16 z) { return __bfloat162float(z); }

// Folds the real columns of one pack (those below V; the pack starts at `column`) into a thread's online
// statistics and Σz: one rescale to the pack's maximum, then one exp per value. A NaN logit passes fmaxf but
// turns the sum NaN, so it propagates.
template <int kValues>
__device__ __forceinline__ void fold_pack(MaxSum& acc, float& sum_z, const float (&z)[kValues], int column, int V) {
  const bool whole = column + kValues <= V;
  float m = acc.m;
#pragma unroll
  for (int k = 0; k < kValues; ++k)
    if (whole || column + k < V) {
      m = fmaxf(m, z[k]);
      sum_z += z[k];
    }
  if (m == -INFINITY) return;  // nothing above −inf yet: nothing to add
  acc.s *= expf(acc.m - m);    // expf(−inf) = 0 on the first finite value
  acc.m = m;
#pragma unroll
  for (int k = 0; k < kValues; ++k)
    if (whole || column + k < V) acc.s += expf(z[k] - m);
}

// A bf16 row (100 KB at the GPT-2 vocabulary) is staged by two blocks per SM, so one block's loads overlap
// the other's arithmetic; an fp32 row fills the SM's shared memory alone.
template <class Logit>
constexpr int kBlocksPerSm = sizeof(Logit) == 2 ? 2 : 1;

// One block per row of fp32 or bf16 logits, 16-byte loads (a padded row is a multiple of 16 bytes and rows
// are 16-byte aligned, checked by the launcher), kBatch of them in flight per thread. Each thread folds its
// columns into (m, s) and Σz, the warps combine by butterfly shuffles, then thread 0 combines the warp results
// in warp order (deterministic). With `result`, the row is then overwritten, in its own type, by its gradient:
// (1/count)·(exp(z_v − lse) − ε/V) for v < V, then −(1/count)·(1−ε) at the target (the CPU op's two
// additions, from zero); zeros elsewhere. With `staged` the block first copies the row into shared memory
// with every copy in flight at once, and both passes read it from there.
template <class Logit>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<Logit>)
    xent_rows_kernel(float* row_loss, float* row_lse, Logit* logits, const int32_t* targets, int V, int Vp,
                     float smoothing, const float* result, int32_t ignore_index, bool staged) {
  using P = Pack<Logit>;
  constexpr int kValues = P::kValues, kBatch = 4;
  extern __shared__ uint4 staged_row[];
  __shared__ float warp_m[kWarps], warp_s[kWarps], warp_z[kWarps], row_lse_shared;
  const int r = blockIdx.x;
  const int32_t y = targets[r];
  const Logit* row = logits + long(r) * Vp;
  uint4* packs = reinterpret_cast<uint4*>(logits + long(r) * Vp);
  const int real = (V + kValues - 1) / kValues, all = Vp / kValues;  // packs holding real columns; all of them
  const bool gradient = result != nullptr;
  const int counted = gradient ? int(result[1]) : 0;
  if (y == ignore_index) {  // block-uniform
    if (threadIdx.x == 0) row_loss[r] = row_lse[r] = 0.f;
    if (gradient)
      for (int i = threadIdx.x; i < all; i += kThreads) packs[i] = make_uint4(0u, 0u, 0u, 0u);
    return;
  }
  const uint4* source = packs;
  if (staged) {
    for (int i = threadIdx.x; i < real; i += kThreads) copy_async_16(staged_row + i, packs + i);
    wait_async_copies();
    __syncthreads();
    source = staged_row;
  }
  MaxSum acc{-INFINITY, 0.f};
  float sum_z = 0.f;
  for (int base = threadIdx.x; base < real; base += kBatch * kThreads) {
    uint4 raw[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = base + k * kThreads;
      if (i < real) raw[k] = source[i];
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = base + k * kThreads;
      if (i >= real) continue;
      float z[kValues];
      P::unpack(raw[k], z);
      fold_pack(acc, sum_z, z, kValues * i, V);
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
      double loss = lse - double(widen(row[y]));
      if (smoothing != 0.f)
        loss = (1.0 - double(smoothing)) * loss + double(smoothing) * (lse - double(total_z) / V);
      row_loss[r] = float(loss);
      row_lse[r] = row_lse_shared = float(lse);
    }
  }
  if (!gradient) return;  // block-uniform
  __syncthreads();  // row_lse_shared is written, and row[y] read before the row is overwritten
  const float lse = row_lse_shared;
  const float scale = counted > 0 ? 1.f / float(counted) : 0.f;  // this row counts, so counted ≥ 1
  const float uniform = smoothing / float(V);
  const float target_term = scale * (1.f - smoothing);
  for (int i = threadIdx.x; i < all; i += kThreads) {
    float z[kValues] = {};
    if (i < real) P::unpack(source[i], z);
    float d[kValues];
#pragma unroll
    for (int k = 0; k < kValues; ++k) {
      const int v = kValues * i + k;
      d[k] = v < V ? scale * (expf(z[k] - lse) - uniform) : 0.f;
      if (v == y) d[k] -= target_term;
    }
    packs[i] = P::pack(d);
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

namespace {

template <class Logit>
void launch_xent_rows(float* row_loss, float* row_lse, Logit* logits, const int32_t* targets, int rows, int V, int Vp,
                      float smoothing, const float* result, int32_t ignore_index, cudaStream_t stream) {
  if (rows <= 0) return;
  const size_t row_bytes = size_t(Vp) * sizeof(Logit);
  if (row_bytes % 16 != 0 || reinterpret_cast<uintptr_t>(logits) % 16 != 0)
    throw std::invalid_argument("xent: a padded row of logits must be a multiple of 16 bytes and the logits 16-byte "
                                "aligned");
  // With a gradient the row is staged in shared memory when it fits a block's share of the SM's; the kernel may
  // use that much, which is allowed once (an attribute of the kernel), not on every call.
  static const size_t shared_limit = [] {
    int device = 0, optin = 0, per_sm = 0;
    MUSE_CUDA_CHECK(cudaGetDevice(&device));
    MUSE_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    MUSE_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    // Each block also takes its static memory and the 1 KB the runtime reserves per block.
    const size_t share = std::min(size_t(optin), size_t(per_sm) / kBlocksPerSm<Logit> - 1024) - kStaticSharedBytes;
    MUSE_CUDA_CHECK(
        cudaFuncSetAttribute(xent_rows_kernel<Logit>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(share)));
    MUSE_CUDA_CHECK(cudaFuncSetAttribute(xent_rows_kernel<Logit>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         int(cudaSharedmemCarveoutMaxShared)));
    return share;
  }();
  const bool staged = result != nullptr && row_bytes <= shared_limit;
  xent_rows_kernel<Logit><<<rows, kThreads, staged ? row_bytes : 0, stream>>>(
      row_loss, row_lse, logits, targets, V, Vp, smoothing, result, ignore_index, staged);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void xent_rows(float* row_loss, float* row_lse, float* logits, const int32_t* targets, int rows, int V, int Vp,
               float smoothing, const float* result, int32_t ignore_index, cudaStream_t stream) {
  launch_xent_rows(row_loss, row_lse, logits, targets, rows, V, Vp, smoothing, result, ignore_index, stream);
}

void xent_rows(float* row_loss, float* row_lse, __nv_bfloat16* logits, const int32_t* targets, int rows, int V,
               int Vp, float smoothing, const float* result, int32_t ignore_index, cudaStream_t stream) {
  launch_xent_rows(row_loss, row_lse, logits, targets, rows, V, Vp, smoothing, result, ignore_index, stream);
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
  xent_rows(row_loss, row_lse, const_cast<float*>(logits), targets, rows, V, Vp, smoothing, nullptr, ignore_index,
            stream);
  xent_mean(result, row_loss, targets, rows, ignore_index, stream);
}

}  // namespace muse::cuda
