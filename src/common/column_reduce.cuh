// Column reductions for parameter gradients (biases, LayerNorm gains, conv taps): out_k[c] += Σ_r term_k(r, c)
// for k < K over the rows of a row-major [rows, cols] problem, where rows is B·N (up to ~10⁵) and cols the
// width (a few hundred to a few thousand).
//
// One thread per column walking every row leaves the GPU nearly idle (cols/32 warps for ~10⁵ sequential
// loads each: 120 ms of a 680 ms training step at B = 64, N = 1024 before this existed), so the rows are cut
// into chunks: stage 1 gives each (32-column tile, chunk) a block of 32 × 8 threads whose 8 row lanes sum
// rows lane, lane + 8, … of the chunk and then add their lanes in order into one partial per (chunk, k,
// column); stage 2 gives each (k, column) a warp whose lanes sum chunks lane, lane + 32, … in order, then add
// their lanes by a fixed shuffle tree (one thread walking all chunks left the GPU idle: ~20 µs a call, a
// millisecond a training step). The assignment depends only on the shape and no atomics are used, so results
// are bit-identical run to run.
//
// Terms is a device functor that adds row r's terms for column c into acc:
//   __device__ void operator()(long r, int c, float (&acc)[K]) const;
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <stdexcept>

#include "common/cuda_check.cuh"

namespace muse::cuda {

namespace column_reduce_detail {

constexpr int kTile = 32;              // columns per block (one warp wide: coalesced row reads)
constexpr int kLanes = 8;              // row lanes per block
constexpr long kDefaultChunkRows = 256;

template <int K>
struct Outputs {
  float* out[K];
};

template <int K, class Terms>
__global__ void __launch_bounds__(kTile* kLanes)
    partial_kernel(float* partial, Terms terms, long rows, int cols, long chunk_rows) {
  __shared__ float lanes[K][kLanes][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * kTile + tx;
  const long r0 = (long)blockIdx.y * chunk_rows;
  const long r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
  float acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0.f;
  if (c < cols)
    for (long r = r0 + ty; r < r1; r += kLanes) terms(r, c, acc);
#pragma unroll
  for (int k = 0; k < K; ++k) lanes[k][ty][tx] = acc[k];
  __syncthreads();
  if (c >= cols) return;
  for (int k = ty; k < K; k += kLanes) {
    float s = 0.f;
    for (int y = 0; y < kLanes; ++y) s += lanes[k][y][tx];
    partial[((long)blockIdx.y * K + k) * cols + c] = s;
  }
}

constexpr int kFinishWarps = 8;  // per block of stage 2

template <int K>
__global__ void finish_kernel(Outputs<K> outputs, const float* partial, int chunks, int cols) {
  const long i = (long)blockIdx.x * kFinishWarps + threadIdx.x / 32;  // (k, column), warp-uniform
  if (i >= (long)K * cols) return;
  const int k = int(i / cols), c = int(i % cols), lane = threadIdx.x % 32;
  float* out = outputs.out[k];
  if (!out) return;
  float s = 0.f;
  for (int chunk = lane; chunk < chunks; chunk += 32) s += partial[((long)chunk * K + k) * cols + c];
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
  if (lane == 0) out[c] += s;
}

inline long chunk_count(long rows, long chunk_rows) { return std::max(1L, (rows + chunk_rows - 1) / chunk_rows); }

}  // namespace column_reduce_detail

// Floats of workspace column_reduce needs at its default chunk length.
template <int K>
size_t column_reduce_workspace_floats(long rows, int cols) {
  if (rows <= 0 || cols <= 0) return 0;
  return size_t(column_reduce_detail::chunk_count(rows, column_reduce_detail::kDefaultChunkRows)) * K * size_t(cols);
}

// outputs[k][c] += Σ_r term_k(r, c) (null outputs are skipped). The workspace holds the partials: with fewer
// than column_reduce_workspace_floats<K>(rows, cols) floats the chunks grow to fit (it needs at least K·cols).
template <int K, class Terms>
void column_reduce(const std::array<float*, K>& outputs, const Terms& terms, long rows, int cols, float* workspace,
                   size_t workspace_floats, cudaStream_t stream) {
  namespace detail = column_reduce_detail;
  if (rows <= 0 || cols <= 0) return;
  const size_t per_chunk = size_t(K) * size_t(cols);
  if (workspace_floats < per_chunk) throw std::invalid_argument("column_reduce: workspace smaller than K·cols floats");
  const long max_chunks = std::max(1L, long(workspace_floats / per_chunk));
  long chunk_rows = detail::kDefaultChunkRows;
  if (detail::chunk_count(rows, chunk_rows) > max_chunks) chunk_rows = (rows + max_chunks - 1) / max_chunks;
  const long chunks = detail::chunk_count(rows, chunk_rows);
  detail::partial_kernel<K, Terms>
      <<<dim3(unsigned((cols + detail::kTile - 1) / detail::kTile), unsigned(chunks)), dim3(detail::kTile, detail::kLanes),
         0, stream>>>(workspace, terms, rows, cols, chunk_rows);
  MUSE_CUDA_CHECK(cudaGetLastError());
  detail::Outputs<K> out{};
  for (int k = 0; k < K; ++k) out.out[k] = outputs[k];
  const long total = long(K) * cols;
  detail::finish_kernel<K><<<unsigned((total + detail::kFinishWarps - 1) / detail::kFinishWarps),
                              32 * detail::kFinishWarps, 0, stream>>>(out, workspace, int(chunks), cols);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace muse::cuda
