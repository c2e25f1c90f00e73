// Elementwise kernels over a row-major [rows, cols] matrix without a division per element: threads run along
// a row (`per_row` work items: columns, or vectors of them), blockIdx.y picks the row, strided by gridDim.y
// (at most 65,535), so a thread finds its column once and its row from the loop. A 64-bit index split into
// row and column (i / D, r % N) cost these kernels more than their memory traffic.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>

namespace muse::cuda {

constexpr int kRowGridThreads = 256;

// rows ≥ 1.
inline dim3 row_grid(int rows, int per_row, int threads = kRowGridThreads) {
  return dim3(unsigned((per_row + threads - 1) / threads), unsigned(std::min(rows, 65535)));
}

// kWidth consecutive floats (a float4 when kWidth = 4: 16-byte aligned) loaded, stored, and accumulated.
template <int kWidth>
__device__ __forceinline__ void load_floats(float (&v)[kWidth], const float* p) {
  if constexpr (kWidth == 4) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
  } else {
#pragma unroll
    for (int k = 0; k < kWidth; ++k) v[k] = p[k];
  }
}
template <int kWidth>
__device__ __forceinline__ void store_floats(float* p, const float (&v)[kWidth]) {
  if constexpr (kWidth == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int k = 0; k < kWidth; ++k) p[k] = v[k];
  }
}

}  // namespace muse::cuda
