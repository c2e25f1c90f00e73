#include <cub/device/device_radix_sort.cuh>

#include <stdexcept>
#include <string>

#include "common/cuda_check.cuh"
#include "ops/htt.cuh"

namespace muse::cuda {

namespace {

constexpr int kWarp = 32;
constexpr float kFloor = float(kHttNormFloor);

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// c_s = cos(θ_s)/√r into shared memory (the caller synchronises).
__device__ __forceinline__ void load_phase_gains(float* c, const float* theta, int r) {
  for (int s = threadIdx.x + threadIdx.y * blockDim.x; s < r; s += blockDim.x * blockDim.y)
    c[s] = cosf(theta[s]) / sqrtf(float(r));
}

// ---------------------------------------------------------------------------------------------------------
// Core normalisation: one warp per row. Rows [0, a_rows) are A's (width d1), the rest B's (width d2).
constexpr int kNormWarps = 8;

__global__ void normalize_rows_kernel(float* A_hat, float* A_norm, float* B_hat, float* B_norm, const float* A,
                                      const float* B, int a_rows, int b_rows, int d1, int d2) {
  int row = blockIdx.x * kNormWarps + threadIdx.y;
  if (row >= a_rows + b_rows) return;
  const bool is_a = row < a_rows;
  if (!is_a) row -= a_rows;
  const int width = is_a ? d1 : d2;
  const float* x = (is_a ? A : B) + long(row) * width;
  float* hat = (is_a ? A_hat : B_hat) + long(row) * width;
  float sq = 0.f;
  for (int k = threadIdx.x; k < width; k += kWarp) sq += x[k] * x[k];
  const float n = fmaxf(sqrtf(warp_sum(sq)), kFloor);
  for (int k = threadIdx.x; k < width; k += kWarp) hat[k] = x[k] / n;
  if (threadIdx.x == 0) (is_a ? A_norm : B_norm)[row] = n;
}

// ---------------------------------------------------------------------------------------------------------
// Materialisation: one block per row v of E. E[v, p·d2+q] = Σ_s (c_s·Â[i,s,p])·B̂[u,s,q] for v < V, 0 above.
constexpr int kRowThreads = 256;

__global__ void materialize_kernel(float* E, const float* A_hat, const float* B_hat, const float* theta, int V,
                                   int D, int r, int v2, int d1, int d2) {
  extern __shared__ float c[];  // [r]
  const int v = blockIdx.x;
  float* row = E + long(v) * D;
  if (v >= V) {  // block-uniform
    for (int k = threadIdx.x; k < D; k += blockDim.x) row[k] = 0.f;
    return;
  }
  load_phase_gains(c, theta, r);
  __syncthreads();
  const int i = v / v2, u = v % v2;
  const float* a = A_hat + long(i) * r * d1;
  const float* b = B_hat + long(u) * r * d2;
  for (int k = threadIdx.x; k < D; k += blockDim.x) {
    const int p = k / d2, q = k % d2;
    float acc = 0.f;
    for (int s = 0; s < r; ++s) acc += (c[s] * a[s * d1 + p]) * b[s * d2 + q];
    row[k] = acc;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward into A (and the per-digit dc_s for θ): one block per leading digit i, 256 threads.
//   W[s,p] = Σ_{u: i·v2+u < V} Σ_{q < len(p)} dE[i·v2+u, p·d2+q]·B̂[u,s,q]       (u in order)
//   dc[i,s] = Σ_p Â[i,s,p]·W[s,p];   dÂ = c_s·W;   dA row += (dÂ − Â⟨Â, dÂ⟩)/‖A‖  (⟨⟩ dropped when floored)
// Shared: kHttStage tokens' dE rows, each as d1 segments of d2 at an odd stride ld (lanes p = 0, 1, … of a warp
// read segment p: with an even stride such as d2 = 32, phase8-medium's, all 32 reads hit one bank), and their
// B̂_u [r·d2]; W [r·d1], c [r]. Thread t owns W entries t, t+256, … (no races) and adds the staged tokens' dots
// in token order. Staging kHttStage tokens per pair of barriers: one token per pair left the block waiting on
// memory and barriers (the loop runs over ~v2 = 224 tokens).
constexpr int kHttStage = 8;
__host__ __device__ inline int segment_stride(int d2) { return d2 | 1; }

__global__ void backward_a_kernel(float* dA, float* dc_by_digit, const float* dE, const float* A_hat,
                                  const float* A_norm, const float* B_hat, const float* theta, int V, int D, int r,
                                  int v2, int d1, int d2) {
  extern __shared__ float smem[];
  const int ld = segment_stride(d2);
  float* sE = smem;                      // [kHttStage][d1·ld]
  float* sB = sE + kHttStage * d1 * ld;  // [kHttStage][r·d2]
  float* W = sB + kHttStage * r * d2;    // [r·d1]
  float* c = W + r * d1;                 // [r]
  const int i = blockIdx.x;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  for (int t = tid; t < r * d1; t += nthreads) W[t] = 0.f;
  for (int s = tid; s < r; s += nthreads) c[s] = cosf(theta[s]) / sqrtf(float(r));
  const int tokens = int(min(long(v2), V - long(i) * v2));  // u with i·v2 + u < V
  for (int u0 = 0; u0 < tokens; u0 += kHttStage) {
    const int staged = min(kHttStage, tokens - u0);
    __syncthreads();  // the previous stage's sE/sB are no longer read
    for (int j = 0; j < staged; ++j) {
      const float* g = dE + (long(i) * v2 + u0 + j) * D;
      for (int k = tid; k < D; k += nthreads) sE[j * d1 * ld + k / d2 * ld + k % d2] = g[k];
      const float* b = B_hat + long(u0 + j) * r * d2;
      for (int k = tid; k < r * d2; k += nthreads) sB[j * r * d2 + k] = b[k];
    }
    __syncthreads();
    for (int t = tid; t < r * d1; t += nthreads) {
      const int s = t / d1, p = t % d1;
      const int len = min(max(D - p * d2, 0), d2);
      float w = W[t];
      for (int j = 0; j < staged; ++j) {
        const float* gp = sE + j * d1 * ld + p * ld;
        const float* bs = sB + j * r * d2 + s * d2;
        float dot = 0.f;
        for (int q = 0; q < len; ++q) dot += gp[q] * bs[q];
        w += dot;
      }
      W[t] = w;
    }
  }
  __syncthreads();  // W complete (and c loaded, also when the token loop is empty)
  const int warp = tid / kWarp, lane = tid % kWarp, warps = nthreads / kWarp;
  for (int s = warp; s < r; s += warps) {
    const long row = long(i) * r + s;
    const float* a = A_hat + row * d1;
    const float* w = W + s * d1;
    float dc = 0.f, dot = 0.f;
    for (int p = lane; p < d1; p += kWarp) {
      dc += a[p] * w[p];
      dot += a[p] * (c[s] * w[p]);
    }
    dc = warp_sum(dc);
    dot = warp_sum(dot);
    if (dc_by_digit && lane == 0) dc_by_digit[row] = dc;
    if (dA) {
      const float n = A_norm[row];
      if (!(n > kFloor)) dot = 0.f;
      for (int p = lane; p < d1; p += kWarp) dA[row * d1 + p] += (c[s] * w[p] - a[p] * dot) / n;
    }
  }
}

// dθ_s += −(Σ_{i < digits} dc[i,s])·sin(θ_s)/√r, the digits summed in order. One thread per rank.
__global__ void backward_theta_kernel(float* dtheta, const float* dc_by_digit, const float* theta, int r,
                                      int digits) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= r) return;
  float dc = 0.f;
  for (int i = 0; i < digits; ++i) dc += dc_by_digit[long(i) * r + s];
  dtheta[s] += -dc * sinf(theta[s]) / sqrtf(float(r));
}

// Backward into B: one block per trailing digit u, 256 threads.
//   dB̂[u,s,q] = Σ_{i: i·v2+u < V} Σ_{p: p·d2+q < D} (c_s·Â[i,s,p])·dE[i·v2+u, p·d2+q]   (i, then p, in order)
//   dB row += (dB̂ − B̂⟨B̂, dB̂⟩)/‖B‖
// Shared: kHttStage digits' dE rows [D] and Â_i [r·d1], the accumulator [r·d2], c [r]. Thread t owns
// accumulator entries t, t+256, … and adds the staged digits in order.
__global__ void backward_b_kernel(float* dB, const float* dE, const float* A_hat, const float* B_hat,
                                  const float* B_norm, const float* theta, int V, int D, int r, int v2, int d1,
                                  int d2, int digits) {
  extern __shared__ float smem[];
  float* sE = smem;                      // [kHttStage][D]
  float* sA = sE + kHttStage * D;        // [kHttStage][r·d1]
  float* acc = sA + kHttStage * r * d1;  // [r·d2]
  float* c = acc + r * d2;               // [r]
  const int u = blockIdx.x;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  for (int t = tid; t < r * d2; t += nthreads) acc[t] = 0.f;
  for (int s = tid; s < r; s += nthreads) c[s] = cosf(theta[s]) / sqrtf(float(r));
  const int count = u < V ? min(digits, (V - u + v2 - 1) / v2) : 0;  // the digits i with i·v2 + u < V
  for (int i0 = 0; i0 < count; i0 += kHttStage) {
    const int staged = min(kHttStage, count - i0);
    __syncthreads();  // the previous stage's sE/sA are no longer read; c is loaded
    for (int j = 0; j < staged; ++j) {
      const float* g = dE + (long(i0 + j) * v2 + u) * D;
      for (int k = tid; k < D; k += nthreads) sE[j * D + k] = g[k];
      const float* a = A_hat + long(i0 + j) * r * d1;
      for (int k = tid; k < r * d1; k += nthreads) sA[j * r * d1 + k] = a[k];
    }
    __syncthreads();
    for (int t = tid; t < r * d2; t += nthreads) {
      const int s = t / d2, q = t % d2;
      float sum = acc[t];
      for (int j = 0; j < staged; ++j) {
        const float* as = sA + j * r * d1 + s * d1;
        const float* e = sE + j * D;
        for (int p = 0; p < d1 && p * d2 + q < D; ++p) sum += (c[s] * as[p]) * e[p * d2 + q];
      }
      acc[t] = sum;
    }
  }
  __syncthreads();
  const int warp = tid / kWarp, lane = tid % kWarp, warps = nthreads / kWarp;
  for (int s = warp; s < r; s += warps) {
    const long row = long(u) * r + s;
    const float* h = B_hat + row * d2;
    const float* gs = acc + s * d2;
    float dot = 0.f;
    for (int q = lane; q < d2; q += kWarp) dot += h[q] * gs[q];
    dot = warp_sum(dot);
    const float n = B_norm[row];
    if (!(n > kFloor)) dot = 0.f;
    for (int q = lane; q < d2; q += kWarp) dB[row * d2 + q] += (gs[q] - h[q] * dot) / n;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Lookup.
// E is fp32 (training) or bf16 (the serving table, widened exactly).
template <typename Table>
__global__ void lookup_forward_kernel(float* x, const Table* E, const int32_t* ids, int n, int D) {
  const long total = long(n) * D;
  for (long idx = blockIdx.x * long(blockDim.x) + threadIdx.x; idx < total; idx += long(gridDim.x) * blockDim.x) {
    const long t = idx / D;
    const int j = int(idx - t * D);
    x[idx] = float(E[long(ids[t]) * D + j]);
  }
}

// The backward groups the tokens by id first: a stable radix sort (CUB) of (id, position) pairs leaves each
// id's positions in token order. Then warp (run start s, 32-column slice) walks its run and adds the rows
// in that order into the id's row of dE, so every element gets the CPU op's additions in the CPU op's order,
// and different warps never touch the same element. Warps whose s is not the first of its run exit at once.
// (A scan of the whole token list per id partition, the earlier design, took 2.4 ms at 65,536 tokens on
// the H200; this takes 0.2.)
constexpr int kRunWarps = 8;

__global__ void iota_kernel(int32_t* out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = i;
}

__global__ void lookup_backward_runs_kernel(float* dE, const float* dx, const int32_t* sorted_ids,
                                            const int32_t* positions, int n, int D) {
  const int s = blockIdx.x * kRunWarps + threadIdx.y;
  const int col = blockIdx.y * kWarp + threadIdx.x;
  if (s >= n) return;
  const int32_t id = sorted_ids[s];
  if ((s > 0 && sorted_ids[s - 1] == id) || col >= D) return;
  float* row = dE + long(id) * D + col;
  float acc = *row;
  for (int i = s; i < n && sorted_ids[i] == id; ++i) acc += dx[long(positions[i]) * D + col];
  *row = acc;
}

// The sort's key bits: enough for ids below vocab.
int id_bits(int vocab) {
  int bits = 1;
  while (bits < 31 && (1 << bits) < vocab) ++bits;
  return bits;
}

// Scratch of the backward: the sorted ids, the positions in and out of the sort, then CUB's temporary storage.
struct LookupScratch {
  int32_t *sorted_ids, *positions_in, *positions;
  void* sort_storage;
  size_t sort_bytes;
};

size_t round_up_256(size_t bytes) { return (bytes + 255) / 256 * 256; }

size_t sort_storage_bytes(int n, int vocab) {
  size_t bytes = 0;
  MUSE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                                  static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                  static_cast<int32_t*>(nullptr), n, 0, id_bits(vocab)));
  return bytes;
}

LookupScratch lookup_scratch(void* scratch, int n, int vocab) {
  char* base = static_cast<char*>(scratch);
  const size_t ints = round_up_256(size_t(n) * sizeof(int32_t));
  return {reinterpret_cast<int32_t*>(base), reinterpret_cast<int32_t*>(base + ints),
          reinterpret_cast<int32_t*>(base + 2 * ints), base + 3 * ints, sort_storage_bytes(n, vocab)};
}

int grid_for(long total, int block) {
  const long blocks = (total + block - 1) / block;
  return int(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

// Dynamic shared memory above the default 48 KiB needs an opt-in per kernel (sm_90: up to 227 KiB).
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes, const char* what) {
  constexpr size_t kDefault = 48 * 1024, kMax = 227 * 1024;
  if (bytes > kMax)
    throw std::invalid_argument(std::string(what) + ": HTT shape needs " + std::to_string(bytes) +
                                " bytes of shared memory (max " + std::to_string(kMax) + ")");
  if (bytes > kDefault)
    MUSE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace

void htt_normalize_cores(float* A_hat, float* A_norm, float* B_hat, float* B_norm, const float* A, const float* B,
                         const HttShape& s, cudaStream_t stream) {
  const int a_rows = s.v1 * s.r, b_rows = s.v2 * s.r;
  if (a_rows + b_rows <= 0) return;
  const dim3 block(kWarp, kNormWarps);
  const dim3 grid((a_rows + b_rows + kNormWarps - 1) / kNormWarps);
  normalize_rows_kernel<<<grid, block, 0, stream>>>(A_hat, A_norm, B_hat, B_norm, A, B, a_rows, b_rows, s.d1, s.d2);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void htt_materialize_forward(float* E, float* A_hat, float* A_norm, float* B_hat, float* B_norm, const float* A,
                             const float* B, const float* theta, const HttShape& s, cudaStream_t stream) {
  htt_normalize_cores(A_hat, A_norm, B_hat, B_norm, A, B, s, stream);
  if (s.Vp <= 0 || s.D <= 0) return;
  const size_t shared = size_t(s.r) * sizeof(float);
  allow_shared(materialize_kernel, shared, "htt_materialize_forward");
  materialize_kernel<<<s.Vp, kRowThreads, shared, stream>>>(E, A_hat, B_hat, theta, s.V, s.D, s.r, s.v2, s.d1,
                                                             s.d2);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t htt_backward_scratch_floats(const HttShape& s) { return size_t(s.v1) * s.r; }

void htt_materialize_backward(float* dA, float* dB, float* dtheta, const float* dE, const float* A_hat,
                              const float* A_norm, const float* B_hat, const float* B_norm, const float* theta,
                              const HttShape& s, float* scratch, cudaStream_t stream) {
  if (s.V <= 0 || s.D <= 0 || s.r <= 0) return;
  const int digits = (s.V + s.v2 - 1) / s.v2;  // leading digits that carry a real token
  if (dA || dtheta) {
    if (dtheta && !scratch) throw std::invalid_argument("htt_materialize_backward: dtheta needs scratch");
    const size_t shared = (kHttStage * (size_t(s.d1) * segment_stride(s.d2) + size_t(s.r) * s.d2) +
                           size_t(s.r) * s.d1 + s.r) * sizeof(float);
    allow_shared(backward_a_kernel, shared, "htt_materialize_backward");
    // Digits ≥ `digits` carry no token: their W is 0, so their dA (and dc) contribution is 0; skip them.
    backward_a_kernel<<<digits, kRowThreads, shared, stream>>>(dA, dtheta ? scratch : nullptr, dE, A_hat, A_norm,
                                                                B_hat, theta, s.V, s.D, s.r, s.v2, s.d1, s.d2);
    MUSE_CUDA_CHECK(cudaGetLastError());
    if (dtheta) {
      backward_theta_kernel<<<(s.r + 127) / 128, 128, 0, stream>>>(dtheta, scratch, theta, s.r, digits);
      MUSE_CUDA_CHECK(cudaGetLastError());
    }
  }
  if (dB) {
    const size_t shared =
        (kHttStage * (size_t(s.D) + size_t(s.r) * s.d1) + size_t(s.r) * s.d2 + s.r) * sizeof(float);
    allow_shared(backward_b_kernel, shared, "htt_materialize_backward");
    backward_b_kernel<<<s.v2, kRowThreads, shared, stream>>>(dB, dE, A_hat, B_hat, B_norm, theta, s.V, s.D, s.r,
                                                              s.v2, s.d1, s.d2, digits);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
}

void embedding_lookup_forward(float* x, const float* E, const int32_t* ids, int n, int D, cudaStream_t stream) {
  if (n <= 0 || D <= 0) return;
  lookup_forward_kernel<float><<<grid_for(long(n) * D, 256), 256, 0, stream>>>(x, E, ids, n, D);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void embedding_lookup_forward(float* x, const __nv_bfloat16* E, const int32_t* ids, int n, int D,
                              cudaStream_t stream) {
  if (n <= 0 || D <= 0) return;
  lookup_forward_kernel<__nv_bfloat16><<<grid_for(long(n) * D, 256), 256, 0, stream>>>(x, E, ids, n, D);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t embedding_lookup_backward_scratch_bytes(int n, int vocab) {
  if (n <= 0) return 0;
  return 3 * round_up_256(size_t(n) * sizeof(int32_t)) + sort_storage_bytes(n, vocab);
}

void embedding_lookup_backward(float* dE, const float* dx, const int32_t* ids, int n, int D, int vocab,
                               void* scratch, cudaStream_t stream) {
  if (n <= 0 || D <= 0) return;
  LookupScratch w = lookup_scratch(scratch, n, vocab);  // SortPairs takes the storage size by reference
  iota_kernel<<<grid_for(n, 256), 256, 0, stream>>>(w.positions_in, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
  MUSE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(w.sort_storage, w.sort_bytes, ids, w.sorted_ids, w.positions_in,
                                                  w.positions, n, 0, id_bits(vocab), stream));
  const dim3 block(kWarp, kRunWarps);
  const dim3 grid((n + kRunWarps - 1) / kRunWarps, (D + kWarp - 1) / kWarp);
  lookup_backward_runs_kernel<<<grid, block, 0, stream>>>(dE, dx, w.sorted_ids, w.positions, n, D);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace muse::cuda
