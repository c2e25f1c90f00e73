// Row kernels with one warp per row (ops/layernorm.cu, ops/hybrid.cu) walk a row's columns lane, lane + 32, …
// kColumnBatch at a time per lane, every load of a batch issued before its first store: a loop that stores
// between its loads waits out one load latency per column (the compiler cannot tell that the stores do not
// alias the next loads).
#pragma once

namespace muse::cuda {

constexpr int kColumnBatch = 4;

// dst[u] = src[base + 32·u] for the columns below D; 0 past the row's end, and everywhere when src is null.
__device__ __forceinline__ void load_columns(float (&dst)[kColumnBatch], const float* src, int base, int D) {
#pragma unroll
  for (int u = 0; u < kColumnBatch; ++u) {
    const int i = base + 32 * u;
    dst[u] = src && i < D ? src[i] : 0.f;
  }
}

}  // namespace muse::cuda
