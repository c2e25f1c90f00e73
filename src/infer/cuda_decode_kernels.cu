#include "infer/cuda_decode_kernels.cuh"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/async_copy.cuh"
#include "common/cuda_check.cuh"
#include "common/math.h"
#include "infer/decode_timeline.h"
#include "ops/bk.h"
#include "ops/ffn.h"
#include "ops/hybrid.h"
#include "ops/layernorm.h"
#include "ops/linear_attn.h"
#include "ops/poincare.cuh"
#include "ops/poincare.h"
#include "ops/ssm.h"

namespace muse::cuda::decode {

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * kWarp;
constexpr int kMixerThreads = 256;
// Shared memory up to which the mixer stages a head's ring (so that a few mixer blocks still fit on an SM).
constexpr size_t kRingStagingBytes = 96 * 1024;
// Shared memory up to which residual_mix stages its chunk's h_in and y_glob rows before the wait.
constexpr size_t kPrologueStagingBytes = 64 * 1024;
// Bytes of the AR-SSM gate's W₂ up to which the mixer stages it.
constexpr size_t kSsmGateStagingBytes = 32 * 1024;
constexpr int kMixerWarps = kMixerThreads / kWarp;
constexpr float kPotentialCap = 5.0f;                 // v = cap_5(w_v·u + b_v), as ops/bk.cpp
constexpr float kMaskSlope = 4.0f;                    // as ops/ssm.cpp
constexpr float kCurvatureMin = 0.01f, kCurvatureMax = 10.0f;  // model/muse_block.h
static_assert(kGemvWarps >= kRowsPerChunk, "the prologues give each row of a chunk its own warp");
static_assert(kSsmRankHidden == kWarp, "the rank mask's MLP_r runs one hidden unit per lane");

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFull, v, offset);
  return v;
}

// Programmatic dependent launch (sm_90). Every kernel waits for the previous one before it reads anything
// a kernel wrote (and so, transitively, for every earlier one: each of them waited too), and only then lets
// the next one start, so at most two kernels of a step are resident at a time. Without the launch
// attribute both instructions do nothing.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global(p)));
}

// ---- the step's timeline (infer/decode_timeline.h) ----------------------------------------------------
// Compiled in every build (so that CI compiles the timeline too); only a build with MUSE_DECODE_TIMELINE
// stamps.

#ifdef MUSE_DECODE_TIMELINE
constexpr bool kTimeline = true;
#else
constexpr bool kTimeline = false;
#endif

__device__ unsigned long long g_timeline[int(Mark::count)];

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

// Stamps `m` from thread 0 of the first row's block x.
__device__ __forceinline__ void stamp(Mark m, unsigned x = 0) {
  if constexpr (kTimeline)
    if (threadIdx.x == 0 && blockIdx.x == x && blockIdx.y == 0 && blockIdx.z == 0) g_timeline[int(m)] = global_ns();
}

// Stamps `m` as the latest of every block's thread 0: a kernel's end.
__device__ __forceinline__ void stamp_last(Mark m) {
  if constexpr (kTimeline)
    if (threadIdx.x == 0) atomicMax(&g_timeline[int(m)], global_ns());
}

__device__ __forceinline__ float curvature_of(float c_raw) {
  return fminf(kCurvatureMin + softplus(c_raw), kCurvatureMax);
}

// ops/linear_attn.cpp's feature map φ(x) = ELU(x·s) + 1.
__device__ __forceinline__ float linear_feature(float x, float scale) {
  const float u = x * scale;
  return u > 0.f ? u + 1.f : expf(u);
}

// For i = first, first + stride, … < n: store(i, load(i)), kUnroll elements at a time with every load of a
// batch issued before its first store. Loops that store what they load need this: the compiler cannot tell
// a store from a later load's address (generic pointers), and issue is in order, so a plain loop would wait
// one full memory latency per element.
template <int kUnroll, class Load, class Store>
__device__ __forceinline__ void batched_pass(int n, int first, int stride, Load load, Store store) {
  for (int base = first; base < n; base += stride * kUnroll) {
    float v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int i = base + k * stride;
      v[k] = i < n ? load(i) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int i = base + k * stride;
      if (i < n) store(i, v[k]);
    }
  }
}

// A row of width D visited by one warp: lane l takes elements l, l + 32, …
template <class Load, class Store>
__device__ __forceinline__ void warp_row_pass(int D, Load load, Store store) {
  batched_pass<8>(D, threadIdx.x % kWarp, kWarp, load, store);
}

// A lane's share of a LayerNorm row: Σ(x − k), Σ(x − k)² and Σx², for a shift k common to the row.
struct LayerNormSums {
  float shifted = 0.f, shifted_squares = 0.f, squares = 0.f;
  __device__ __forceinline__ void add(float v, float k) {
    const float d = v - k;
    shifted += d;
    shifted_squares += d * d;
    squares += v * v;
  }
};

// One row x[0, D) in shared memory, owned by one warp, is replaced by LN(x)·gain + bias; returns Σx² of the
// input (for the radius δ). gain and bias may be in shared memory (staged) or global memory.
//
// Every decode step waits for this chain (three of them a layer), so it is one pass and one reduction where
// ops/layernorm.cpp takes two: the mean and the variance come from Σ(x − k) and Σ(x − k)² with k = x[0],
// whose shift keeps the variance's subtraction from cancelling when |mean| ≫ std (a GPU test holds rows
// whose mean is 360 times their spread to the CPU op), and 1/std is rsqrtf. When D is a multiple of 128 and
// the three vectors are 16-byte aligned (every preset), a lane takes 4 consecutive elements at a time.
__device__ float warp_layernorm(float* x, const float* gain, const float* bias, int D) {
  const int lane = threadIdx.x % kWarp;
  const float k = x[0], inv_d = 1.f / float(D);
  LayerNormSums sums;
  const bool vec4 = D % (4 * kWarp) == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(gain) % 16 == 0 && reinterpret_cast<uintptr_t>(bias) % 16 == 0;
  float4* x4 = reinterpret_cast<float4*>(x);
  if (vec4) {
#pragma unroll 4
    for (int i = lane; i < D / 4; i += kWarp) {
      const float4 v = x4[i];
      sums.add(v.x, k), sums.add(v.y, k), sums.add(v.z, k), sums.add(v.w, k);
    }
  } else {
#pragma unroll 4
    for (int i = lane; i < D; i += kWarp) sums.add(x[i], k);
  }
  // warp_sum three times over, written as one loop: three calls compile to other (longer) code than the
  // measured one, whose three shuffles of each step issue together.
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    sums.shifted += __shfl_xor_sync(kFull, sums.shifted, offset);
    sums.shifted_squares += __shfl_xor_sync(kFull, sums.shifted_squares, offset);
    sums.squares += __shfl_xor_sync(kFull, sums.squares, offset);
  }
  // x − mean as (x − k) − (mean − k): both terms small when |mean| ≫ std, so no digits of x − mean are lost.
  const float shift_mean = sums.shifted * inv_d;
  const float var = fmaxf(sums.shifted_squares * inv_d - shift_mean * shift_mean, 0.f);
  const float rstd = rsqrtf(var + float(kLayerNormEps));
  auto normalised = [&](float v, float g, float o) { return ((v - k) - shift_mean) * rstd * g + o; };
  if (vec4) {
    const float4* g4 = reinterpret_cast<const float4*>(gain);
    const float4* b4 = reinterpret_cast<const float4*>(bias);
#pragma unroll 4
    for (int i = lane; i < D / 4; i += kWarp) {
      const float4 v = x4[i], g = g4[i], o = b4[i];
      x4[i] = make_float4(normalised(v.x, g.x, o.x), normalised(v.y, g.y, o.y), normalised(v.z, g.z, o.z),
                          normalised(v.w, g.w, o.w));
    }
  } else {
    warp_row_pass(
        D, [&](int i) { return normalised(x[i], gain[i], bias[i]); },
        [&](int i, float v) { x[i] = v; });
  }
  return sums.squares;
}

// rows × cols floats from global (row stride `from_stride`) into shared memory (row stride `to_stride`),
// skipping row `skip` (−1: none), by the whole block: 16 bytes a copy where both sides allow it. The thread's
// (row, unit) advances by the block's stride without a division per copy.
__device__ void stage_rows(float* to, int to_stride, const float* from, int from_stride, int rows, int cols,
                           int skip) {
  const bool vec4 = cols % 4 == 0 && to_stride % 4 == 0 && from_stride % 4 == 0 &&
                    reinterpret_cast<uintptr_t>(to) % 16 == 0 && reinterpret_cast<uintptr_t>(from) % 16 == 0;
  const int width = vec4 ? 4 : 1, units = cols / width;
  const int row_step = blockDim.x / units, unit_step = blockDim.x % units;
  int row = threadIdx.x / units, unit = threadIdx.x % units;
  while (row < rows) {
    if (row != skip) {
      float* t = to + size_t(row) * to_stride + unit * width;
      const float* f = from + size_t(row) * from_stride + unit * width;
      if (vec4)
        copy_async_16(t, f);
      else
        copy_async_4(t, f);
    }
    row += row_step;
    unit += unit_step;
    if (unit >= units) unit -= units, ++row;
  }
}

// ---- the GEMV engine ----------------------------------------------------------------------------------

// Output o of a plan: its segment and its row j in that segment's W.
__device__ __forceinline__ int segment_of(const GemvPlan& plan, int o, int& j) {
  int seg = 0;
  j = o;
  while (j >= plan.segments[seg].out) j -= plan.segments[seg++].out;
  return seg;
}

// The K-range [begin, end) (in float4s with vec4, else floats) of warp slice `slice`.
__device__ __forceinline__ void slice_range(const GemvPlan& plan, int slice, int& begin, int& end) {
  const int units = plan.vec4 ? plan.K / 4 : plan.K;
  begin = min(units, slice * plan.per_slice);
  end = min(units, begin + plan.per_slice);
}

__device__ __forceinline__ float finish_output(const GemvSegment& seg, float acc, int row, int j) {
  float y = acc;
  if (seg.bias) y += seg.bias[j];
  if (seg.epilogue == Epilogue::relu) y = y > 0.f ? y : 0.f;
  if (seg.residual) y += seg.residual[size_t(row) * seg.out + j];
  return y;
}

// The warp asks L2 for bytes [from, from + bytes), a 128-byte line per lane at a time.
__device__ void warp_prefetch_l2(const void* from, size_t bytes) {
  const char* first = reinterpret_cast<const char*>(from);
  for (size_t at = (threadIdx.x % kWarp) * 128; at < bytes; at += kWarp * 128) prefetch_l2(first + at);
}

// Weights do not depend on earlier kernels: before waiting for them, each warp asks L2 for the weight
// bytes of its first output, so the GEMV starts on L2 hits.
__device__ void prefetch_first_tile(const GemvPlan& plan) {
  const int warp = threadIdx.x / kWarp;
  const int o = blockIdx.x * plan.per_tile + (warp >> plan.split_shift);
  if (o >= plan.total) return;
  int j = 0;
  const int seg = segment_of(plan, o, j);
  int begin = 0, end = 0;
  slice_range(plan, warp & (plan.split - 1), begin, end);
  const int unit_bytes = plan.vec4 ? 16 : 4;
  const char* row = reinterpret_cast<const char*>(plan.segments[seg].W + size_t(j) * plan.K);
  warp_prefetch_l2(row + begin * unit_bytes, size_t(end - begin) * unit_bytes);
}

// The plan's outputs for rows [row0, row0 + rows) (rows ≤ kRows ≤ kRowsPerChunk) of x [rows, K] (shared or
// global memory). Tiles of kGemvWarps / split outputs go round the grid's blocks; in a tile, warp w computes
// output tile·(kGemvWarps / split) + w / split over K-slice w % split, and the slices' sums are added in
// slice order. partial: shared [kGemvWarps][kRowsPerChunk].
//
// kRows is 1 for one-row steps and kRowsPerChunk otherwise; a row's sums are the same either way. A one-row
// step is a chain of short kernels whose time is their instructions' latencies, and the kRowsPerChunk-row
// loop would issue every row's tests and skipped products too (measured: W_o's GEMV 2.4 → 1.6 µs in the step).
template <bool kVec4, int kRows>
__device__ void run_gemv(const GemvPlan& plan, const float* x, int rows, int row0,
                         float (*partial)[kRowsPerChunk]) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int split = plan.split, per_tile = plan.per_tile, slice = warp & (split - 1), tiles = plan.tiles;
  const int K = plan.K, units = kVec4 ? K / 4 : K;
  int begin = 0, end = 0;
  slice_range(plan, slice, begin, end);
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int o = tile * per_tile + (warp >> plan.split_shift);
    const bool active = o < plan.total;
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
    int j = 0, seg = 0;
    if (active) {
      seg = segment_of(plan, o, j);
      const float* w = plan.segments[seg].W + size_t(j) * K;
      if (kVec4) {
        const float4* w4 = reinterpret_cast<const float4*>(w);
        const float4* x4 = reinterpret_cast<const float4*>(x);
#pragma unroll 4
        for (int i = begin + lane; i < end; i += kWarp) {
          const float4 wv = __ldg(w4 + i);
#pragma unroll
          for (int r = 0; r < kRows; ++r)
            if (r < rows) {
              const float4 xv = x4[size_t(r) * units + i];
              acc[r] += wv.x * xv.x + wv.y * xv.y + wv.z * xv.z + wv.w * xv.w;
            }
        }
      } else {
#pragma unroll 4
        for (int i = begin + lane; i < end; i += kWarp) {
          const float wv = __ldg(w + i);
#pragma unroll
          for (int r = 0; r < kRows; ++r)
            if (r < rows) acc[r] += wv * x[size_t(r) * K + i];
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < rows) acc[r] = warp_sum(acc[r]);
    }
    if (split == 1) {
      if (active) {
        const GemvSegment& s = plan.segments[seg];
#pragma unroll
        for (int r = 0; r < kRows; ++r)
          if (r < rows && lane == r) s.y[size_t(row0 + r) * s.out + j] = finish_output(s, acc[r], row0 + r, j);
      }
    } else {
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) partial[warp][r] = acc[r];
      }
      __syncthreads();
      if (active && slice == 0 && lane < rows) {
        float sum = 0.f;
        for (int t = 0; t < split; ++t) sum += partial[warp + t][lane];
        const GemvSegment& s = plan.segments[seg];
        s.y[size_t(row0 + lane) * s.out + j] = finish_output(s, sum, row0 + lane, j);
      }
      __syncthreads();
    }
  }
}

// The head of a one-row step (plan: one segment, K % 4 == 0, split 1): nothing else runs, and the GPU's
// memory bandwidth is the limit, so each warp keeps the weight rows of kHeadRowsPerWarp consecutive outputs
// in flight (run_gemv, whose registers hold the sums of kRowsPerChunk rows, keeps one). Warp w of block b
// starts at output (b·kGemvWarps + w)·kHeadRowsPerWarp; each output is summed as run_gemv sums it. E is read
// with the evict-first hint (__ldcs): its 103 MB (phase8-small) would otherwise push the layers' weights,
// recurrent state and kernel code out of L2 before the next step reads them.
constexpr int kHeadRowsPerWarp = 2;

__device__ __forceinline__ int first_head_output() {
  return (blockIdx.x * kGemvWarps + threadIdx.x / kWarp) * kHeadRowsPerWarp;
}

__device__ void prefetch_head_rows(const GemvPlan& plan) {
  const int o = first_head_output(), rows = min(kHeadRowsPerWarp, plan.total - o);
  if (rows > 0) warp_prefetch_l2(plan.segments[0].W + size_t(o) * plan.K, size_t(rows) * plan.K * sizeof(float));
}

__device__ void run_head_one_row(const GemvPlan& plan, const float* x, int row) {
  const GemvSegment& s = plan.segments[0];
  const int lane = threadIdx.x % kWarp, units = plan.K / 4;
  const int stride = gridDim.x * kGemvWarps * kHeadRowsPerWarp;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  for (int o = first_head_output(); o < plan.total; o += stride) {
    const float4* w4 = reinterpret_cast<const float4*>(s.W) + size_t(o) * units;
    float acc[kHeadRowsPerWarp];
#pragma unroll
    for (int p = 0; p < kHeadRowsPerWarp; ++p) acc[p] = 0.f;
#pragma unroll 4
    for (int i = lane; i < units; i += kWarp) {
      float4 wv[kHeadRowsPerWarp];
#pragma unroll
      for (int p = 0; p < kHeadRowsPerWarp; ++p)
        wv[p] = o + p < plan.total ? __ldcs(w4 + size_t(p) * units + i) : make_float4(0.f, 0.f, 0.f, 0.f);
      const float4 xv = x4[i];
#pragma unroll
      for (int p = 0; p < kHeadRowsPerWarp; ++p)
        acc[p] += wv[p].x * xv.x + wv[p].y * xv.y + wv[p].z * xv.z + wv[p].w * xv.w;
    }
#pragma unroll
    for (int p = 0; p < kHeadRowsPerWarp; ++p) {
      acc[p] = warp_sum(acc[p]);
      if (lane == p && o + p < plan.total) s.y[size_t(row) * s.out + o + p] = finish_output(s, acc[p], row, o + p);
    }
  }
}

// ---- the prologue kernels' shared memory ---------------------------------------------------------------

// Shared memory of a prologue kernel (block_input, residual_mix, head) whose chunks hold `rows` rows of width D:
// the rows x, `params` LayerNorm vectors, and for residual_mix (when the block stays within
// kPrologueStagingBytes) the chunk's h_in and y_glob rows. Everything but the rows the previous kernel writes
// is copied in before the wait: parameters, and rows that kernels before the previous one wrote.
struct PrologueShared {
  float *x, *params, *h_in, *y_glob;  // h_in, y_glob: null when not staged
};

__host__ __device__ inline bool stage_residual_rows(int rows, int D) {
  return size_t(3 * rows + 4) * D * sizeof(float) <= kPrologueStagingBytes;
}

__host__ __device__ inline size_t prologue_floats(int rows, int D, int params, bool residual_rows) {
  return size_t(rows + params + (residual_rows ? 2 * rows : 0)) * D;
}

__device__ PrologueShared prologue_shared(float* smem, int rows, int D, int params, bool residual_rows) {
  PrologueShared p{};
  p.x = smem;
  p.params = p.x + size_t(rows) * D;
  if (residual_rows) {
    p.h_in = p.params + size_t(params) * D;
    p.y_glob = p.h_in + size_t(rows) * D;
  }
  return p;
}

// The rows [row0, row0 + n) of a [·, D] buffer into `to`, asynchronously: one contiguous run of n·D floats,
// 16 bytes a copy where both ends allow. A flat loop, as most calls come right after the wait, on the step's
// critical path (stage_rows' general row/column walk costs about a microsecond there).
__device__ void stage_chunk(float* to, const float* from, int row0, int n, int D) {
  const float* src = from + size_t(row0) * D;
  const int count = n * D;
  if (count % 4 == 0 && reinterpret_cast<uintptr_t>(to) % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0)
    for (int i = 4 * threadIdx.x; i < count; i += 4 * blockDim.x) copy_async_16(to + i, src + i);
  else
    for (int i = threadIdx.x; i < count; i += blockDim.x) copy_async_4(to + i, src + i);
}

// A parameter vector [D] into slot i of the staged parameters (nothing when it is absent).
__device__ void stage_param(const PrologueShared& p, int i, const float* param, int D) {
  if (param) stage_chunk(p.params + size_t(i) * D, param, 0, 1, D);
}

// ---- kernels --------------------------------------------------------------------------------------------

template <bool kVec4, int kRows>
__global__ void __launch_bounds__(kGemvThreads, kGemvBlocksPerSm)
    gemv_kernel(const float* x, int count, const __grid_constant__ GemvPlan plan) {
  __shared__ float partial[kGemvWarps][kRowsPerChunk];
  stamp(Mark::wo_start);
  prefetch_first_tile(plan);
  wait_for_previous_kernel();
  stamp(Mark::wo_waited);
  allow_next_kernel();
  const int row0 = blockIdx.y * kRowsPerChunk, rows = min(kRowsPerChunk, count - row0);
  run_gemv<kVec4, kRows>(plan, x + size_t(row0) * plan.K, rows, row0, partial);
  stamp_last(Mark::wo_done);
}

template <bool kVec4, int kRows>
__global__ void __launch_bounds__(kGemvThreads, kGemvBlocksPerSm)
    block_input_kernel(StepRows rows, float* h_in, Embedding embedding, const __grid_constant__ BlockArgs b,
                       StepBuffers s, const __grid_constant__ GemvPlan plan) {
  extern __shared__ float smem[];
  __shared__ float partial[kGemvWarps][kRowsPerChunk];
  const int D = b.D, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int chunk_rows = min(kRowsPerChunk, rows.count);
  const int row0 = blockIdx.y * kRowsPerChunk, n = min(kRowsPerChunk, rows.count - row0);
  const PrologueShared p = prologue_shared(smem, chunk_rows, D, 2, false);  // x: u
  stamp(Mark::input_start);
  // Unlike the other GEMV kernels, no L2 prefetch of the first weight rows: its 200-odd blocks' prefetches
  // (3.5 MB for phase8-small) compete with the previous kernel's loads from L2, which are on the step's
  // critical path (without them: one stream 4,027 → 4,108 tokens/s, phase8-medium 1,627 → 1,736).
  stage_param(p, 0, b.ln_gain, D);
  stage_param(p, 1, b.ln_bias, D);
  wait_for_previous_kernel();
  stamp(Mark::input_waited);
  allow_next_kernel();
  if (!embedding.E) stage_chunk(p.x, h_in, row0, n, D);
  wait_async_copies();
  __syncthreads();
  stamp(Mark::input_staged);
  // Every block normalises its rows for its own GEMV; block 0 also writes what later kernels read.
  const bool writer = blockIdx.x == 0;
  if (warp < n) {
    const int r = row0 + warp, position = rows.positions[r];
    float* xr = p.x + size_t(warp) * D;
    if (embedding.E) {
      float* hr = h_in + size_t(r) * D;
      const float* e = embedding.E + size_t(rows.tokens[r]) * D;
      const float* pos = embedding.positions ? embedding.positions + size_t(position) * D : nullptr;
      warp_row_pass(
          D, [&](int i) { return pos ? __ldg(e + i) + __ldg(pos + i) : __ldg(e + i); },
          [&](int i, float v) {
            xr[i] = v;
            if (writer) hr[i] = v;
          });
    }
    const float squares = warp_layernorm(xr, p.params, p.params + D, D);
    if (writer) {
      float* ur = s.u + size_t(r) * D;
      warp_row_pass(D, [&](int i) { return xr[i]; }, [&](int i, float v) { ur[i] = v; });
      if (lane == 0) s.delta[r] = 2.f * sqrtf(squares) / sqrtf(float(D));
    }
  }
  __syncthreads();
  stamp(Mark::input_normalised);
  run_gemv<kVec4, kRows>(plan, p.x, n, row0, partial);
  stamp_last(Mark::input_done);
}

// What the BK step of a row (ops/bk.cpp's bk_decode_step) reads besides block_input's projections: its
// parameters and g_{t−1}, w_J,prev·u_{t−1} of the state slot of this position's parity, which the last step
// wrote. Loaded before the wait, so that the step after it only waits for the projections.
//
// The mixer's work before the wait outlasts block_input's when it is a chain of loads, math and copies, so
// its scalars come in two halves: load_* issues the loads before the block's staging copies, finish_*
// does the math after them, and the loads' latency overlaps the copies' issue.
struct BkInputs {
  float eps_p, eta;                   // ε_p; softplus(ε_p) + η_floor (finish_bk_inputs)
  float E0, b_J;                      // hopping only
  float prev_re, prev_im, prev_half;  // hopping only
};

__device__ BkInputs load_bk_inputs(const BlockArgs& b, int stream, int position) {
  BkInputs in{};
  in.eps_p = b.bk_eps_p[0];
  if (b.hopping) {
    const float* previous = b.state.bk + size_t(stream) * b.state.stream_floats + (position % 2) * 4;
    in.E0 = b.bk_E0[0];
    in.b_J = b.bk_b_J[0];
    in.prev_re = previous[0];
    in.prev_im = previous[1];
    in.prev_half = previous[2];
  }
  return in;
}

__device__ void finish_bk_inputs(BkInputs& in) { in.eta = softplus(in.eps_p) + float(kBkEtaFloor); }

// The BK step of row r from block_input's v_pre = w_v·u + b_v and the two halves of w_J·u.
struct BkStep {
  float g_re, g_im;
  float F[3];       // (η Re g, η Im g, η |g|)
  float prev_half;  // w_J,prev·u_t: the next position's share of its bond (0 without hopping)
};

__device__ BkStep bk_step(const BlockArgs& b, const StepBuffers& s, const BkInputs& in, int r) {
  const float eta = in.eta;
  float d_re = (1.f + cap(s.bk_v[r], kPotentialCap)) - in.E0;  // E0 = 0 without hopping
  float d_im = -eta;
  BkStep step;
  step.prev_half = 0.f;
  if (b.hopping) {
    const float J = b.j_max * tanhf(s.bk_J[2 * r + 1] + in.b_J + in.prev_half);
    d_re -= (J * J) * in.prev_re;
    d_im -= (J * J) * in.prev_im;
    step.prev_half = s.bk_J[2 * r];
  }
  const float n = d_re * d_re + d_im * d_im;
  step.g_re = d_re / n;
  step.g_im = -d_im / n;
  step.F[0] = eta * step.g_re;
  step.F[1] = eta * step.g_im;
  step.F[2] = eta * hypotf(step.g_re, step.g_im);
  return step;
}

// Σ of N values over the mixer's block (every thread gets the sums). scratch: N·kMixerWarps floats of shared
// memory. The warps' partial sums are added in warp order, so the result does not depend on timing.
template <int N>
__device__ void block_sum(float (&v)[N], float* scratch) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = warp_sum(v[i]);
    if (lane == 0) scratch[i * kMixerWarps + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = 0.f;
    for (int w = 0; w < kMixerWarps; ++w) v[i] += scratch[i * kMixerWarps + w];
  }
  __syncthreads();
}

// The maximum of v over the mixer's block, as block_sum.
__device__ float block_max(float v, float* scratch) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFull, v, offset));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = -INFINITY;
  for (int w = 0; w < kMixerWarps; ++w) v = fmaxf(v, scratch[w]);
  __syncthreads();
  return v;
}

// The shared memory of an attention block (floats, in this order): the head's ring of keys and values
// (when staged, in rows padded as ring_stride says), the linear-attention state S, the key norms and gates
// of the ring, then the per-token vectors.
struct AttentionShared {
  float *keys, *values;  // [W, ring_stride] when staged, else null
  float *S;              // [dh, dh] (linear attention)
  float4* norms;         // [W]
  float *log_mu, *q, *k, *v, *z, *phi_k, *phi_q, *scores, *partial_local, *partial_linear, *scratch;
};

// Rows of the staged ring: 16-byte aligned for the copies, and 4 floats longer than a key so that the 32
// threads of a warp (8 keys × 4 interleaved runs of elements) read 32 different banks.
__host__ __device__ inline int ring_stride(int dh) { return dh % 4 == 0 ? dh + 4 : dh + 1; }

// Region sizes are rounded up to 4 floats so that the float4 key norms stay 16-byte aligned.
__host__ __device__ inline size_t round4(size_t floats) { return (floats + 3) / 4 * 4; }
__host__ __device__ inline size_t ring_floats(int dh, int W) { return round4(size_t(W) * ring_stride(dh)); }
__host__ __device__ inline size_t partial_floats(int dh) { return kMixerThreads > dh ? kMixerThreads : dh; }

// Shared floats of an attention block besides the staged ring: S, the norms, then the per-token vectors.
__host__ __device__ inline size_t attention_floats(int dh, int W, bool linear_attn) {
  return (linear_attn ? round4(size_t(dh) * dh) : 0) + 4 * size_t(W) + W + 6 * size_t(dh) + W +
         2 * partial_floats(dh) + 3 * kMixerWarps;
}

// Whether the attention blocks stage the head's ring in shared memory: when it fits the budget that keeps
// several mixer blocks on an SM. A wider window reads the ring from global memory (L2) instead.
__host__ __device__ inline bool stage_ring(int dh, int W, bool linear_attn) {
  return (2 * ring_floats(dh, W) + attention_floats(dh, W, linear_attn)) * sizeof(float) <= kRingStagingBytes;
}

__device__ AttentionShared attention_shared(float* smem, int dh, int W, bool linear_attn) {
  AttentionShared a{};
  float* at = smem;
  if (stage_ring(dh, W, linear_attn)) {
    a.keys = at, at += ring_floats(dh, W);
    a.values = at, at += ring_floats(dh, W);
  }
  if (linear_attn) a.S = at, at += round4(size_t(dh) * dh);
  a.norms = reinterpret_cast<float4*>(at), at += 4 * W;
  a.log_mu = at, at += W;
  a.q = at, at += dh;
  a.k = at, at += dh;
  a.v = at, at += dh;
  a.phi_k = at, at += dh;
  a.phi_q = at, at += dh;
  a.z = at, at += dh;
  a.scores = at, at += W;
  a.partial_local = at, at += partial_floats(dh);
  a.partial_linear = at, at += partial_floats(dh);
  a.scratch = at;
  return a;
}

// Before the wait: the parts of head h's state that only the previous step wrote (the ring but for the slot
// this token replaces, the ring's key norms and gates, the linear state) start their copies into shared memory.
__device__ void stage_attention_state(const BlockArgs& b, const AttentionShared& a, int stream, int position,
                                      int h) {
  const int D = b.D, H = b.H, W = b.W, dh = D / H, slot = position % W;
  const LayerState& st = b.state;
  const size_t at = size_t(stream) * st.stream_floats;
  if (a.keys) {
    stage_rows(a.keys, ring_stride(dh), st.keys + at + h * dh, D, W, dh, slot);
    stage_rows(a.values, ring_stride(dh), st.values + at + h * dh, D, W, dh, slot);
  }
  stage_rows(reinterpret_cast<float*>(a.norms), 4, st.key_norms + at + 4 * h, 4 * H, W, 4, slot);
  if (st.log_mu) stage_rows(a.log_mu, 1, st.log_mu + at + h, H, W, 1, slot);
  if (a.S) {
    stage_rows(a.S, dh, st.lin_S + at + size_t(h) * dh * dh, dh, dh, dh, -1);
    stage_rows(a.z, dh, st.lin_z + at + h * dh, dh, 1, dh, -1);
  }
}

// After the wait: the token's q, k, v of head h (block_input's, from element `at` of each) join the copies,
// 16 bytes a copy when d_h and the buffers allow. Everything after the wait is on the step's critical path,
// so this is a plain strided loop (stage_rows' general row/column walk costs a microsecond here).
__device__ void stage_token(const StepBuffers& s, const AttentionShared& a, size_t at, int dh, bool vec4) {
  const float* from[3] = {s.q + at, s.k + at, s.v + at};
  float* to[3] = {a.q, a.k, a.v};
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    if (vec4)
      for (int e = 4 * threadIdx.x; e < dh; e += 4 * blockDim.x) copy_async_16(to[i] + e, from[i] + e);
    else
      for (int e = threadIdx.x; e < dh; e += blockDim.x) copy_async_4(to[i] + e, from[i] + e);
  }
}

// Head h's scalars, which depend on parameters only: computed before the wait, in two halves as BkInputs.
struct HeadScalars {
  float c_raw, beta;   // the parameters (load_head_scalars)
  float sqrt_c;        // √c of the curvature (finish_head_scalars, as the rest)
  float gate[4];       // key gate w (3) and b; unused without the gate
  float temperature;   // softplus(β_h)
  float slope;         // ALiBi slope, or 0
  float alpha;         // the curvature mix's weight of the windowed path
};

__device__ HeadScalars load_head_scalars(const BlockArgs& b, int h) {
  HeadScalars hs{};
  hs.c_raw = b.c_raw[0];
  hs.beta = b.beta[h];
  if (b.key_gate_w) {
    for (int i = 0; i < 3; ++i) hs.gate[i] = b.key_gate_w[3 * h + i];
    hs.gate[3] = b.key_gate_b[h];
  }
  hs.slope = b.alibi_slopes ? b.alibi_slopes[h] : 0.f;
  return hs;
}

__device__ void finish_head_scalars(const BlockArgs& b, HeadScalars& hs) {
  const float c = curvature_of(hs.c_raw);
  hs.sqrt_c = sqrtf(c);
  hs.temperature = softplus(hs.beta);
  // Without the curvature mix the paths are averaged: α(0.55) = 1/2.
  const float mix_c = b.curvature_mix ? c : float(kCurvatureMixCentre);
  hs.alpha = sigmoid(float(kCurvatureMixSlope) * (mix_c - float(kCurvatureMixCentre)));
}

// Windowed hyperbolic attention of head h for row r (ops/local_attn.cpp's decode push and step), then the
// linear-attention update and the curvature mix (ops/linear_attn.cpp, ops/hybrid.cpp), into s.mixed. Every
// stage spreads over the whole block: scores a group of threads per key, the weighted sum and the linear
// state's update a part of the keys (rows) per thread, added in part order.
__device__ void attention_head(const BlockArgs& b, const StepBuffers& s, const AttentionShared& a,
                               const HeadScalars& hs, int r, int stream, int position, int h, const float* F) {
  const int D = b.D, H = b.H, W = b.W, dh = D / H, tid = threadIdx.x, slot = position % W;
  const LayerState& st = b.state;
  const size_t at = size_t(stream) * st.stream_floats;
  // The ring as the scores read it: staged, or in global memory.
  const float* keys = a.keys ? a.keys : st.keys + at + h * dh;
  const float* values = a.values ? a.values : st.values + at + h * dh;
  const int stride = a.keys ? ring_stride(dh) : D;

  const float sqrt_c = hs.sqrt_c;
  float mu = 1.f, log_mu = 0.f;
  if (b.key_gate_w) {
    mu = sigmoid(hs.gate[0] * F[0] + hs.gate[1] * F[1] + hs.gate[2] * F[2] + hs.gate[3]);
    log_mu = logf(mu);
  }
  const float scale = 1.f / sqrtf(float(dh));
  wait_async_copies();
  __syncthreads();  // the staged state and the token's vectors are in shared memory
  stamp(Mark::mixer_staged);

  // The token's q, k, v; the push of k and v into slot position % W (which holds a key no query from here on
  // sees); φ(q), φ̃(k) = μ·φ(k) and z + φ̃(k) of the linear path. Sums: ‖q‖², ‖k‖², ζ = (z + φ̃(k))·φ(q).
  float sums[3] = {0.f, 0.f, 0.f};
  for (int e = tid; e < dh; e += blockDim.x) {
    const float qe = a.q[e], ke = a.k[e], ve = a.v[e];
    sums[0] += qe * qe;
    sums[1] += ke * ke;
    st.keys[at + size_t(slot) * D + h * dh + e] = ke;
    st.values[at + size_t(slot) * D + h * dh + e] = ve;
    if (a.keys) {
      a.keys[size_t(slot) * ring_stride(dh) + e] = ke;
      a.values[size_t(slot) * ring_stride(dh) + e] = ve;
    }
    if (b.linear_attn) {
      const float phi_k = mu * linear_feature(ke, scale), phi_q = linear_feature(qe, scale);
      const float z_new = a.z[e] + phi_k;
      a.phi_k[e] = phi_k;
      a.phi_q[e] = phi_q;
      st.lin_z[at + h * dh + e] = z_new;
      sums[2] += z_new * phi_q;
    }
  }
  block_sum(sums, a.scratch);
  stamp(Mark::mixer_norms);
  const TangentNorm<float> q_norm = tangent_norm_from_squared(sums[0], sqrt_c);
  const TangentNorm<float> k_norm = tangent_norm_from_squared(sums[1], sqrt_c);
  const float4 new_norms = make_float4(k_norm.norm, k_norm.a, k_norm.ls2a, k_norm.coth2a);
  if (tid == 0) {
    reinterpret_cast<float4*>(st.key_norms + at)[slot * H + h] = new_norms;
    if (st.log_mu) st.log_mu[at + slot * H + h] = log_mu;
  }

  // Scores of the window's keys, `group` threads per key (a power of two, so a key's threads share a warp),
  // oldest key first; thread `sub` of a key takes its elements sub, sub + group, …
  const int first = b.sliding ? max(0, position - W + 1) : position - position % W;
  const int n = position - first + 1, first_slot = first % W;
  // s = −softplus(β)·ρ/√c − slope·age: one product per key; ρ and the weights below take the training
  // kernels' PairMath (ops/poincare.cuh).
  const float distance_scale = -hs.temperature / sqrt_c, slope = hs.slope;
  int group = kWarp;
  while (group > 1 && group * W > int(blockDim.x)) group /= 2;
  const int per_pass = blockDim.x / group, sub = tid % group;
  for (int base = 0; base < n; base += per_pass) {
    const int m = base + tid / group;
    int key_slot = first_slot + m;
    if (key_slot >= W) key_slot -= W;
    float dot = 0.f;
    if (m < n) {
      const float* kj = keys + size_t(key_slot) * stride;
#pragma unroll 8
      for (int e = sub; e < dh; e += group) dot += a.q[e] * kj[e];
    }
    for (int offset = group / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(kFull, dot, offset);
    if (m < n && sub == 0) {
      const float4 norms = key_slot == slot ? new_norms : a.norms[key_slot];
      const TangentNorm<float> kn{norms.x, norms.y, norms.z, norms.w, false};
      float score = distance_scale * scaled_distance<float, PairMath>(q_norm, kn, dot) -
                    slope * float(position - first - m);
      if (st.log_mu) score += key_slot == slot ? log_mu : a.log_mu[key_slot];
      a.scores[m] = score;
    }
  }
  __syncthreads();
  stamp(Mark::mixer_scores);
  float local_max = -INFINITY;
  for (int m = tid; m < n; m += blockDim.x) local_max = fmaxf(local_max, a.scores[m]);
  const float max_score = block_max(local_max, a.scratch);
  stamp(Mark::mixer_max);
  float weight_sum[1] = {0.f};
  for (int m = tid; m < n; m += blockDim.x) {
    const float p = PairMath::exp(a.scores[m] - max_score);
    a.scores[m] = p;
    weight_sum[0] += p;
  }
  block_sum(weight_sum, a.scratch);  // its barriers also publish the weights
  stamp(Mark::mixer_weights);

  // Σ_m p_m v_m and the linear state's update S += φ̃(k)vᵀ with its read Sᵀφ(q): thread (part, e) takes
  // the keys m ≡ part and the rows of S in part `part` (parts of the block's threads per element).
  const int parts = max(1, int(blockDim.x) / dh);
  float* S_global = b.linear_attn ? st.lin_S + at + size_t(h) * dh * dh : nullptr;
  const int rows_per_part = (dh + parts - 1) / parts;
  for (int i = tid; i < parts * dh; i += blockDim.x) {
    const int e = i % dh, part = i / dh;
    float acc = 0.f;
    int key_slot = first_slot + part;
    // Unrolled so that several keys' loads are in flight: one thread's keys are a chain of FMAs.
#pragma unroll 4
    for (int m = part; m < n; m += parts) {
      while (key_slot >= W) key_slot -= W;
      acc += a.scores[m] * values[size_t(key_slot) * stride + e];
      key_slot += parts;
    }
    a.partial_local[i] = acc;
    if (b.linear_attn) {
      const float v_e = a.v[e];
      float out = 0.f;
      const int row1 = min(dh, (part + 1) * rows_per_part);
#pragma unroll 4
      for (int row = part * rows_per_part; row < row1; ++row) {
        const float updated = a.S[size_t(row) * dh + e] + a.phi_k[row] * v_e;
        S_global[size_t(row) * dh + e] = updated;
        out += a.phi_q[row] * updated;
      }
      a.partial_linear[i] = out;
    }
  }
  __syncthreads();
  stamp(Mark::mixer_weighted_sum);
  const float alpha = hs.alpha;
  const float inv_denominator = 1.f / fmaxf(sums[2], float(kLinearAttnDenominatorFloor));
  float* mixed = s.mixed + size_t(r) * D + h * dh;
  for (int e = tid; e < dh; e += blockDim.x) {
    float local = 0.f, linear = 0.f;
    for (int part = 0; part < parts; ++part) {
      local += a.partial_local[part * dh + e];
      linear += a.partial_linear[part * dh + e];
    }
    local /= weight_sum[0];
    mixed[e] = b.linear_attn ? alpha * local + (1.f - alpha) * (linear * inv_denominator) : local;
  }
}

// Shared memory of the AR-SSM block (floats): χ and the readout, and what it copies in before the wait: the
// last step's scan state and conv tail, b₂, λ's ℓ, the rank mask's MLP_r, W₂ (when it fits
// kSsmGateStagingBytes; else it is read from global memory), the conv taps w₀ w₁ w₂ and b_O.
struct SsmShared {
  float *chi, *readout, *omega, *w2, *b2, *ell, *S, *rank, *conv, *tail, *b_o;
};

__host__ __device__ inline bool stage_ssm_gate(int D, int R) {
  return size_t(R) * (D / 4) * sizeof(float) <= kSsmGateStagingBytes;
}

__host__ __device__ inline size_t ssm_floats(int D, int R) {
  return 5 * round4(R) + 4 + round4(3 * kSsmRankHidden) + (stage_ssm_gate(D, R) ? round4(size_t(R) * (D / 4)) : 0) +
         6 * round4(D);
}

__device__ SsmShared ssm_shared(float* smem, int D, int R) {
  SsmShared m{};
  float* at = smem;
  m.chi = at, at += round4(R);
  m.S = at, at += round4(R);
  m.readout = at, at += round4(R);
  m.b2 = at, at += round4(R);
  m.ell = at, at += round4(R);
  m.omega = at, at += 4;
  m.rank = at, at += round4(3 * kSsmRankHidden);
  if (stage_ssm_gate(D, R)) m.w2 = at, at += round4(size_t(R) * (D / 4));
  m.conv = at, at += 3 * round4(D);
  m.tail = at, at += 2 * round4(D);
  m.b_o = at;
  return m;
}

// Before the wait: the AR-SSM's parameters and the row's scan state and conv tail (the last step's) are
// copied in; W_O goes to L2 (every row's block reads it once the readout exists).
__device__ void stage_ssm(const BlockArgs& b, const SsmShared& m, int stream) {
  const int D = b.D, R = b.R;
  const size_t at = size_t(stream) * b.state.stream_floats;
  if (m.w2) stage_rows(m.w2, D / 4, b.ssm_w2, D / 4, R, D / 4, -1);
  stage_rows(m.b2, R, b.ssm_b2, R, 1, R, -1);
  if (b.ssm_ell) stage_rows(m.ell, R, b.ssm_ell, R, 1, R, -1);
  stage_rows(m.S, R, b.state.ssm_S + at, R, 1, R, -1);
  if (b.rank_w1) {
    stage_rows(m.rank, kSsmRankHidden, b.rank_w1, kSsmRankHidden, 1, kSsmRankHidden, -1);
    stage_rows(m.rank + kSsmRankHidden, kSsmRankHidden, b.rank_b1, kSsmRankHidden, 1, kSsmRankHidden, -1);
    stage_rows(m.rank + 2 * kSsmRankHidden, kSsmRankHidden, b.rank_w2, kSsmRankHidden, 1, kSsmRankHidden, -1);
  }
  stage_rows(m.conv, round4(D), b.conv, D, 3, D, -1);
  stage_rows(m.tail, round4(D), b.state.conv_tail + at, D, 2, D, -1);
  stage_rows(m.b_o, D, b.ssm_b_o, D, 1, D, -1);
  const char* wo = reinterpret_cast<const char*>(b.ssm_w_o);
  for (size_t byte = threadIdx.x * 128; byte < size_t(D) * R * sizeof(float); byte += blockDim.x * 128)
    prefetch_l2(wo + byte);
}

// The rank mask's scalar parameters b₂ of MLP_r, w_π and b_π, loaded before the wait.
struct MaskParams {
  float b2, pi_w[3], pi_b;
};

__device__ MaskParams load_mask_params(const BlockArgs& b) {
  MaskParams mp{};
  if (b.rank_w1) {
    mp.b2 = b.rank_b2[0];
    for (int i = 0; i < 3; ++i) mp.pi_w[i] = b.pi_w[i];
    mp.pi_b = b.pi_b[0];
  }
  return mp;
}

// The AR-SSM step of row r (ops/ssm.cpp's ssm_decode_step) from the block_input GEMV's ReLU(W₁u + b₁), W_U u
// and W_V u: gate χ, rank mask, scan, readout, W_O, causal conv, into s.y_glob.
__device__ void ssm_step(const BlockArgs& b, const StepBuffers& s, const SsmShared& m, const MaskParams& mp, int r,
                         int stream, const float* F) {
  const int D = b.D, R = b.R, G = D / 4, tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const size_t at = size_t(stream) * b.state.stream_floats;
  const float* u = s.u + size_t(r) * D;
  const float* hidden = s.ssm_hidden + size_t(r) * G;
  const float* proj_u = s.proj_u + size_t(r) * R;
  const float* proj_v = s.proj_v + size_t(r) * R;
  const float* w2 = m.w2 ? m.w2 : b.ssm_w2;
  wait_async_copies();
  __syncthreads();
  stamp(Mark::ssm_staged, b.H);

  // χ = σ(W₂·hidden + b₂): `group` lanes per gate row (a power of two, so a row's lanes share a warp), all
  // R rows at once when R·group fits the block; the row loop's trip count is the same for every thread.
  int group = kWarp;
  while (group > 1 && group * R > int(blockDim.x)) group /= 2;
  const int rows_per_pass = blockDim.x / group, sub = tid % group;
  for (int base = 0; base < R; base += rows_per_pass) {
    const int i = base + tid / group;
    float dot = 0.f;
    if (i < R) {
#pragma unroll 16
      for (int e = sub; e < G; e += group) dot += w2[size_t(i) * G + e] * hidden[e];
    }
    for (int offset = group / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(kFull, dot, offset);
    if (i < R && sub == 0) m.chi[i] = sigmoid(dot + m.b2[i]);
  }
  const bool mask = b.rank_w1 != nullptr;
  if (mask && warp == 0) {
    // ω = σ(MLP_r(δ))·σ(w_π·F + b_π): lane k holds hidden unit k of MLP_r.
    const float delta = s.delta[r];
    const float unit = m.rank[2 * kSsmRankHidden + lane] * gelu(m.rank[lane] * delta + m.rank[kSsmRankHidden + lane]);
    const float mlp = mp.b2 + warp_sum(unit);
    if (lane == 0)
      m.omega[0] = sigmoid(mlp) * sigmoid(mp.pi_w[0] * F[0] + mp.pi_w[1] * F[1] + mp.pi_w[2] * F[2] + mp.pi_b);
  }
  __syncthreads();
  stamp(Mark::ssm_gate, b.H);
  float* S = b.state.ssm_S + at;
  for (int i = tid; i < R; i += blockDim.x) {
    float gate = m.chi[i];
    if (mask)
      gate *= sigmoid(kMaskSlope * (float(kSsmRankMin) + m.omega[0] * float(R - kSsmRankMin) - float(i) - 0.5f));
    const float scan_in = proj_u[i] * gate;
    // λ = σ(ℓ) and 1 − λ = σ(−ℓ) (Phase 8); Phase 7 has no ℓ and sums.
    const float state = b.ssm_ell ? sigmoid(m.ell[i]) * m.S[i] + sigmoid(-m.ell[i]) * scan_in : m.S[i] + scan_in;
    S[i] = state;
    m.readout[i] = state * (proj_v[i] * gate);
  }
  __syncthreads();
  stamp(Mark::ssm_scan, b.H);
  // y = W_O·readout + b_O + (w₀⊙u_{t−2} + w₁⊙u_{t−1}) + w₂⊙u_t, and the conv tail moves on (in global memory;
  // the staged copy is the last step's).
  const bool wo_vec4 = R % 4 == 0 && reinterpret_cast<uintptr_t>(b.ssm_w_o) % 16 == 0;
  float* tail = b.state.conv_tail + at;
  float* y_glob = s.y_glob + size_t(r) * D;
  const float* w0 = m.conv;
  const float* w1 = m.conv + round4(D);
  const float* w2c = m.conv + 2 * round4(D);
  const float* u_prev2 = m.tail;
  const float* u_prev = m.tail + round4(D);
  // Two outputs per thread and pass, d and d + blockDim.x, whose weight rows are read together: one round of
  // L2 latency per pass instead of one per output.
  for (int d0 = tid; d0 < D; d0 += 2 * blockDim.x) {
    const int d1 = d0 + blockDim.x;
    const bool second = d1 < D;
    float acc[2] = {0.f, 0.f};
    if (wo_vec4) {
      const float4* wo0 = reinterpret_cast<const float4*>(b.ssm_w_o + size_t(d0) * R);
      const float4* wo1 = reinterpret_cast<const float4*>(b.ssm_w_o + size_t(second ? d1 : d0) * R);
#pragma unroll 8
      for (int i = 0; i < R / 4; ++i) {
        const float4 w[2] = {__ldg(wo0 + i), __ldg(wo1 + i)};
        for (int k = 0; k < 2; ++k)
          acc[k] += w[k].x * m.readout[4 * i] + w[k].y * m.readout[4 * i + 1] + w[k].z * m.readout[4 * i + 2] +
                    w[k].w * m.readout[4 * i + 3];
      }
    } else {
      const float* wo0 = b.ssm_w_o + size_t(d0) * R;
      const float* wo1 = b.ssm_w_o + size_t(second ? d1 : d0) * R;
#pragma unroll 8
      for (int i = 0; i < R; ++i) {
        acc[0] += __ldg(wo0 + i) * m.readout[i];
        acc[1] += __ldg(wo1 + i) * m.readout[i];
      }
    }
    const float u_now[2] = {u[d0], second ? u[d1] : 0.f};
    for (int k = 0; k < 1 + int(second); ++k) {
      const int d = k == 0 ? d0 : d1;
      y_glob[d] = acc[k] + m.b_o[d] + (w0[d] * u_prev2[d] + w1[d] * u_prev[d]) + w2c[d] * u_now[k];
      tail[d] = u_prev[d];
      tail[D + d] = u_now[k];
    }
  }
  stamp(Mark::ssm_done, b.H);
}

// Blocks (h < H, r): attention head h of row r; blocks (H, r): the AR-SSM of row r. Every block runs the BK
// step of its row (a few scalar operations; the key gate and the rank mask need F); the SSM block records g
// and F for the residual mix and writes the BK state of the next position (the current one's slot, which
// the other blocks read, stays as it is). Each block owns its slices of the stream's state (head h's ring
// columns, norms and linear state; the SSM's), so no two blocks write the same state.
//
// The state a block reads was written by this layer's mixer one step earlier, a whole graph launch ago, so
// its copies into shared memory (and the SSM weights' prefetch) start before the wait for block_input.
__global__ void __launch_bounds__(kMixerThreads) mixer_kernel(StepRows rows, const __grid_constant__ BlockArgs b,
                                                              StepBuffers s) {
  extern __shared__ float smem[];
  const int r = blockIdx.y, stream = rows.streams[r], position = rows.positions[r];
  const bool attention = int(blockIdx.x) < b.H;
  const AttentionShared shared = attention ? attention_shared(smem, b.D / b.H, b.W, b.linear_attn) : AttentionShared{};
  const SsmShared ssm = attention ? SsmShared{} : ssm_shared(smem, b.D, b.R);
  stamp(Mark::mixer_start);
  stamp(Mark::ssm_start, b.H);
  const int h = blockIdx.x, dh = b.D / b.H;
  const size_t token_at = size_t(r) * b.D + h * dh;
  const bool token_vec4 = attention && dh % 4 == 0 && reinterpret_cast<uintptr_t>(shared.q) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(s.q + token_at) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(s.k + token_at) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(s.v + token_at) % 16 == 0;
  BkInputs bk_in = load_bk_inputs(b, stream, position);
  const MaskParams mask_params = attention ? MaskParams{} : load_mask_params(b);
  HeadScalars hs = attention ? load_head_scalars(b, h) : HeadScalars{};
  if (attention)
    stage_attention_state(b, shared, stream, position, h);
  else
    stage_ssm(b, ssm, stream);
  finish_bk_inputs(bk_in);
  if (attention) finish_head_scalars(b, hs);
  wait_for_previous_kernel();
  stamp(Mark::mixer_waited);
  stamp(Mark::ssm_waited, b.H);
  allow_next_kernel();
  if (attention) stage_token(s, shared, token_at, dh, token_vec4);
  stamp(Mark::mixer_token_issued);
  const BkStep bk = bk_step(b, s, bk_in, r);
  stamp(Mark::mixer_bk_step);
  if (attention) {
    attention_head(b, s, shared, hs, r, stream, position, h, bk.F);
    stamp(Mark::mixer_attention_done);
    stamp_last(Mark::mixer_done);
    return;
  }
  if (threadIdx.x == 0) {
    s.g[2 * r] = bk.g_re;
    s.g[2 * r + 1] = bk.g_im;
    for (int i = 0; i < 3; ++i) s.F[3 * r + i] = bk.F[i];
    float* next = b.state.bk + size_t(stream) * b.state.stream_floats + ((position + 1) % 2) * 4;
    next[0] = bk.g_re;
    next[1] = bk.g_im;
    next[2] = bk.prev_half;
    next[3] = 0.f;
  }
  ssm_step(b, s, ssm, mask_params, r, stream, bk.F);
  stamp_last(Mark::mixer_done);
}

template <bool kVec4, int kRows>
__global__ void __launch_bounds__(kGemvThreads, kGemvBlocksPerSm)
    residual_mix_kernel(int count, const float* h_in, float* h_mid, const __grid_constant__ BlockArgs b,
                        StepBuffers s, const __grid_constant__ GemvPlan plan) {
  extern __shared__ float smem[];
  __shared__ float partial[kGemvWarps][kRowsPerChunk];
  const int D = b.D, warp = threadIdx.x / kWarp;
  const int chunk_rows = min(kRowsPerChunk, count);
  const int row0 = blockIdx.y * kRowsPerChunk, n = min(kRowsPerChunk, count - row0);
  // x: y_att, then h_mid, then LN_ffn(h_mid). h_in (two or more kernels back) and y_glob (the mixer's) are
  // complete when this kernel starts.
  const PrologueShared p = prologue_shared(smem, chunk_rows, D, 4, stage_residual_rows(chunk_rows, D));
  stamp(Mark::mix_start);
  // The loads for ξ of this warp's row (the mixer's F, or g) go first, its math after the copies are issued.
  float xi_in[3] = {0.f, 0.f, 0.f}, xi_w[4] = {0.f, 0.f, 0.f, 0.f};  // Phase 7: g's Im part and s_ξ
  if (warp < n) {
    const int r = row0 + warp;
    if (b.phase8) {
      for (int i = 0; i < 3; ++i) xi_in[i] = s.F[3 * r + i], xi_w[i] = b.xi_w[i];
      xi_w[3] = b.xi_b[0];
    } else {
      xi_in[0] = s.g[2 * r + 1];
      xi_w[0] = b.xi_s[0];
    }
  }
  prefetch_first_tile(plan);
  stage_param(p, 0, b.ln_h_gain, D);
  stage_param(p, 1, b.ln_h_bias, D);
  stage_param(p, 2, b.ln_ffn_gain, D);
  stage_param(p, 3, b.ln_ffn_bias, D);
  if (p.h_in) {
    stage_chunk(p.h_in, h_in, row0, n, D);
    stage_chunk(p.y_glob, s.y_glob, row0, n, D);
  }
  const float xi = b.phase8 ? sigmoid(xi_w[0] * xi_in[0] + xi_w[1] * xi_in[1] + xi_w[2] * xi_in[2] + xi_w[3])
                            : sigmoid(xi_w[0] * fabsf(xi_in[0]));
  float* row_xi = partial[0];  // ξ of each row, for the whole block's pass below (the GEMV reuses partial)
  if (warp < n && threadIdx.x % kWarp == 0) row_xi[warp] = xi;
  wait_for_previous_kernel();
  stamp(Mark::mix_waited);
  allow_next_kernel();
  stage_chunk(p.x, s.y_att, row0, n, D);
  wait_async_copies();
  __syncthreads();
  stamp(Mark::mix_staged);
  // ξ·y_att + (1 − ξ)·y_glob through cap30, by the whole block: it is element-wise, so every element is what
  // the row's warp would compute, and for that one warp 16 divisions and tanh a lane took 1.8 µs of a step.
  for (int r = 0; r < n; ++r) {
    const float row_rest = 1.f - row_xi[r];
    float* xr = p.x + size_t(r) * D;
    const float* y_glob = p.y_glob ? p.y_glob + size_t(r) * D : s.y_glob + size_t(row0 + r) * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
      xr[i] = cap(row_xi[r] * xr[i] + row_rest * y_glob[i], float(kResidualCap));
  }
  __syncthreads();
  if (warp < n) {
    const int r = row0 + warp;
    float* xr = p.x + size_t(warp) * D;
    warp_layernorm(xr, p.params, p.params + D, D);
    const float* hr = p.h_in ? p.h_in + size_t(warp) * D : h_in + size_t(r) * D;
    float* mid = h_mid + size_t(r) * D;
    warp_row_pass(
        D, [&](int i) { return hr[i] + xr[i]; },
        [&](int i, float v) {
          xr[i] = v;
          if (blockIdx.x == 0) mid[i] = v;
        });
    if (b.ln_ffn_gain) warp_layernorm(xr, p.params + 2 * D, p.params + 3 * D, D);
  }
  __syncthreads();
  stamp(Mark::mix_prologue);
  run_gemv<kVec4, kRows>(plan, p.x, n, row0, partial);
  stamp_last(Mark::mix_done);
}

// The heads' prologue, after their parameter copies were issued: waits for the last layer, copies the
// chunk's rows of h into p.x and normalises them with LN_final (p.params: gain, bias), a warp a row.
__device__ void head_prologue(const PrologueShared& p, const float* h, int row0, int n, int D) {
  wait_for_previous_kernel();
  stamp(Mark::head_waited);
  allow_next_kernel();
  stage_chunk(p.x, h, row0, n, D);
  wait_async_copies();
  __syncthreads();
  const int warp = threadIdx.x / kWarp;
  if (warp < n) warp_layernorm(p.x + size_t(warp) * D, p.params, p.params + D, D);
  __syncthreads();
}

// kOneRow: a one-row step through run_head_one_row (head() checks that the plan qualifies).
template <bool kVec4, bool kOneRow>
__global__ void __launch_bounds__(kGemvThreads, kGemvBlocksPerSm)
    head_kernel(StepRows rows, const float* h, const float* gain, const float* bias, int D,
                const __grid_constant__ GemvPlan plan) {
  extern __shared__ float smem[];
  __shared__ float partial[kGemvWarps][kRowsPerChunk];
  const int chunk_rows = min(kRowsPerChunk, rows.count);
  const int row0 = blockIdx.y * kRowsPerChunk, n = min(kRowsPerChunk, rows.count - row0);
  const PrologueShared p = prologue_shared(smem, chunk_rows, D, 2, false);  // x: LN_final(h)
  stamp(Mark::head_start);
  if (kOneRow)
    prefetch_head_rows(plan);
  else
    prefetch_first_tile(plan);
  stage_param(p, 0, gain, D);
  stage_param(p, 1, bias, D);
  head_prologue(p, h, row0, n, D);
  if (kOneRow)
    run_head_one_row(plan, p.x, row0);
  else
    run_gemv<kVec4, kRowsPerChunk>(plan, p.x, n, row0, partial);
  stamp_last(Mark::head_done);
}

// ---- the factored HTT head ------------------------------------------------------------------------------

// Z's columns u of an htt_head_z block: its slice of B̂[·, s, ·] is [kHttZColumns][b_stride] in shared memory,
// b_stride = d2 rounded up to odd so that the 32 lanes' reads of one q (one column each) fall on distinct banks.
constexpr int kHttZColumns = kWarp;
__host__ __device__ inline int htt_z_b_stride(int d2) { return d2 | 1; }
__host__ __device__ inline size_t htt_z_floats_shared(int rows, int D, int d2) {
  return prologue_floats(rows, D, 2, false) + size_t(kHttZColumns) * htt_z_b_stride(d2);
}

// Grid (⌈v2 / kHttZColumns⌉, r, chunks of rows): block (x, s) computes Z[(s, p), u] for every width digit p
// and its kHttZColumns columns u. Its slice of B̂ (a parameter) is copied in before the wait; every block then
// normalises its chunk's rows (one warp a row, as head_kernel), and a warp takes one digit p for its 32
// columns at a time: Σ_q X[p,q]·B̂[u,s,q] over the q that survive the crop to D, in order of q, for every row
// of the chunk, X read by all the warp's lanes at once.
template <int kRows>
__global__ void __launch_bounds__(kGemvThreads)
    htt_head_z_kernel(StepRows rows, const float* h, const float* gain, const float* bias,
                      const __grid_constant__ HttHead head) {
  extern __shared__ float smem[];
  const int D = head.D, d2 = head.d2, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int chunk_rows = min(kRowsPerChunk, rows.count);
  const int row0 = blockIdx.z * kRowsPerChunk, n = min(kRowsPerChunk, rows.count - row0);
  const int s = blockIdx.y, u0 = blockIdx.x * kHttZColumns, u_cols = min(kHttZColumns, head.v2 - u0);
  const PrologueShared p = prologue_shared(smem, chunk_rows, D, 2, false);  // x: LN_final(h)
  const int b_stride = htt_z_b_stride(d2);
  float* b_tile = smem + prologue_floats(chunk_rows, D, 2, false);  // [kHttZColumns][b_stride]
  stamp(Mark::head_start);
  stage_rows(b_tile, b_stride, head.B_hat + (size_t(u0) * head.r + s) * d2, head.r * d2, u_cols, d2, -1);
  stage_param(p, 0, gain, D);
  stage_param(p, 1, bias, D);
  const float c_s = cosf(head.theta[s]) / sqrtf(float(head.r));
  head_prologue(p, h, row0, n, D);
  const size_t K = size_t(head.r) * head.d1;
  const float* b_column = b_tile + lane * b_stride;
  for (int digit = warp; digit < head.d1; digit += kGemvWarps) {
    const int first = digit * d2, length = max(0, min(d2, D - first));
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
    for (int q = 0; q < length; ++q) {
      const float b = b_column[q];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < n) acc[r] += p.x[size_t(r) * D + first + q] * b;
    }
    if (lane < u_cols) {
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < n) head.Z[((row0 + r) * K + size_t(s) * head.d1 + digit) * head.v2 + u0 + lane] = c_s * acc[r];
    }
  }
  stamp_last(Mark::head_z_done);
}

// The logits of one row as the product Â·Z, (digits × K)·(K × v2) with K = r·d1, by tiles of kHttTileI digits
// i × kHttTileU columns u. The block's warps split K (in units of 4) into kGemvWarps ranges and each covers
// the whole tile for its range: lane (gi, gu) = (lane / kHttLaneGroupsU, lane % kHttLaneGroupsU) sums
// i = i0 + gi + kHttLaneGroupsI·m and u = u0 + 4gu + n (m, n < 4), sixteen outputs, reading per 4 k one float4
// of Â per i (along k) and one of Z per k (along u) — 8 shared loads for 64 multiply-adds (one output a
// thread would need 1.5 loads a multiply-add). The warps' partial tiles are then added in warp order, so the
// sums' order depends on K alone. The tiles are tall because every block reads its tile of Z after the wait,
// from L2, while Â's tile is read before it: 32 digits a tile halve Z's reads against 16.
constexpr int kHttTileI = 32, kHttTileU = 16, kHttLaneGroupsI = 8, kHttLaneGroupsU = 4;
constexpr int kHttTile = kHttTileI * kHttTileU;
static_assert(kHttLaneGroupsI * kHttLaneGroupsU == kWarp && kHttLaneGroupsI <= 8 &&
              kHttTileI == 4 * kHttLaneGroupsI && kHttTileU == 4 * kHttLaneGroupsU);

// Shared memory of an htt_head_logits block, in floats: Â's tile [kHttTileI][a_stride] and Z's [K4][kHttTileU]
// (K4 = K rounded up to 4, zero-padded), the latter reused for the warps' partial tiles.
struct HttLogitsShared {
  int K4, a_stride;
  __host__ __device__ explicit HttLogitsShared(int K) : K4((K + 3) / 4 * 4), a_stride(4 * ((K4 / 4) | 1)) {}
  // a_stride / 4 odd: the kHttLaneGroupsI (≤ 8) lane groups' float4 reads of Â (rows gi + kHttLaneGroupsI·m)
  // fall on distinct banks.
  __host__ __device__ int a_floats() const { return kHttTileI * a_stride; }
  __host__ __device__ int z_floats() const { return max(K4 * kHttTileU, kGemvWarps * kHttTile); }
  __host__ __device__ size_t bytes() const { return size_t(a_floats() + z_floats()) * sizeof(float); }
};

// Grid (⌈v2 / kHttTileU⌉, ⌈digits / kHttTileI⌉, rows): one row's tile a block, whatever the step's row count,
// so that a stream's logits do not depend on the streams stepped with it. Â's tile (parameters) is copied
// in before the wait, Z's after. Block (0, 0, row) also writes the row's logits [V, Vp) as 0.
__global__ void __launch_bounds__(kGemvThreads) htt_head_logits_kernel(const __grid_constant__ HttHead head) {
  extern __shared__ __align__(16) float smem[];
  const HttLogitsShared layout(head.r * head.d1);
  const int K = head.r * head.d1, K4 = layout.K4, S = layout.a_stride;
  const int i0 = blockIdx.y * kHttTileI, u0 = blockIdx.x * kHttTileU, row = blockIdx.z;
  const int i_rows = min(kHttTileI, head.digits - i0), u_cols = min(kHttTileU, head.v2 - u0);
  float* a_tile = smem;                       // [kHttTileI][S]
  float* z_tile = smem + layout.a_floats();   // [K4][kHttTileU], then [kGemvWarps][kHttTile]
  stamp(Mark::head_logits_start);
  stage_rows(a_tile, S, head.A_hat + size_t(i0) * K, K, i_rows, K, -1);
  for (int t = threadIdx.x; t < kHttTileI * (K4 - K); t += blockDim.x)
    a_tile[t / (K4 - K) * S + K + t % (K4 - K)] = 0.f;
  for (int t = threadIdx.x; t < (K4 - K) * kHttTileU; t += blockDim.x) z_tile[K * kHttTileU + t] = 0.f;
  wait_for_previous_kernel();
  allow_next_kernel();
  if (blockIdx.x == 0 && blockIdx.y == 0)
    for (int v = head.V + threadIdx.x; v < head.Vp; v += blockDim.x) head.logits[size_t(row) * head.Vp + v] = 0.f;
  stage_rows(z_tile, kHttTileU, head.Z + size_t(row) * K * head.v2 + u0, head.v2, K, u_cols, -1);
  wait_async_copies();
  __syncthreads();
  stamp(Mark::head_logits_staged);
  stamp_last(Mark::head_logits_staged_last);

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int gi = lane / kHttLaneGroupsU, gu = lane % kHttLaneGroupsU;
  const int units = K4 / 4, per_warp = (units + kGemvWarps - 1) / kGemvWarps;
  const int begin = min(units, warp * per_warp), end = min(units, begin + per_warp);
  float acc[4][4] = {};
  for (int c = begin; c < end; ++c) {
    float4 a[4];
#pragma unroll
    for (int m = 0; m < 4; ++m)
      a[m] = *reinterpret_cast<const float4*>(a_tile + (gi + kHttLaneGroupsI * m) * S + 4 * c);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const float4 z = *reinterpret_cast<const float4*>(z_tile + (4 * c + kk) * kHttTileU + 4 * gu);
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const float am = kk == 0 ? a[m].x : kk == 1 ? a[m].y : kk == 2 ? a[m].z : a[m].w;
        acc[m][0] += am * z.x;
        acc[m][1] += am * z.y;
        acc[m][2] += am * z.z;
        acc[m][3] += am * z.w;
      }
    }
  }
  stamp(Mark::head_logits_summed);
  __syncthreads();  // z_tile becomes the partial tiles
  float* partial = z_tile + warp * kHttTile;
#pragma unroll
  for (int m = 0; m < 4; ++m)
    *reinterpret_cast<float4*>(partial + (gi + kHttLaneGroupsI * m) * kHttTileU + 4 * gu) =
        make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
  __syncthreads();
  float* out = head.logits + size_t(row) * head.Vp;
  for (int o = threadIdx.x; o < kHttTile; o += blockDim.x) {
    const int ii = o / kHttTileU, uu = o % kHttTileU, v = (i0 + ii) * head.v2 + u0 + uu;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) sum += z_tile[w * kHttTile + o];
    if (ii < i_rows && uu < u_cols && v < head.V) out[v] = sum;
  }
  stamp_last(Mark::head_done);
}

// ---- the low-rank FFN, in two kernels --------------------------------------------------------------------
// ffn_up: block x owns hidden units [x·kFfnSlice, …): hidden = cap10(GELU(U₁·low1 + b₁)), then its share of
// V₂·hidden into `partials`. ffn_down: block x adds the slices' shares (in slice order) and computes D outputs
// [x·kFfnDownOutputs, …) of U₂ with b₂ and the residual. The kernel boundary between them is about 0.4 µs of
// a one-stream step; a barrier among the blocks of one kernel, where the last arrival releases the others,
// measured 2.7 µs (its atomics on one word serialise).

// Lanes that share one output of the FFN's products (a power of two, ≤ 32): each takes
// every kLanes-th term for all the chunk's rows (the weight read once), then a shuffle tree adds the lanes'
// sums. The order depends on kLanes only, not on a step's number of rows, and a block's outputs take one
// pass of its threads whatever the rows.
constexpr int kFfnHiddenLanes = 8;  // per hidden unit: ρ terms
constexpr int kFfnShareLanes = 4;   // per value of a slice's V₂ share: kFfnSlice terms
constexpr int kFfnOutputLanes = 8;  // per U₂ output: ρ terms
constexpr bool lane_group(int lanes) { return lanes >= 1 && lanes <= kWarp && (lanes & (lanes - 1)) == 0; }
static_assert(lane_group(kFfnHiddenLanes) && lane_group(kFfnShareLanes) && lane_group(kFfnOutputLanes));

// acc[r] = Σ_k<len w[k]·x[r·x_stride + k] for the rows r < rows (≤ kRows), by the kLanes lanes of a group
// (`sub`: this lane's place in it); every lane of the group gets the sums. Every lane of the warp must call
// it (len = 0 for lanes without an output).
template <int kLanes, int kRows>
__device__ __forceinline__ void group_dots(float (&acc)[kRows], const float* w, const float* x, int x_stride,
                                           int len, int rows, int sub) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
#pragma unroll 4
  for (int k = sub; k < len; k += kLanes) {
    const float wk = w[k];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < rows) acc[r] += wk * x[r * x_stride + k];
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r)
    for (int offset = kLanes / 2; offset > 0; offset /= 2) acc[r] += __shfl_xor_sync(kFull, acc[r], offset);
}

// For the outputs o < active of a block's `outputs` (passes of kGemvThreads / kLanes groups, every lane of a
// pass through the shuffles): acc = group_dots of the weight row weight_row(o) (len terms) with each row of
// x, then lane r % kLanes of the group calls store(r, o, acc[r]) for each row r < rows.
template <int kLanes, int kRows, class WeightRow, class Store>
__device__ __forceinline__ void lane_group_products(int outputs, int active, WeightRow weight_row, const float* x,
                                                    int x_stride, int len, int rows, Store store) {
  for (int o0 = 0; o0 < outputs; o0 += kGemvThreads / kLanes) {
    const int o = o0 + threadIdx.x / kLanes, sub = threadIdx.x % kLanes;
    float acc[kRows];
    group_dots<kLanes>(acc, weight_row(o), x, x_stride, o < active ? len : 0, rows, sub);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < rows && r % kLanes == sub && o < active) store(r, o, acc[r]);
  }
}

// Row strides of the staged weights: with rows of ρ + 8 (kFfnSlice + 4) floats the groups of a warp, which
// read consecutive rows at the same offsets, fall on different banks.
__host__ __device__ inline int ffn_rank_stride(int rho) { return rho + 8; }
constexpr int kFfnSliceStride = kFfnSlice + 4;

// Shared memory of an ffn_up block (floats, in this order), copied in before the wait: its U₁ rows [kFfnSlice]
// [ρ + 8], its V₂ columns as rows [ρ][kFfnSlice + 4], b₁; then the chunk's low1 and hidden rows.
struct FfnUpShared {
  float *u1, *v2, *b1, *low1, *hidden;
};

__host__ __device__ inline size_t ffn_up_floats(int rho) {
  return size_t(kFfnSlice) * ffn_rank_stride(rho) + size_t(rho) * kFfnSliceStride + kFfnSlice +
         size_t(kRowsPerChunk) * (rho + kFfnSlice);
}

__device__ FfnUpShared ffn_up_shared(float* smem, int rho) {
  FfnUpShared m{};
  float* at = smem;
  m.u1 = at, at += size_t(kFfnSlice) * ffn_rank_stride(rho);
  m.v2 = at, at += size_t(rho) * kFfnSliceStride;
  m.b1 = at, at += kFfnSlice;
  m.low1 = at, at += size_t(kRowsPerChunk) * rho;
  m.hidden = at;
  return m;
}

// Grid (slices, chunks of rows). kRows: 1 for one-row steps, else kRowsPerChunk (as run_gemv).
template <int kRows>
__global__ void __launch_bounds__(kGemvThreads) ffn_up_kernel(int count, const __grid_constant__ FfnPlan f) {
  extern __shared__ float smem[];
  const int rho = f.rho;
  const FfnUpShared m = ffn_up_shared(smem, rho);
  const int slice = blockIdx.x, unit0 = slice * kFfnSlice, width = min(kFfnSlice, f.F - unit0);
  const int row0 = blockIdx.y * kRowsPerChunk, n = min(kRowsPerChunk, count - row0);
  stamp(Mark::ffn_up_start);
  stage_rows(m.u1, ffn_rank_stride(rho), f.u1 + size_t(unit0) * rho, rho, width, rho, -1);
  stage_rows(m.v2, kFfnSliceStride, f.v2 + unit0, f.F, rho, width, -1);
  stage_rows(m.b1, width, f.b1 + unit0, width, 1, width, -1);
  wait_for_previous_kernel();
  stamp(Mark::ffn_up_waited);
  allow_next_kernel();
  stage_chunk(m.low1, f.low1, row0, n, rho);
  wait_async_copies();
  __syncthreads();
  stamp(Mark::ffn_up_staged);
  lane_group_products<kFfnHiddenLanes, kRows>(
      kFfnSlice, width, [&](int i) { return m.u1 + size_t(i) * ffn_rank_stride(rho); }, m.low1, rho, rho, n,
      [&](int r, int i, float acc) { m.hidden[r * kFfnSlice + i] = cap(gelu(acc + m.b1[i]), float(kFfnCap)); });
  __syncthreads();
  stamp(Mark::ffn_up_hidden);
  lane_group_products<kFfnShareLanes, kRows>(
      rho, rho, [&](int o) { return m.v2 + size_t(o) * kFfnSliceStride; }, m.hidden, kFfnSlice, width, n,
      [&](int r, int o, float acc) { f.partials[(size_t(slice) * count + row0 + r) * rho + o] = acc; });
  stamp_last(Mark::ffn_up_done);
}

// Shared memory of an ffn_down block (floats): its U₂ rows [kFfnDownOutputs][ρ + 8], b₂ and the chunk's h_mid
// columns (copied in before the wait), then low2 and the runs' sums of low2 (ffn_sum_floats).
struct FfnDownShared {
  float *u2, *b2, *h_mid, *low2, *sums;
};

// The runs' sums of low2: at most kGemvThreads / ρ runs (or one) of kRowsPerChunk·ρ values.
__host__ __device__ inline size_t ffn_sum_floats(int rho) {
  return size_t(kRowsPerChunk) * (rho > kGemvThreads ? rho : kGemvThreads);
}

__host__ __device__ inline size_t ffn_down_floats(int rho) {
  return size_t(kFfnDownOutputs) * ffn_rank_stride(rho) + kFfnDownOutputs + size_t(kRowsPerChunk) * kFfnDownOutputs +
         size_t(kRowsPerChunk) * rho + ffn_sum_floats(rho);
}

__device__ FfnDownShared ffn_down_shared(float* smem, int rho) {
  FfnDownShared m{};
  float* at = smem;
  m.u2 = at, at += size_t(kFfnDownOutputs) * ffn_rank_stride(rho);
  m.b2 = at, at += kFfnDownOutputs;
  m.h_mid = at, at += size_t(kRowsPerChunk) * kFfnDownOutputs;
  m.low2 = at, at += size_t(kRowsPerChunk) * rho;
  m.sums = at;
  return m;
}

// Grid (⌈D / kFfnDownOutputs⌉, chunks of rows); kRows as ffn_up_kernel.
template <int kRows>
__global__ void __launch_bounds__(kGemvThreads) ffn_down_kernel(int count, const __grid_constant__ FfnPlan f) {
  extern __shared__ float smem[];
  const int tid = threadIdx.x, rho = f.rho, D = f.D;
  const FfnDownShared m = ffn_down_shared(smem, rho);
  const int out0 = blockIdx.x * kFfnDownOutputs, outs = min(kFfnDownOutputs, D - out0);
  const int row0 = blockIdx.y * kRowsPerChunk, n = min(kRowsPerChunk, count - row0);
  stamp(Mark::ffn_down_start);
  stage_rows(m.u2, ffn_rank_stride(rho), f.u2 + size_t(out0) * rho, rho, outs, rho, -1);
  stage_rows(m.b2, outs, f.b2 + out0, outs, 1, outs, -1);
  // residual_mix, which wrote h_mid, is complete: ffn_up waited for it before letting this kernel start.
  stage_rows(m.h_mid, outs, f.h_mid + size_t(row0) * D + out0, D, n, outs, -1);
  wait_for_previous_kernel();
  stamp(Mark::ffn_down_waited);
  // As early as every kernel: letting the next one start only after the sums measured slower (4,007 → 3,778
  // tokens/s), and so did copying the shares into shared memory first (3,792). What made the sums slow then
  // (4.1 µs against 1.1) was block_input's weight prefetches, which it no longer issues.
  allow_next_kernel();
  // low2 = Σ over slices in slice order: `groups` runs of slices per value, so that the loads of a thread
  // are few and independent, then the runs' sums in run order. The runs do not depend on the chunk's row
  // count, so a stream's sums are the same whichever streams step with it.
  const int values = n * rho, groups = max(1, min(f.slices, kGemvThreads / rho));
  const int per_group = (f.slices + groups - 1) / groups;
  for (int t = tid; t < groups * values; t += kGemvThreads) {
    const int g = t / values, v = t % values, r = v / rho, o = v % rho;
    const int first = g * per_group, last = min(f.slices, first + per_group);
    float sum = 0.f;
#pragma unroll 16
    for (int sl = first; sl < last; ++sl) sum += __ldcg(f.partials + (size_t(sl) * count + row0 + r) * rho + o);
    m.sums[t] = sum;
  }
  wait_async_copies();
  __syncthreads();
  for (int v = tid; v < values; v += kGemvThreads) {
    float sum = 0.f;
    for (int g = 0; g < groups; ++g) sum += m.sums[g * values + v];
    m.low2[v] = sum;
  }
  __syncthreads();
  stamp(Mark::ffn_down_summed);
  lane_group_products<kFfnOutputLanes, kRows>(
      kFfnDownOutputs, outs, [&](int j) { return m.u2 + size_t(j) * ffn_rank_stride(rho); }, m.low2, rho, rho, n,
      [&](int r, int j, float acc) {
        f.h_out[size_t(row0 + r) * D + out0 + j] = acc + m.b2[j] + m.h_mid[r * outs + j];
      });
  stamp_last(Mark::ffn_down_done);
}

// ---- launches -------------------------------------------------------------------------------------------

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, bool overlap,
            cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = overlap ? &attribute : nullptr;
  config.numAttrs = overlap ? 1 : 0;
  MUSE_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

int chunks(int count) { return (count + kRowsPerChunk - 1) / kRowsPerChunk; }

// Blocks along x: one per tile of outputs, at most max_blocks (the kernels loop over the rest), at least 1
// (block 0 of the prologue kernels writes their per-row results).
int gemv_blocks(const GemvPlan& plan, int max_blocks) {
  return std::max(1, std::min(plan.tiles, max_blocks));
}

// Shared bytes of block_input and head (one LayerNorm) and of residual_mix, for a step of `rows` rows.
size_t layer_norm_prologue_bytes(int rows, int D) {
  return prologue_floats(std::min(rows, kRowsPerChunk), D, 2, false) * sizeof(float);
}
size_t residual_mix_bytes(int rows, int D) {
  const int chunk_rows = std::min(rows, kRowsPerChunk);
  return prologue_floats(chunk_rows, D, 4, stage_residual_rows(chunk_rows, D)) * sizeof(float);
}

// largest_carveout: the kernel asks for the largest shared-memory carveout. A kernel's blocks start while the
// previous kernel's run (programmatic dependent launch), and an SM whose L1 is split for less shared memory
// than they need takes them only once it drains. For every decode kernel this measured +5.5 % at one
// phase8-small stream and −5.5 % at one phase8-medium stream; without it for the GEMV kernels, the small
// gain went, so the GEMV kernels and the factored head (whose logits blocks ask 71 KB) keep it.
void allow_shared(const void* kernel, size_t bytes, bool largest_carveout) {
  if (largest_carveout)
    MUSE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         int(cudaSharedmemCarveoutMaxShared)));
  if (bytes > 48 * 1024)
    MUSE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace

GemvPlan make_gemv_plan(const std::vector<GemvSegment>& segments, int K) {
  if (segments.size() > size_t(kMaxSegments)) throw std::logic_error("decode gemv: too many segments");
  GemvPlan p;
  p.K = K;
  bool aligned = K % 4 == 0;
  for (const GemvSegment& s : segments) {
    p.segments[p.count++] = s;
    p.total += s.out;
    aligned = aligned && reinterpret_cast<uintptr_t>(s.W) % 16 == 0;
  }
  p.vec4 = aligned;
  // Narrow outputs (the FFN's rank-ρ projections, W_o) would leave most of the GPU idle with one warp per
  // output: split K over up to 8 warps while outputs are few and each slice keeps a warp's lanes busy.
  const int units = p.vec4 ? K / 4 : K;
  while (p.split < kGemvWarps && p.total * p.split < 1024 && units / (2 * p.split) >= kWarp / 2) p.split *= 2;
  while ((1 << p.split_shift) < p.split) ++p.split_shift;
  p.per_tile = kGemvWarps / p.split;
  p.tiles = (p.total + p.per_tile - 1) / p.per_tile;
  p.per_slice = (units + p.split - 1) / p.split;
  return p;
}

size_t mixer_shared_bytes(int D, int H, int W, int R, bool linear_attn) {
  const int dh = D / H;
  size_t attention = attention_floats(dh, W, linear_attn);
  if (stage_ring(dh, W, linear_attn)) attention += 2 * ring_floats(dh, W);
  return std::max(attention, ssm_floats(D, R)) * sizeof(float);
}

size_t prologue_shared_bytes(int D) {
  size_t bytes = 0;
  for (int rows = 1; rows <= kRowsPerChunk; ++rows)
    bytes = std::max({bytes, layer_norm_prologue_bytes(rows, D), residual_mix_bytes(rows, D)});
  return bytes;
}

void configure_kernels(int D, int H, int W, int R, bool linear_attn) {
  const size_t prologue = prologue_shared_bytes(D);
  for (const void* k : {reinterpret_cast<const void*>(&block_input_kernel<true, 1>),
                        reinterpret_cast<const void*>(&block_input_kernel<false, 1>),
                        reinterpret_cast<const void*>(&block_input_kernel<true, kRowsPerChunk>),
                        reinterpret_cast<const void*>(&block_input_kernel<false, kRowsPerChunk>),
                        reinterpret_cast<const void*>(&residual_mix_kernel<true, 1>),
                        reinterpret_cast<const void*>(&residual_mix_kernel<false, 1>),
                        reinterpret_cast<const void*>(&residual_mix_kernel<true, kRowsPerChunk>),
                        reinterpret_cast<const void*>(&residual_mix_kernel<false, kRowsPerChunk>),
                        reinterpret_cast<const void*>(&head_kernel<true, false>),
                        reinterpret_cast<const void*>(&head_kernel<true, true>),
                        reinterpret_cast<const void*>(&head_kernel<false, false>)})
    allow_shared(k, prologue, false);
  allow_shared(reinterpret_cast<const void*>(&mixer_kernel), mixer_shared_bytes(D, H, W, R, linear_attn), false);
  for (const void* k : {reinterpret_cast<const void*>(&gemv_kernel<true, 1>),
                        reinterpret_cast<const void*>(&gemv_kernel<false, 1>),
                        reinterpret_cast<const void*>(&gemv_kernel<true, kRowsPerChunk>),
                        reinterpret_cast<const void*>(&gemv_kernel<false, kRowsPerChunk>)})
    allow_shared(k, 0, true);
}

void block_input(const StepRows& rows, float* h_in, const Embedding* embedding, const BlockArgs& b,
                 const StepBuffers& s, const GemvPlan& plan, int max_blocks, bool overlap, cudaStream_t stream) {
  const dim3 grid(gemv_blocks(plan, max_blocks), chunks(rows.count));
  const Embedding e = embedding ? *embedding : Embedding{};
  const bool one = rows.count == 1;
  launch(plan.vec4 ? (one ? &block_input_kernel<true, 1> : &block_input_kernel<true, kRowsPerChunk>)
                   : (one ? &block_input_kernel<false, 1> : &block_input_kernel<false, kRowsPerChunk>),
         grid, dim3(kGemvThreads),
         layer_norm_prologue_bytes(rows.count, b.D), overlap, stream, rows, h_in, e, b, s, plan);
}

void mixer(const StepRows& rows, const BlockArgs& b, const StepBuffers& s, bool overlap, cudaStream_t stream) {
  launch(&mixer_kernel, dim3(b.H + 1, rows.count), dim3(kMixerThreads),
         mixer_shared_bytes(b.D, b.H, b.W, b.R, b.linear_attn), overlap, stream, rows, b, s);
}

void gemv(const float* x, int count, const GemvPlan& plan, int max_blocks, bool overlap, cudaStream_t stream) {
  const dim3 grid(gemv_blocks(plan, max_blocks), chunks(count));
  const bool one = count == 1;
  launch(plan.vec4 ? (one ? &gemv_kernel<true, 1> : &gemv_kernel<true, kRowsPerChunk>)
                   : (one ? &gemv_kernel<false, 1> : &gemv_kernel<false, kRowsPerChunk>),
         grid, dim3(kGemvThreads), 0, overlap, stream, x, count, plan);
}

void residual_mix(int count, const float* h_in, float* h_mid, const BlockArgs& b, const StepBuffers& s,
                  const GemvPlan& plan, int max_blocks, bool overlap, cudaStream_t stream) {
  const dim3 grid(gemv_blocks(plan, max_blocks), chunks(count));
  const bool one = count == 1, vec4 = plan.vec4 || plan.count == 0;
  launch(vec4 ? (one ? &residual_mix_kernel<true, 1> : &residual_mix_kernel<true, kRowsPerChunk>)
              : (one ? &residual_mix_kernel<false, 1> : &residual_mix_kernel<false, kRowsPerChunk>),
         grid,
         dim3(kGemvThreads), residual_mix_bytes(count, b.D), overlap, stream, count, h_in, h_mid, b, s, plan);
}

FfnPlan make_ffn_plan(int D, int rho) {
  FfnPlan f;
  f.D = D, f.F = ffn_hidden(D), f.rho = rho;
  f.slices = (f.F + kFfnSlice - 1) / kFfnSlice;
  for (const void* k : {reinterpret_cast<const void*>(&ffn_up_kernel<1>),
                        reinterpret_cast<const void*>(&ffn_up_kernel<kRowsPerChunk>)})
    allow_shared(k, ffn_up_floats(rho) * sizeof(float), false);
  for (const void* k : {reinterpret_cast<const void*>(&ffn_down_kernel<1>),
                        reinterpret_cast<const void*>(&ffn_down_kernel<kRowsPerChunk>)})
    allow_shared(k, ffn_down_floats(rho) * sizeof(float), false);
  return f;
}

size_t ffn_partial_floats(const FfnPlan& plan, int rows) { return size_t(plan.slices) * rows * plan.rho; }

void ffn(int count, const FfnPlan& plan, bool overlap, cudaStream_t stream) {
  const bool one = count == 1;
  launch(one ? &ffn_up_kernel<1> : &ffn_up_kernel<kRowsPerChunk>, dim3(plan.slices, chunks(count)),
         dim3(kGemvThreads), ffn_up_floats(plan.rho) * sizeof(float), overlap, stream, count, plan);
  launch(one ? &ffn_down_kernel<1> : &ffn_down_kernel<kRowsPerChunk>,
         dim3((plan.D + kFfnDownOutputs - 1) / kFfnDownOutputs, chunks(count)), dim3(kGemvThreads),
         ffn_down_floats(plan.rho) * sizeof(float), overlap, stream, count, plan);
}

void head(const StepRows& rows, const float* h, const float* gain, const float* bias, int D, const GemvPlan& plan,
          int max_blocks, bool overlap, cudaStream_t stream) {
  // One row and one vec4 weight matrix with a warp per output: the streaming path.
  const bool one_row = rows.count == 1 && plan.vec4 && plan.count == 1 && plan.split == 1;
  const int one_row_blocks = (plan.total + kGemvWarps * kHeadRowsPerWarp - 1) / (kGemvWarps * kHeadRowsPerWarp);
  const dim3 grid(one_row ? std::max(1, std::min(one_row_blocks, max_blocks)) : gemv_blocks(plan, max_blocks),
                  chunks(rows.count));
  launch(one_row ? &head_kernel<true, true> : plan.vec4 ? &head_kernel<true, false> : &head_kernel<false, false>,
         grid, dim3(kGemvThreads),
         layer_norm_prologue_bytes(rows.count, D), overlap, stream, rows, h, gain, bias, D, plan);
}

HttHead make_htt_head(int V, int Vp, int D, int r, int v2, int d1, int d2) {
  HttHead head;
  head.V = V, head.Vp = Vp, head.D = D, head.r = r, head.v2 = v2, head.d1 = d1, head.d2 = d2;
  head.digits = (V + v2 - 1) / v2;
  for (const void* k : {reinterpret_cast<const void*>(&htt_head_z_kernel<1>),
                        reinterpret_cast<const void*>(&htt_head_z_kernel<kRowsPerChunk>)})
    allow_shared(k, htt_z_floats_shared(kRowsPerChunk, D, d2) * sizeof(float), true);
  allow_shared(reinterpret_cast<const void*>(&htt_head_logits_kernel), HttLogitsShared(r * d1).bytes(), true);
  return head;
}

size_t htt_head_shared_bytes(int r, int d1, int d2, int D) {
  return std::max(htt_z_floats_shared(kRowsPerChunk, D, d2) * sizeof(float), HttLogitsShared(r * d1).bytes());
}

size_t htt_head_z_floats(const HttHead& head, int rows) { return size_t(rows) * head.r * head.d1 * head.v2; }

void htt_head(const StepRows& rows, const float* h, const float* gain, const float* bias, const HttHead& head,
              bool overlap, cudaStream_t stream) {
  launch(rows.count == 1 ? &htt_head_z_kernel<1> : &htt_head_z_kernel<kRowsPerChunk>,
         dim3((head.v2 + kHttZColumns - 1) / kHttZColumns, head.r, chunks(rows.count)), dim3(kGemvThreads),
         htt_z_floats_shared(std::min(rows.count, kRowsPerChunk), head.D, head.d2) * sizeof(float), overlap, stream,
         rows, h, gain, bias, head);
  const int tiles_i = (head.digits + kHttTileI - 1) / kHttTileI;
  launch(&htt_head_logits_kernel, dim3((head.v2 + kHttTileU - 1) / kHttTileU, tiles_i, rows.count),
         dim3(kGemvThreads), HttLogitsShared(head.r * head.d1).bytes(), overlap, stream, head);
}

namespace {

const char* const kMarkNames[] = {
    "block_input: start", "block_input: waited", "block_input: rows staged", "block_input: normalised",
    "block_input: done (last block)", "mixer: start", "mixer: waited", "mixer: q, k, v issued", "mixer: BK step",
    "mixer: staged", "mixer: norms", "mixer: scores", "mixer: max", "mixer: weights", "mixer: weighted sum",
    "mixer: attention done", "mixer SSM: start", "mixer SSM: waited", "mixer SSM: staged", "mixer SSM: gate",
    "mixer SSM: scan", "mixer SSM: done", "mixer: done (last block)", "W_o gemv: start", "W_o gemv: waited",
    "W_o gemv: done (last block)", "residual_mix: start", "residual_mix: waited", "residual_mix: staged",
    "residual_mix: prologue", "residual_mix: done (last block)", "ffn up: start", "ffn up: waited",
    "ffn up: staged", "ffn up: hidden", "ffn up: done (last block)", "ffn down: start", "ffn down: waited",
    "ffn down: summed", "ffn down: done (last block)", "head: start", "head: waited", "head Z: done (last block)",
    "head logits: start", "head logits: staged", "head logits: staged (last block)",
    "head logits: summed", "head: done (last block)"};
static_assert(sizeof(kMarkNames) / sizeof(kMarkNames[0]) == size_t(Mark::count), "a name per mark");

}  // namespace

bool timeline_enabled() { return kTimeline; }

std::vector<std::pair<std::string, double>> read_timeline() {
  if constexpr (kTimeline) {
    unsigned long long ns[int(Mark::count)];
    MUSE_CUDA_CHECK(cudaMemcpyFromSymbol(ns, g_timeline, sizeof(ns)));
    std::vector<std::pair<std::string, double>> marks;
    for (int m = 0; m < int(Mark::count); ++m)
      marks.emplace_back(kMarkNames[m], double(static_cast<long long>(ns[m] - ns[int(Mark::input_start)])) / 1e3);
    return marks;
  } else {
    throw std::logic_error("this build has no decode timeline (configure with -DMUSE_DECODE_TIMELINE=ON)");
  }
}

}  // namespace muse::cuda::decode
