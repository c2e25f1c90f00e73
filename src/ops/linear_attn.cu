// Causal linear attention with the key gate on the GPU (contract: ops/linear_attn.h; design:
// docs/kernels/attention.md).
//
// Two forms. The chunked (matrix) form, for d_h ≤ 64 with a workspace (every preset; what the model runs):
// the state before each 64-token chunk is summed first (an outer-product sum per chunk, then a prefix over
// the chunks), and one block per (chunk, h, b) computes all of its tokens with small shared-memory matrix
// products (see "Chunked (matrix) form" below). The sequential form, for wider heads or without a
// workspace: one block per (b, h), threads (x, y) = (column c ∈ [0, CX), row group g ∈ [0, 4)), CX = d_h + 1
// rounded up to a warp. Thread (c, g) keeps the state entries [S | z][r][c] for rows r = g, g + 4, … in
// registers; column c = d_h is z (the value vector is augmented with a constant 1, so z_i = z_{i−1} + φ̃(k_i)
// is the same update as S). Tokens are staged 8 at a time in shared memory (features computed once per
// token), the scan over the 8 tokens runs without barriers, each thread writing its partial sums per
// token; reductions over the partials follow after one barrier.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/cuda_check.cuh"
#include "common/mma_tf32.cuh"
#include "ops/linear.cuh"
#include "ops/linear_attn.cuh"
#include "ops/linear_attn.h"

namespace muse::cuda {

namespace {

constexpr int kWarp = 32;
constexpr int kGroups = 4;      // row groups (blockDim.y)
constexpr int kTokens = 8;      // tokens staged per chunk
constexpr int kMaxHeadDim = 128;
constexpr int kMaxThreads = 160 * kGroups;  // CX ≤ 160 for d_h ≤ 128
// Tokens per segment: with a workspace the scans are split along the sequence into segments of this many
// tokens, each block starting from the state summed over the segments before (or after) it.
constexpr int kSegment = 64;
// Segments only pay when (b, h) alone leaves the GPU short of blocks: the scans get about this many.
constexpr int kTargetBlocks = 512;

// How a scan is split: `count` segments (blockIdx.z) of `len` tokens, each `per` of the `fine` 64-token
// segments whose state sums were computed (count = 1, len = N: one block per (b, h), no states).
struct Segments {
  int count = 1, len = 0, per = 1, fine = 1;
};
constexpr float kFloor = float(kLinearAttnDenominatorFloor);

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// φ(x) = ELU(x·s) + 1 and its derivative, as in ops/linear_attn.cpp.
__device__ __forceinline__ float feature(float x, float scale) {
  const float u = x * scale;
  return u > 0.f ? u + 1.f : expf(u);
}
__device__ __forceinline__ float feature_grad(float x, float scale) {
  const float u = x * scale;
  return u > 0.f ? scale : scale * expf(u);
}

struct Layout {
  int dh, C, CX, XW;  // head width, state columns (d_h + 1), threads along x, warps along x
};

Layout layout(int D, int H) {
  Layout l;
  l.dh = D / H;
  l.C = l.dh + 1;
  l.CX = (l.C + kWarp - 1) / kWarp * kWarp;
  l.XW = l.CX / kWarp;
  return l;
}

size_t forward_smem_bytes(const Layout& l) {
  return sizeof(float) * (size_t(2) * kTokens * l.dh + size_t(kTokens) * l.C + size_t(kTokens) * kGroups * l.C);
}
size_t replay_smem_bytes(const Layout& l) {
  return sizeof(float) * (size_t(4) * kTokens * l.dh + size_t(kTokens) * l.C + size_t(kTokens) * kGroups * l.dh +
                          size_t(kTokens) * l.XW * l.dh + 3 * kTokens);
}
size_t reverse_smem_bytes(const Layout& l) {
  return sizeof(float) * (size_t(6) * kTokens * l.dh + size_t(kTokens) * l.C + size_t(kTokens) * kGroups * l.dh +
                          size_t(kTokens) * l.XW * l.dh + 2 * kTokens);
}

// The [S | z] (or adjoint [dS | dz]) state a block starts from, element (r, c) of a [d_h][C] matrix at
// init + index·d_h·C, into the registers of thread (c, g): rows r = g, g + 4, … (zeros without init).
template <int RA>
__device__ __forceinline__ void load_state(float (&S)[RA], const float* init, long index, int dh, int C, int c,
                                           int g) {
#pragma unroll
  for (int a = 0; a < RA; ++a) {
    const int r = g + kGroups * a;
    S[a] = init && r < dh && c < C ? init[(index * dh + r) * C + c] : 0.f;
  }
}

// The chunked form's and the segment sums' 64 × 64 matrix products run on the tensor cores
// (common/mma_tf32.cuh: 3xTF32 when kExact, under the fp32 GEMM math, else one TF32 pass; fp32_products())
// over shared-memory tiles stored with the summed index outermost. The tiles are filled by 256 threads; each
// of the 8 warps computes a 16 × 32 part of a result: rows 16·(warp mod 4), columns 32·(warp / 4)
// (WarpBlock). Tile rows are kMmaPad floats longer than their 64 (or padded head's) columns: ld ≡ 8 (mod 32)
// makes the fragment loads conflict free.
constexpr int kTile = kSegment;    // tokens per chunk = the segment sums' length
constexpr int kTileThreads = 256;  // 8 warps
constexpr int kFillBatch = kTile * kTile / kTileThreads;  // elements per thread of a 64 × 64 tile
constexpr int kMmaPad = 8;
constexpr int kMmaLd = kTile + kMmaPad;

// This warp's part of a 64 × 64 result and where its accumulator elements acc[nt][e] lie.
struct WarpBlock {
  int m0, n0, g, t;
  __device__ int row(int e) const { return m0 + g + 8 * (e / 2); }
  __device__ int column(int nt, int e) const { return n0 + 8 * nt + 2 * t + e % 2; }
};
__device__ __forceinline__ WarpBlock warp_block() {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  return {16 * (warp % 4), 32 * (warp / 4), lane / 4, lane % 4};
}

// acc += Σ_κ Lt[κ][row]·R[κ][column] over κ < k_end (a multiple of 8; the tiles are zero past their data).
template <bool kExact>
__device__ __forceinline__ void tile_mma(float (&acc)[4][4], const float* Lt, const float* R, const WarpBlock& w,
                                         int k_end) {
  mma_tf32_kmajor<kExact, 4>(acc, Lt, R, kMmaLd, w.m0, w.n0, 0, k_end);
}

// The causal products over a chunk's tokens (A·V, P·K̃, Aᵀ·G, Pᵀ·Q̃): row i of the result sums only κ ≤ i
// (kLower) or κ ≥ i (kUpper); Lt holds zeros at the masked (row, κ). The tensor cores take the warp's
// 8-key steps that reach its rows. With finite values (R) the steps through the warp's diagonal 16 × 16 block
// multiply its masked zeros harmlessly; otherwise 0·∞ would carry a non-finite value of a later token into an
// earlier one's result (or of an earlier into a later; SPEC §2.5), so the diagonal block's keys are summed
// element by element over the allowed κ only. `finite`: the block's R tile is (fill_tile's check, reduced
// over the block with __syncthreads_and).
enum class Causal { kLower, kUpper };
template <bool kExact, Causal kMask>
__device__ __forceinline__ void causal_tile_mma(float (&acc)[4][4], const float* Lt, const float* R,
                                                const WarpBlock& w, bool finite) {
  const int diagonal = w.m0, beyond = w.m0 + 16;  // the diagonal block's keys [m0, m0 + 16)
  if (kMask == Causal::kLower)
    mma_tf32_kmajor<kExact, 4>(acc, Lt, R, kMmaLd, w.m0, w.n0, 0, finite ? beyond : diagonal);
  else
    mma_tf32_kmajor<kExact, 4>(acc, Lt, R, kMmaLd, w.m0, w.n0, finite ? diagonal : beyond, kTile);
  if (finite) return;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = w.row(e), c = w.column(nt, e);
      const int first = kMask == Causal::kLower ? diagonal : i, last = kMask == Causal::kLower ? i : beyond - 1;
      for (int kk = first; kk <= last; ++kk) acc[nt][e] += Lt[kk * kMmaLd + i] * R[kk * kMmaLd + c];
    }
}

// tile[row][column] = this warp's accumulators (the caller synchronises before other warps read them).
__device__ __forceinline__ void store_tile(float* tile, const float (&acc)[4][4], const WarpBlock& w) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      *reinterpret_cast<float2*>(tile + w.row(2 * half) * kMmaLd + w.column(nt, 0)) =
          make_float2(acc[nt][2 * half], acc[nt][2 * half + 1]);
}

// Sum over the 16 lanes (tx) of a half warp.
__device__ __forceinline__ float half_warp_sum(float x) {
  for (int offset = 8; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// A 64 × 64 tile of value(t, e) (t, e < 64) into shared memory at tile[t·ld + e] or, transposed, tile[e·ld + t].
// Each thread issues all its kFillBatch global loads before its first store, so a block waits for memory
// once per tile rather than once per element. Natural: a warp reads 32 consecutive e of one t (coalesced,
// conflict-free stores). Transposed: a warp reads 4 consecutive e of 8 tokens, and with ld ≡ 8 (mod 32) its
// stores (bank 8e + t mod 32) are conflict free. Returns whether the values this thread stored are all
// finite (the causal products' check, without reading the tile again).
template <class F>
__device__ __forceinline__ bool fill_tile(float* tile, int ld, bool transposed, F value) {
  static_assert(kTile == 64 && kTileThreads == 256, "the fill mappings below cover 64 × 64 with 256 threads");
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float x[kFillBatch];
#pragma unroll
  for (int m = 0; m < kFillBatch; ++m) {
    const int t = transposed ? 8 * warp + lane / 4 : 4 * m + threadIdx.x / kTile;
    const int e = transposed ? 4 * m + lane % 4 : threadIdx.x % kTile;
    x[m] = value(t, e);
  }
  bool finite = true;
#pragma unroll
  for (int m = 0; m < kFillBatch; ++m) {
    const int t = transposed ? 8 * warp + lane / 4 : 4 * m + threadIdx.x / kTile;
    const int e = transposed ? 4 * m + lane % 4 : threadIdx.x % kTile;
    tile[transposed ? e * ld + t : t * ld + e] = x[m];
    finite = finite && isfinite(x[m]);
  }
  return finite;
}

// Sums over one segment of tokens of the outer products that build a scan's state:
//   forward (kind 0): Σ_t μ_t·φ(k_t) ⊗ (v_t, 1)          — what [S | z] gains over the segment
//   reverse (kind 1): Σ_t φ(q_t) ⊗ (do_t/n_t, dζ_t)       — what the adjoint [dS | dz] gains
// out [B, H, P, d_h, C]; one block per (h, b, segment). The [d_h × d_h] part is a tensor-core product over
// the segment's tokens, in 64 × 64 output blocks (d_h padded with zeros), each warp a 16 × 32 part; the last
// column is summed per row over tokens t ≡ tx (mod 16), then across the half warp.
template <bool kExact>
__global__ void __launch_bounds__(kTileThreads)
    segment_sums_kernel(float* out, int kind, const float* q, const float* k, const float* v, const float* mu,
                        const float* d_o, const float* zeta, const float* dzeta, int N, int D, int H) {
  const int h = blockIdx.x, b = blockIdx.y, seg = blockIdx.z, P = gridDim.z;
  const int dh = D / H, C = dh + 1, width = (dh + kTile - 1) / kTile * kTile, ld = width + kMmaPad;
  const float scale = 1.f / sqrtf(float(dh));
  const int begin = seg * kSegment, tn = min(kSegment, N - begin);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  extern __shared__ float smem[];
  float* A = smem;                   // [kSegment][ld] μ·φ(k) or φ(q)
  float* Bv = A + kSegment * ld;     // [kSegment][ld] v or do/n
  float* Bz = Bv + kSegment * ld;    // [kSegment] 1 or dζ: the state's last column
  float* per_token = Bz + kSegment;  // [kSegment] μ or n, loaded once per token rather than per element
  const long first_row = (long)b * N + begin;
  for (int t = threadIdx.x; t < tn; t += kTileThreads) {
    const long row = first_row + t;
    per_token[t] = kind == 0 ? (mu ? mu[row * H + h] : 1.f) : fmaxf(zeta[row * H + h], kFloor);
  }
  for (int t = threadIdx.x; t < kSegment; t += kTileThreads)
    Bz[t] = t >= tn ? 0.f : kind == 0 ? 1.f : dzeta[((long)b * H + h) * N + begin + t];
  __syncthreads();
  const float* phi_in = (kind == 0 ? k : q) + first_row * D + (long)h * dh;
  const float* value_in = (kind == 0 ? v : d_o) + first_row * D + (long)h * dh;
  for (int e0 = 0; e0 < width; e0 += kTile) {
    fill_tile(A + e0, ld, false, [&](int t, int e) {
      if (t >= tn || e0 + e >= dh) return 0.f;
      const float phi = feature(phi_in[(long)t * D + e0 + e], scale);
      return kind == 0 ? per_token[t] * phi : phi;
    });
    fill_tile(Bv + e0, ld, false, [&](int t, int e) {
      if (t >= tn || e0 + e >= dh) return 0.f;
      const float x = value_in[(long)t * D + e0 + e];
      return kind == 0 ? x : x / per_token[t];
    });
  }
  __syncthreads();
  float* dst = out + (((long)b * H + h) * P + seg) * dh * C;
  const WarpBlock w = warp_block();
  const int tokens = (tn + 7) / 8 * 8;  // the tile is zero past tn
  for (int r0 = 0; r0 < dh; r0 += kTile) {
    for (int c0 = 0; c0 < dh; c0 += kTile) {
      float acc[4][4] = {};
      mma_tf32_kmajor<kExact, 4>(acc, A + r0, Bv + c0, ld, w.m0, w.n0, 0, tokens);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = r0 + w.row(e), c = c0 + w.column(nt, e);
          if (r < dh && c < dh) dst[r * C + c] = acc[nt][e];
        }
    }
    float last[4] = {};
    for (int t = tx; t < tn; t += 16) {
      const float4 a = *reinterpret_cast<const float4*>(A + t * ld + r0 + 4 * ty);
      const float bz = Bz[t];
      last[0] += a.x * bz;
      last[1] += a.y * bz;
      last[2] += a.z * bz;
      last[3] += a.w * bz;
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const float sum = half_warp_sum(last[a]);
      const int r = r0 + 4 * ty + a;
      if (tx == 0 && r < dh) dst[r * C + dh] = sum;
    }
  }
}

// Values of one scan that a thread loads before storing any: the scan's memory latency is paid once per
// batch rather than once per segment.
constexpr int kScanBatch = 16;

// In place over the P segment sums of each (b, h) and element: the exclusive prefix (what came before a
// segment) or, with reverse, the exclusive suffix (what comes after it). Summed in a fixed order.
__global__ void segment_scan_kernel(float* states, long per_bh, int P, long total, bool reverse) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const long bh = i / per_bh, e = i - bh * per_bh;
  float* base = states + bh * P * per_bh + e;
  auto at = [&](int step) { return base + (long)(reverse ? P - 1 - step : step) * per_bh; };
  float run = 0.f;
  for (int first = 0; first < P; first += kScanBatch) {
    float x[kScanBatch];
#pragma unroll
    for (int j = 0; j < kScanBatch; ++j) x[j] = first + j < P ? *at(first + j) : 0.f;
#pragma unroll
    for (int j = 0; j < kScanBatch; ++j) {
      if (first + j >= P) break;
      *at(first + j) = run;
      run += x[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward scan. RA = rows per thread (a power of two ≥ d_h/4).
template <int RA>
__global__ void __launch_bounds__(kMaxThreads)
    linear_attn_forward_kernel(float* o, float* zeta, float* final_S, float* final_z, const float* q,
                               const float* k, const float* v, const float* mu, const float* init, Segments sg,
                               int N, int D, int H) {
  const int h = blockIdx.x, b = blockIdx.y, seg = blockIdx.z;
  const int begin = seg * sg.len, end = min(N, begin + sg.len);
  const int dh = D / H, C = dh + 1;
  const float scale = 1.f / sqrtf(float(dh));
  const int c = threadIdx.x, g = threadIdx.y;
  const int tid = g * blockDim.x + c, nthreads = blockDim.x * blockDim.y;
  const bool active = c < C;

  extern __shared__ float smem[];
  float* FQ = smem;                    // [kTokens][dh]  φ(q)
  float* FK = FQ + kTokens * dh;       // [kTokens][dh]  μ·φ(k)
  float* VA = FK + kTokens * dh;       // [kTokens][C]   (v, 1)
  float* CP = VA + kTokens * C;        // [kTokens][kGroups][C] column partials Σ_r φ(q)_r·[S|z]_rc

  float S[RA];
  load_state<RA>(S, init, ((long)b * H + h) * sg.fine + seg * sg.per, dh, C, c, g);

  for (int t0 = begin; t0 < end; t0 += kTokens) {
    const int tn = min(kTokens, end - t0);
    for (int idx = tid; idx < tn * C; idx += nthreads) {
      const int t = idx / C, e = idx - t * C;
      const long row = (long)b * N + t0 + t;
      const long at = row * D + (long)h * dh;
      if (e < dh) {
        const float gate = mu ? mu[row * H + h] : 1.f;
        FQ[t * dh + e] = feature(q[at + e], scale);
        FK[t * dh + e] = gate * feature(k[at + e], scale);
        VA[t * C + e] = v[at + e];
      } else {
        VA[t * C + e] = 1.f;
      }
    }
    __syncthreads();
    if (active) {
      for (int t = 0; t < tn; ++t) {
        const float vc = VA[t * C + c];
        float part = 0.f;
#pragma unroll
        for (int a = 0; a < RA; ++a) {
          const int r = g + kGroups * a;
          if (r < dh) {
            S[a] += FK[t * dh + r] * vc;
            part += FQ[t * dh + r] * S[a];
          }
        }
        CP[(t * kGroups + g) * C + c] = part;
      }
    }
    __syncthreads();
    for (int idx = tid; idx < tn * C; idx += nthreads) {
      const int t = idx / C, e = idx - t * C;
      const long row = (long)b * N + t0 + t;
      float z = 0.f;
      for (int gg = 0; gg < kGroups; ++gg) z += CP[(t * kGroups + gg) * C + dh];
      if (e < dh) {
        float num = 0.f;
        for (int gg = 0; gg < kGroups; ++gg) num += CP[(t * kGroups + gg) * C + e];
        o[row * D + (long)h * dh + e] = num * (1.f / fmaxf(z, kFloor));
      } else {
        zeta[row * H + h] = z;
      }
    }
    // No barrier needed here: the next load writes FQ/FK/VA (last read before the barrier above) and
    // the next scan writes CP only after the next load's barrier.
  }

  if (active && seg == sg.count - 1) {
    const long state = (long)b * H + h;
#pragma unroll
    for (int a = 0; a < RA; ++a) {
      const int r = g + kGroups * a;
      if (r >= dh) continue;
      if (c < dh) {
        if (final_S) final_S[(state * dh + r) * dh + c] = S[a];
      } else if (final_z) {
        final_z[state * dh + r] = S[a];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward, forward in time: replays S_i, z_i and writes dζ_i (to dzeta_out [B, H, N]) and, when dq is
// non-null, dq_i = φ′(q_i)·(S_i·do_i/n_i + dζ_i·z_i).
template <int RA>
__global__ void __launch_bounds__(kMaxThreads)
    linear_attn_backward_replay_kernel(float* dq, float* dzeta_out, const float* d_o, const float* zeta,
                                       const float* q, const float* k, const float* v, const float* mu,
                                       const float* init, Segments sg, int N, int D, int H) {
  const int h = blockIdx.x, b = blockIdx.y, seg = blockIdx.z;
  const int begin = seg * sg.len, end = min(N, begin + sg.len);
  const int dh = D / H, C = dh + 1, XW = blockDim.x / kWarp;
  const float scale = 1.f / sqrtf(float(dh));
  const int c = threadIdx.x, g = threadIdx.y;
  const int tid = g * blockDim.x + c, nthreads = blockDim.x * blockDim.y;
  const int lane = tid % kWarp, warp = tid / kWarp, nwarps = nthreads / kWarp, xw = c / kWarp;
  const bool active = c < C, want_dq = dq != nullptr;

  extern __shared__ float smem[];
  float* FQ = smem;                          // [kTokens][dh]
  float* FK = FQ + kTokens * dh;             // [kTokens][dh]
  float* DO = FK + kTokens * dh;             // [kTokens][dh]
  float* ZB = DO + kTokens * dh;             // [kTokens][dh]  z_i after token i
  float* VA = ZB + kTokens * dh;             // [kTokens][C]
  float* CP = VA + kTokens * C;              // [kTokens][kGroups][dh] numerator partials
  float* RP = CP + kTokens * kGroups * dh;   // [kTokens][XW][dh] partials of (S·do)_r per warp along x
  float* ZR = RP + kTokens * XW * dh;        // [kTokens] saved ζ (before the clamp)
  float* DZ = ZR + kTokens;                  // [kTokens] dζ
  float* NS = DZ + kTokens;                  // [kTokens] n = max(ζ, floor)

  float S[RA];
  load_state<RA>(S, init, ((long)b * H + h) * sg.fine + seg * sg.per, dh, C, c, g);

  for (int t0 = begin; t0 < end; t0 += kTokens) {
    const int tn = min(kTokens, end - t0);
    for (int idx = tid; idx < tn * C; idx += nthreads) {
      const int t = idx / C, e = idx - t * C;
      const long row = (long)b * N + t0 + t;
      const long at = row * D + (long)h * dh;
      if (e < dh) {
        const float gate = mu ? mu[row * H + h] : 1.f;
        FQ[t * dh + e] = feature(q[at + e], scale);
        FK[t * dh + e] = gate * feature(k[at + e], scale);
        DO[t * dh + e] = d_o[at + e];
        VA[t * C + e] = v[at + e];
      } else {
        VA[t * C + e] = 1.f;
        ZR[t] = zeta[row * H + h];
      }
    }
    __syncthreads();
    for (int t = 0; t < tn; ++t) {
      // Threads past column d_h carry S = 0 and contribute zeros to the warp sums.
      const float vc = active ? VA[t * C + c] : 0.f;
      const float doc = c < dh ? DO[t * dh + c] : 0.f;
      float part = 0.f;
#pragma unroll
      for (int a = 0; a < RA; ++a) {
        const int r = g + kGroups * a;  // uniform across the warp (one g per warp)
        if (r < dh) {
          if (active) {
            S[a] += FK[t * dh + r] * vc;
            part += FQ[t * dh + r] * S[a];
          }
          if (want_dq) {
            const float row_sum = warp_sum(S[a] * doc);
            if (lane == 0) RP[(t * XW + xw) * dh + r] = row_sum;
            if (c == dh) ZB[t * dh + r] = S[a];
          }
        }
      }
      if (c < dh) CP[(t * kGroups + g) * dh + c] = part;
    }
    __syncthreads();
    // dζ_i = −do_i·numerator_i / n_i² where ζ_i > floor (else 0): one warp per token.
    for (int t = warp; t < tn; t += nwarps) {
      float acc = 0.f;
      for (int cc = lane; cc < dh; cc += kWarp) {
        float num = 0.f;
        for (int gg = 0; gg < kGroups; ++gg) num += CP[(t * kGroups + gg) * dh + cc];
        acc += DO[t * dh + cc] * num;
      }
      acc = warp_sum(acc);
      if (lane == 0) {
        const float z = ZR[t], n = fmaxf(z, kFloor);
        const float dz = z > kFloor ? -acc / (n * n) : 0.f;
        DZ[t] = dz;
        NS[t] = n;
        if (dzeta_out) dzeta_out[((long)b * H + h) * N + t0 + t] = dz;
      }
    }
    __syncthreads();
    if (want_dq) {
      for (int idx = tid; idx < tn * dh; idx += nthreads) {
        const int t = idx / dh, r = idx - t * dh;
        float s = 0.f;
        for (int w = 0; w < XW; ++w) s += RP[(t * XW + w) * dh + r];
        const float dphi_q = s / NS[t] + DZ[t] * ZB[t * dh + r];
        const long at = ((long)b * N + t0 + t) * D + (long)h * dh + r;
        dq[at] += dphi_q * feature_grad(q[at], scale);
      }
    }
    // No barrier needed: the next load writes FQ/FK/DO/VA/ZR (not read above); RP, ZB, CP, DZ, NS are
    // rewritten only after the next load's barrier.
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward, reverse in time, with the adjoint state [dS | dz] in registers:
//   dS_i = dS_{i+1} + (φ(q_i)/n_i)·do_iᵀ,  dz_i = dz_{i+1} + dζ_i·φ(q_i),
//   dφ̃(k_i) = dS_i·v_i + dz_i,  dv_i = dS_iᵀ·φ̃(k_i),  dk_i = μ_i·dφ̃(k_i)·φ′(k_i),  dμ_i = φ(k_i)·dφ̃(k_i).
template <int RA>
__global__ void __launch_bounds__(kMaxThreads)
    linear_attn_backward_reverse_kernel(float* dk, float* dv, float* dmu, const float* d_o, const float* zeta,
                                        const float* dzeta_in, const float* q, const float* k, const float* v,
                                        const float* mu, const float* init, Segments sg, int N, int D, int H) {
  const int h = blockIdx.x, b = blockIdx.y, seg = blockIdx.z;
  const int begin = seg * sg.len, end = min(N, begin + sg.len);
  const int dh = D / H, C = dh + 1, XW = blockDim.x / kWarp;
  const float scale = 1.f / sqrtf(float(dh));
  const int c = threadIdx.x, g = threadIdx.y;
  const int tid = g * blockDim.x + c, nthreads = blockDim.x * blockDim.y;
  const int lane = tid % kWarp, warp = tid / kWarp, nwarps = nthreads / kWarp, xw = c / kWarp;
  const bool active = c < C;

  extern __shared__ float smem[];
  float* FQ = smem;                          // [kTokens][dh]  φ(q)
  float* FQN = FQ + kTokens * dh;            // [kTokens][dh]  φ(q)/n
  float* FK = FQN + kTokens * dh;            // [kTokens][dh]  μ·φ(k)
  float* PK = FK + kTokens * dh;             // [kTokens][dh]  φ(k)
  float* FGK = PK + kTokens * dh;            // [kTokens][dh]  φ′(k)
  float* DO = FGK + kTokens * dh;            // [kTokens][dh]
  float* VA = DO + kTokens * dh;             // [kTokens][C]   (v, 1)
  float* CP = VA + kTokens * C;              // [kTokens][kGroups][dh] dv partials
  float* RP = CP + kTokens * kGroups * dh;   // [kTokens][XW][dh] dφ̃(k) partials
  float* DZ = RP + kTokens * XW * dh;        // [kTokens] dζ
  float* GT = DZ + kTokens;                  // [kTokens] μ

  float dS[RA];
  // The exclusive suffix of this segment's last 64-token segment: everything after this segment.
  load_state<RA>(dS, init, ((long)b * H + h) * sg.fine + min((seg + 1) * sg.per, sg.fine) - 1, dh, C, c, g);

  const int first = begin / kTokens, last = (end - 1) / kTokens;
  for (int ch = last; ch >= first; --ch) {
    const int t0 = ch * kTokens, tn = min(kTokens, end - t0);
    for (int idx = tid; idx < tn * C; idx += nthreads) {
      const int t = idx / C, e = idx - t * C;
      const long row = (long)b * N + t0 + t;
      const long at = row * D + (long)h * dh;
      const float gate = mu ? mu[row * H + h] : 1.f;
      if (e < dh) {
        const float fq = feature(q[at + e], scale);
        const float inv_n = 1.f / fmaxf(zeta[row * H + h], kFloor);
        const float kx = k[at + e], pk = feature(kx, scale);
        FQ[t * dh + e] = fq;
        FQN[t * dh + e] = fq * inv_n;
        FK[t * dh + e] = gate * pk;
        PK[t * dh + e] = pk;
        FGK[t * dh + e] = feature_grad(kx, scale);
        DO[t * dh + e] = d_o[at + e];
        VA[t * C + e] = v[at + e];
      } else {
        VA[t * C + e] = 1.f;
        DZ[t] = dzeta_in[((long)b * H + h) * N + t0 + t];
        GT[t] = gate;
      }
    }
    __syncthreads();
    for (int t = tn - 1; t >= 0; --t) {
      const float vc = active ? VA[t * C + c] : 0.f;
      const float doc = c < dh ? DO[t * dh + c] : 0.f;
      const float dzt = DZ[t];
      float part = 0.f;
#pragma unroll
      for (int a = 0; a < RA; ++a) {
        const int r = g + kGroups * a;  // uniform across the warp
        if (r < dh) {
          if (c < dh)
            dS[a] += FQN[t * dh + r] * doc;
          else if (c == dh)
            dS[a] += dzt * FQ[t * dh + r];
          part += FK[t * dh + r] * dS[a];
          const float row_sum = warp_sum(dS[a] * vc);  // threads past column d_h hold dS = 0
          if (lane == 0) RP[(t * XW + xw) * dh + r] = row_sum;
        }
      }
      if (c < dh) CP[(t * kGroups + g) * dh + c] = part;
    }
    __syncthreads();
    for (int t = warp; t < tn; t += nwarps) {
      const long row = (long)b * N + t0 + t;
      const long at = row * D + (long)h * dh;
      float dgate = 0.f;
      for (int r = lane; r < dh; r += kWarp) {
        float dphi_k = 0.f;
        for (int w = 0; w < XW; ++w) dphi_k += RP[(t * XW + w) * dh + r];
        if (dk) dk[at + r] += GT[t] * dphi_k * FGK[t * dh + r];
        dgate += PK[t * dh + r] * dphi_k;
      }
      dgate = warp_sum(dgate);
      if (dmu && lane == 0) dmu[row * H + h] += dgate;
      if (dv) {
        for (int cc = lane; cc < dh; cc += kWarp) {
          float s = 0.f;
          for (int gg = 0; gg < kGroups; ++gg) s += CP[(t * kGroups + gg) * dh + cc];
          dv[at + cc] += s;
        }
      }
    }
    __syncthreads();  // GT, PK, FGK, RP, CP are read above and rewritten by the next chunk
  }
}

// ---------------------------------------------------------------------------------------------------
// Chunked (matrix) form, for d_h ≤ 64 with a workspace: one block per (64-token chunk, h, b), every token
// of the chunk at once. With Q̃ = φ(q), K̃ = μ·φ(k), V and the state [S | z] summed over the chunks before
// (segment_states, kind 0), the numerators are
//   num = Q̃·S + mask(Q̃K̃ᵀ)·V,   ζ = Q̃·z + mask(Q̃K̃ᵀ)·1        (mask: key j ≤ query i)
// and the backward, with G = (do/n, dζ) and [dS | dz] summed over the chunks after (kind 1), is
//   P = mask(G·(V, 1)ᵀ),  dQ̃ = G·[S | z]ᵀ + P·K̃,  dK̃ = (V, 1)·[dS | dz]ᵀ + Pᵀ·Q̃,  dV = K̃·dS + mask(Q̃K̃ᵀ)ᵀ·G.
// Each product is one tile_mma or causal_tile_mma (above). Tokens past the sequence and columns past d_h are
// zeros.
constexpr int kChunkMaxHeadDim = 64;

// Where one chunk sits, and its loads.
struct ChunkView {
  int b, h, chunk, t0, tn, dh, C, N, D, H;
  float scale;
  __device__ long row(int t) const { return (long)b * N + t0 + t; }
  __device__ long at(int t, int e) const { return row(t) * D + (long)h * dh + e; }
  // A [tokens × d_h] input into a [64][kMmaLd] tile, natural (tile[t][e]) or transposed (tile[e][t]); f maps
  // (t, e) → value. Returns whether this thread's values were all finite.
  template <class F>
  __device__ bool load(float* tile, bool transposed, F f) const {
    return fill_tile(tile, kMmaLd, transposed, [&](int t, int e) { return t < tn && e < dh ? f(t, e) : 0.f; });
  }
  // A [d_h × C] state (null: zeros): its [d_h × d_h] part natural or transposed, its last column into z
  // (unless z is null).
  __device__ void load_state(float* tile, float* z, bool transposed, const float* states) const {
    const float* src = states ? states + (((long)b * H + h) * gridDim.x + chunk) * dh * C : nullptr;
    fill_tile(tile, kMmaLd, transposed,
              [&](int r, int c) { return src && r < dh && c < dh ? src[r * C + c] : 0.f; });
    if (z)
      for (int r = threadIdx.x; r < kTile; r += kTileThreads) z[r] = src && r < dh ? src[r * C + dh] : 0.f;
  }
};

__device__ ChunkView chunk_view(int N, int D, int H) {
  ChunkView v;
  v.chunk = blockIdx.x, v.h = blockIdx.y, v.b = blockIdx.z;
  v.t0 = v.chunk * kTile;
  v.tn = min(kTile, N - v.t0);
  v.dh = D / H, v.C = v.dh + 1, v.N = N, v.D = D, v.H = H;
  v.scale = 1.f / sqrtf(float(v.dh));
  return v;
}

// The chunk's numerators: o, ζ and, in the last chunk, the final state; the products Q̃K̃ᵀ, Q̃·S and the
// causal A·V on the tensor cores, d_h padded to 64.
template <bool kExact>
__global__ void __launch_bounds__(kTileThreads)
    chunk_numerator_kernel(float* o, float* zeta, float* final_S, float* final_z, const float* q, const float* k,
                           const float* v, const float* mu, const float* states, int N, int D, int H) {
  const ChunkView cv = chunk_view(N, D, H);
  const int dh = cv.dh, ld = kMmaLd;
  extern __shared__ float smem[];
  float* QT = smem;                // [d_h][tokens] φ(q)
  float* KT = QT + kTile * ld;     // [d_h][tokens] μ·φ(k)
  float* V = KT + kTile * ld;      // [tokens][d_h]
  float* S = V + kTile * ld;       // [d_h][d_h] state before the chunk
  float* AT = S + kTile * ld;      // [key][query] mask(Q̃K̃ᵀ)ᵀ
  float* z = AT + kTile * ld;      // [d_h] z before the chunk
  float* zeta_s = z + kTile;       // [tokens] ζ
  cv.load(QT, true, [&](int t, int e) { return feature(q[cv.at(t, e)], cv.scale); });
  cv.load(KT, true, [&](int t, int e) {
    return (mu ? mu[cv.row(t) * H + cv.h] : 1.f) * feature(k[cv.at(t, e)], cv.scale);
  });
  const bool v_finite = cv.load(V, false, [&](int t, int e) { return v[cv.at(t, e)]; });
  cv.load_state(S, z, false, states);
  const bool values_finite = __syncthreads_and(v_finite);
  const WarpBlock w = warp_block();
  const int width = (dh + 7) / 8 * 8;  // the tiles are zero past d_h
  {
    float a[4][4] = {};
    tile_mma<kExact>(a, QT, KT, w, width);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = w.row(e), j = w.column(nt, e);
        AT[j * ld + i] = j <= i ? a[nt][e] : 0.f;
      }
  }
  __syncthreads();
  if (threadIdx.x < kTile) {
    const int i = threadIdx.x;
    float s = 0.f;
    for (int e = 0; e < dh; ++e) s += QT[e * ld + i] * z[e];
    for (int j = 0; j < kTile; ++j) s += AT[j * ld + i];
    zeta_s[i] = s;
  }
  float num[4][4] = {};
  tile_mma<kExact>(num, QT, S, w, width);
  causal_tile_mma<kExact, Causal::kLower>(num, AT, V, w, values_finite);
  __syncthreads();
  // o read back from shared memory (over AT) in the fill layout, for whole-row runs of global stores.
  store_tile(AT, num, w);
  __syncthreads();
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = 4 * ty + r;
    if (i >= cv.tn) continue;
    const float inv_n = 1.f / fmaxf(zeta_s[i], kFloor);
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (tx + 16 * c < dh) o[cv.at(i, tx + 16 * c)] = AT[i * ld + tx + 16 * c] * inv_n;
  }
  if (threadIdx.x < cv.tn) zeta[cv.row(threadIdx.x) * H + cv.h] = zeta_s[threadIdx.x];
  if (cv.chunk != gridDim.x - 1 || (!final_S && !final_z)) return;
  // The state after the sequence: the one before this chunk plus its own K̃ᵀ·(V, 1).
  const long state = (long)cv.b * H + cv.h;
  for (int idx = threadIdx.x; idx < dh * cv.C; idx += kTileThreads) {
    const int r = idx / cv.C, c = idx % cv.C;
    float s = c < dh ? S[r * ld + c] : z[r];
    for (int j = 0; j < cv.tn; ++j) s += KT[r * ld + j] * (c < dh ? V[j * ld + c] : 1.f);
    if (c < dh) {
      if (final_S) final_S[(state * dh + r) * dh + c] = s;
    } else if (final_z) {
      final_z[state * dh + r] = s;
    }
  }
}

// The backward's first pass: dζ_i = −do_i·num_i/n_i² where the forward's ζ_i > floor (then n_i = ζ_i), else 0,
// into dzeta [B, H, N]. With the forward's output o_i = num_i/n_i that is −(do_i·o_i)/ζ_i: one dot product
// of two rows it already wrote, instead of the numerators recomputed chunk by chunk. One warp per (b, i, h).
__global__ void dzeta_kernel(float* dzeta, const float* d_o, const float* o, const float* zeta, int N, int D, int H,
                             long triples) {
  const long w = ((long)blockIdx.x * blockDim.x + threadIdx.x) / kWarp;  // (b·N + i)·H + h
  const int lane = threadIdx.x % kWarp, dh = D / H;
  if (w >= triples) return;  // warp-uniform
  const int h = int(w % H);
  const long bi = w / H;
  const long at = bi * D + (long)h * dh;
  float dot = 0.f;
  for (int e = lane; e < dh; e += kWarp) dot += d_o[at + e] * o[at + e];
  dot = warp_sum(dot);
  if (lane == 0) {
    const float zr = zeta[w];
    dzeta[(bi / N * H + h) * N + bi % N] = zr > kFloor ? -dot / zr : 0.f;
  }
}

// The gradients of one chunk (each may be null), accumulated (or, without accumulate, written): dq, dk, dv
// [B, N, D], dmu [B, N, H]. before:
// the kind-0 states (the chunks before), after: the kind-1 states (the chunks after); null for one chunk.
// Six 64 × 72 tiles of shared memory (110 KB: two blocks per SM), refilled in three steps. Each gradient's
// two products accumulate in registers, in the order of the formulas, so a tile is overwritten as soon as
// its last product has read it rather than when the gradient is done.
constexpr int kGradientSlots = 6;

template <bool kExact>
__global__ void __launch_bounds__(kTileThreads, 2)
    chunk_gradient_kernel(float* dq, float* dk, float* dv, float* dmu, const float* d_o, const float* zeta,
                          const float* dzeta, const float* q, const float* k, const float* v, const float* mu,
                          const float* before, const float* after, bool accumulate, int N, int D, int H) {
  const ChunkView cv = chunk_view(N, D, H);
  const int dh = cv.dh, ld = kMmaLd;
  extern __shared__ float smem[];
  auto slot = [&](int s) { return smem + s * kTile * ld; };
  float* z = smem + kGradientSlots * kTile * ld;  // [d_h] z before, then dz after
  float* gz = z + kTile;                          // [tokens] dζ
  float* inv_n = gz + kTile;                      // [tokens] 1/n
  float* gate = inv_n + kTile;                    // [tokens] μ
  for (int t = threadIdx.x; t < kTile; t += kTileThreads) {
    const bool in = t < cv.tn;
    gz[t] = in ? dzeta[((long)cv.b * H + cv.h) * N + cv.t0 + t] : 0.f;
    inv_n[t] = in ? 1.f / fmaxf(zeta[cv.row(t) * H + cv.h], kFloor) : 0.f;
    gate[t] = in && mu ? mu[cv.row(t) * H + cv.h] : 1.f;
  }
  __syncthreads();
  auto phi_q = [&](int t, int e) { return feature(q[cv.at(t, e)], cv.scale); };
  auto phi_k_gated = [&](int t, int e) { return gate[t] * feature(k[cv.at(t, e)], cv.scale); };
  auto g_v = [&](int t, int e) { return d_o[cv.at(t, e)] * inv_n[t]; };
  auto value = [&](int t, int e) { return v[cv.at(t, e)]; };
  // Step 1: Q̃K̃ᵀ and G·(V, 1)ᵀ from the transposed inputs, dQ̃'s G·[S | z]ᵀ (S transposed) and, once those
  // are read, dV's K̃·dS (dS natural).
  float *QT = slot(0), *KT = slot(1), *GT = slot(2), *VT = slot(3), *ST = slot(4), *dS = slot(5);
  // The causal products' other sides are K̃, G and Q̃ (causal_tile_mma): whether they are finite.
  bool loaded_finite = cv.load(QT, true, phi_q);
  loaded_finite = cv.load(KT, true, phi_k_gated) && loaded_finite;
  loaded_finite = cv.load(GT, true, g_v) && loaded_finite;
  cv.load(VT, true, value);
  if (dq) cv.load_state(ST, z, true, before);
  if (dv) cv.load_state(dS, nullptr, false, after);
  const bool finite = __syncthreads_and(loaded_finite);
  const WarpBlock w = warp_block();
  const int width = (dh + 7) / 8 * 8;  // the tiles are zero past d_h
  // A = mask(Q̃K̃ᵀ), P and Pᵀ go over Q̃ᵀ, Gᵀ and Sᵀ once the products below have read them.
  float *A = slot(0), *P = slot(2), *PT = slot(4);
  float dq_acc[4][4] = {}, dv_acc[4][4] = {};
  {
    float a[4][4] = {}, p[4][4] = {};
    tile_mma<kExact>(a, QT, KT, w, width);
    tile_mma<kExact>(p, GT, VT, w, width);
    if (dq) tile_mma<kExact>(dq_acc, GT, ST, w, width);
    __syncthreads();
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = w.row(e), j = w.column(nt, e);
        const bool causal = j <= i;
        A[i * ld + j] = causal ? a[nt][e] : 0.f;
        const float pij = causal ? p[nt][e] + gz[i] : 0.f;
        P[i * ld + j] = pij;
        PT[j * ld + i] = pij;
      }
  }
  if (dv) tile_mma<kExact>(dv_acc, KT, dS, w, width);
  __syncthreads();
  // Step 2: dQ̃ = G·[S | z]ᵀ + P·K̃ and dV = K̃·dS + Aᵀ·G, with K̃ natural over K̃ᵀ and G natural over dS.
  float *K = slot(1), *G = slot(5);
  if (dq) cv.load(K, false, phi_k_gated);
  if (dv) cv.load(G, false, g_v);
  __syncthreads();
  if (dq) causal_tile_mma<kExact, Causal::kLower>(dq_acc, PT, K, w, finite);
  if (dv) causal_tile_mma<kExact, Causal::kUpper>(dv_acc, A, G, w, finite);
  // The epilogues read the results back from shared memory in the fill layout (thread (tx, ty): rows 4ty…4ty+3,
  // columns tx + 16c), so that a warp's global accesses are two 64-byte runs rather than eight 32-byte ones.
  // They load every old value (and input) of the thread's elements before they store any: interleaved, each
  // load would wait for the store before it (the compiler cannot tell that they never alias).
  __syncthreads();
  float *dQ = slot(4), *dV = slot(5);  // over Pᵀ and G
  if (dq) store_tile(dQ, dq_acc, w);
  if (dv) store_tile(dV, dv_acc, w);
  __syncthreads();
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  auto in_chunk = [&](int r, int c) { return 4 * ty + r < cv.tn && tx + 16 * c < dh; };
  // old = the gradient's elements (zeros without it or when writing), input = the input's, at the thread's
  // (row, column)s.
  auto load_old_and_input = [&](float (&old)[4][4], float (&input)[4][4], const float* gradient, const float* x) {
    if (!accumulate) gradient = nullptr;
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool in = in_chunk(r, c);
        const long at = cv.at(4 * ty + r, tx + 16 * c);
        old[r][c] = in && gradient ? gradient[at] : 0.f;
        input[r][c] = in && x ? x[at] : 0.f;
      }
  };
  if (dq) {
    float dq_old[4][4], q_in[4][4];
    load_old_and_input(dq_old, q_in, dq, q);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = 4 * ty + r;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int e = tx + 16 * c;
        if (in_chunk(r, c))
          dq[cv.at(i, e)] = dq_old[r][c] + (dQ[i * ld + e] + gz[i] * z[e]) * feature_grad(q_in[r][c], cv.scale);
      }
    }
  }
  if (dv) {
    float dv_old[4][4], unused[4][4];
    load_old_and_input(dv_old, unused, dv, nullptr);
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (in_chunk(r, c)) dv[cv.at(4 * ty + r, tx + 16 * c)] = dv_old[r][c] + dV[(4 * ty + r) * ld + tx + 16 * c];
  }
  if (!dk && !dmu) return;
  __syncthreads();
  // Step 3: dK̃ = (V, 1)·[dS | dz]ᵀ + Pᵀ·Q̃, with dS transposed over A and Q̃ natural over K̃; Vᵀ and P stay.
  float *dST = slot(0), *Q = slot(1);
  cv.load_state(dST, z, true, after);
  cv.load(Q, false, phi_q);
  __syncthreads();
  {
    float acc[4][4] = {};
    tile_mma<kExact>(acc, VT, dST, w, width);
    causal_tile_mma<kExact, Causal::kUpper>(acc, P, Q, w, finite);
    store_tile(slot(4), acc, w);  // over the dq epilogue's tile, which every thread has read
  }
  __syncthreads();
  const float* dPhi = slot(4);
  float dk_old[4][4], k_in[4][4];
  load_old_and_input(dk_old, k_in, dk, k);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int j = 4 * ty + r;
    float dgate = 0.f;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int e = tx + 16 * c;
      if (!in_chunk(r, c)) continue;
      const float dphi = dPhi[j * ld + e] + z[e];
      if (dk) dk[cv.at(j, e)] = dk_old[r][c] + gate[j] * dphi * feature_grad(k_in[r][c], cv.scale);
      dgate += feature(k_in[r][c], cv.scale) * dphi;
    }
    dgate = half_warp_sum(dgate);
    if (dmu && tx == 0 && j < cv.tn) {
      float* at = dmu + cv.row(j) * H + cv.h;
      *at = (accumulate ? *at : 0.f) + dgate;
    }
  }
}

constexpr size_t kNumeratorSmem = sizeof(float) * (5 * kTile * kMmaLd + 2 * kTile);
constexpr size_t kGradientSmem = sizeof(float) * (kGradientSlots * kTile * kMmaLd + 4 * kTile);

template <class Kernel> void prepare_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    MUSE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

void validate(int B, int N, int D, int H) {
  if (B < 0 || N < 0 || H < 1 || D < 1 || D % H != 0)
    throw std::invalid_argument("linear_attn (cuda): D (" + std::to_string(D) + ") must be a positive multiple of H (" +
                                std::to_string(H) + ")");
  if (D / H > kMaxHeadDim)
    throw std::invalid_argument("linear_attn (cuda): d_h = " + std::to_string(D / H) + " exceeds the supported maximum " +
                                std::to_string(kMaxHeadDim));
}

// Rows per thread: the smallest power of two ≥ d_h/4.
int rows_per_thread(int dh) {
  int ra = 1;
  while (ra * kGroups < dh) ra *= 2;
  return ra;
}

int segments(int N) { return (N + kSegment - 1) / kSegment; }

// The split of a scan over B·H sequences of N tokens: enough segments for about kTargetBlocks blocks, each a
// whole number of 64-token segments. Without states (no workspace) the scan stays one block per (b, h).
Segments plan_segments(int B, int N, int H, bool have_states) {
  Segments sg;
  sg.fine = segments(N);
  sg.len = N;
  const int wanted = (kTargetBlocks + B * H - 1) / (B * H);
  if (!have_states || sg.fine <= 1 || wanted <= 1) return sg;
  sg.per = (sg.fine + std::min(wanted, sg.fine) - 1) / std::min(wanted, sg.fine);
  sg.count = (sg.fine + sg.per - 1) / sg.per;
  sg.len = sg.per * kSegment;
  if (sg.count == 1) sg = Segments{1, N, 1, sg.fine};
  return sg;
}

// Floats of [B, H, P, d_h, C] segment states, 0 when the sequence is one segment.
size_t state_floats(int B, int N, int D, int H) {
  const int P = segments(N);
  if (P <= 1) return 0;
  const Layout l = layout(D, H);
  return size_t(B) * H * P * l.dh * l.C;
}

// The dζ part of the backward workspace, rounded up so the states after it stay 256-byte aligned.
size_t dzeta_floats(int B, int N, int H) { return (size_t(B) * N * H + 63) / 64 * 64; }

// Each segment's starting state (kind 0: [S | z] from the tokens before it) or adjoint (kind 1: [dS | dz]
// from the tokens after it), into states.
void segment_states(float* states, int kind, const float* q, const float* k, const float* v, const float* mu,
                    const float* d_o, const float* zeta, const float* dzeta, int B, int N, int D, int H,
                    cudaStream_t stream) {
  const Layout l = layout(D, H);
  const int P = segments(N);
  const int ld = (l.dh + kTile - 1) / kTile * kTile + kMmaPad;
  const size_t smem = sizeof(float) * (size_t(2) * kSegment * ld + 2 * kSegment);
  with_exactness(fp32_products(), [&](auto exact) {
    auto kernel = segment_sums_kernel<decltype(exact)::value>;
    prepare_smem(kernel, smem);
    kernel<<<dim3(H, B, P), kTileThreads, smem, stream>>>(states, kind, q, k, v, mu, d_o, zeta, dzeta, N, D, H);
  });
  MUSE_CUDA_CHECK(cudaGetLastError());
  const long per_bh = long(l.dh) * l.C, total = long(B) * H * per_bh;
  segment_scan_kernel<<<int((total + 255) / 256), 256, 0, stream>>>(states, per_bh, P, total, kind == 1);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

template <int RA>
void forward_impl(float* o, float* zeta, float* final_S, float* final_z, const float* q, const float* k,
                  const float* v, const float* mu, int B, int N, int D, int H, float* workspace, cudaStream_t stream) {
  const Layout l = layout(D, H);
  const Segments sg = plan_segments(B, N, H, workspace != nullptr);
  if (sg.count > 1) segment_states(workspace, 0, q, k, v, mu, nullptr, nullptr, nullptr, B, N, D, H, stream);
  const size_t smem = forward_smem_bytes(l);
  prepare_smem(linear_attn_forward_kernel<RA>, smem);
  linear_attn_forward_kernel<RA><<<dim3(H, B, sg.count), dim3(l.CX, kGroups), smem, stream>>>(
      o, zeta, final_S, final_z, q, k, v, mu, sg.count > 1 ? workspace : nullptr, sg, N, D, H);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

template <int RA>
void backward_impl(float* dq, float* dk, float* dv, float* dmu, const float* d_o, const float* zeta, const float* q,
                   const float* k, const float* v, const float* mu, int B, int N, int D, int H, float* workspace,
                   cudaStream_t stream) {
  const Layout l = layout(D, H);
  const Segments sg = plan_segments(B, N, H, workspace != nullptr);
  float* states = sg.count > 1 ? workspace + dzeta_floats(B, N, H) : nullptr;
  const dim3 grid(H, B, sg.count), block(l.CX, kGroups);
  const bool reverse = dk || dv || dmu;
  {
    if (states) segment_states(states, 0, q, k, v, mu, nullptr, nullptr, nullptr, B, N, D, H, stream);
    const size_t smem = replay_smem_bytes(l);
    prepare_smem(linear_attn_backward_replay_kernel<RA>, smem);
    linear_attn_backward_replay_kernel<RA><<<grid, block, smem, stream>>>(dq, reverse ? workspace : nullptr, d_o,
                                                                          zeta, q, k, v, mu, states, sg, N, D, H);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
  if (reverse) {
    if (states) segment_states(states, 1, q, k, v, mu, d_o, zeta, workspace, B, N, D, H, stream);
    const size_t smem = reverse_smem_bytes(l);
    prepare_smem(linear_attn_backward_reverse_kernel<RA>, smem);
    linear_attn_backward_reverse_kernel<RA><<<grid, block, smem, stream>>>(dk, dv, dmu, d_o, zeta, workspace, q, k,
                                                                           v, mu, states, sg, N, D, H);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
}

// The chunked form (d_h ≤ 64, workspace given).
void chunked_forward(float* o, float* zeta, float* final_S, float* final_z, const float* q, const float* k,
                     const float* v, const float* mu, int B, int N, int D, int H, float* workspace,
                     cudaStream_t stream) {
  const int P = segments(N);
  const float* states = P > 1 ? workspace : nullptr;
  if (states) segment_states(workspace, 0, q, k, v, mu, nullptr, nullptr, nullptr, B, N, D, H, stream);
  with_exactness(fp32_products(), [&](auto exact) {
    auto kernel = chunk_numerator_kernel<decltype(exact)::value>;
    prepare_smem(kernel, kNumeratorSmem);
    kernel<<<dim3(P, H, B), kTileThreads, kNumeratorSmem, stream>>>(o, zeta, final_S, final_z, q, k, v, mu, states, N,
                                                                    D, H);
  });
  MUSE_CUDA_CHECK(cudaGetLastError());
}

// Backward workspace: dζ, then the kind-0 states (before each chunk), then the kind-1 states (after).
void chunked_backward(float* dq, float* dk, float* dv, float* dmu, const float* d_o, const float* o,
                      const float* zeta, const float* q, const float* k, const float* v, const float* mu, int B, int N,
                      int D, int H, float* workspace, const float* forward_workspace, bool accumulate,
                      cudaStream_t stream) {
  const int P = segments(N);
  float* dzeta = workspace;
  float* own_before = P > 1 ? workspace + dzeta_floats(B, N, H) : nullptr;
  float* after = P > 1 ? own_before + state_floats(B, N, D, H) : nullptr;
  // The states before each chunk: the forward's (chunked_forward keeps them at the start of its workspace),
  // or summed again.
  const bool kept = P > 1 && forward_workspace;
  if (P > 1 && !kept) segment_states(own_before, 0, q, k, v, mu, nullptr, nullptr, nullptr, B, N, D, H, stream);
  const float* before = kept ? forward_workspace : own_before;
  const dim3 grid(P, H, B);
  const long triples = (long)B * N * H;  // (b, i, h), a warp each
  constexpr int kDzetaThreads = 256;
  dzeta_kernel<<<unsigned((triples * kWarp + kDzetaThreads - 1) / kDzetaThreads), kDzetaThreads, 0, stream>>>(
      dzeta, d_o, o, zeta, N, D, H, triples);
  MUSE_CUDA_CHECK(cudaGetLastError());
  if (after) segment_states(after, 1, q, k, v, mu, d_o, zeta, dzeta, B, N, D, H, stream);
  with_exactness(fp32_products(), [&](auto exact) {
    auto kernel = chunk_gradient_kernel<decltype(exact)::value>;
    prepare_smem(kernel, kGradientSmem);
    kernel<<<grid, kTileThreads, kGradientSmem, stream>>>(dq, dk, dv, dmu, d_o, zeta, dzeta, q, k, v, mu, before,
                                                          after, accumulate, N, D, H);
  });
  MUSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

size_t linear_attn_forward_workspace_floats(int B, int N, int D, int H) {
  if (B <= 0 || N <= 0 || H <= 0 || D <= 0) return 0;
  return state_floats(B, N, D, H);
}

void linear_attn_forward(float* o, float* zeta, float* final_S, float* final_z, const float* q, const float* k,
                         const float* v, const float* mu, int B, int N, int D, int H, cudaStream_t stream) {
  linear_attn_forward(o, zeta, final_S, final_z, q, k, v, mu, B, N, D, H, nullptr, stream);
}

void linear_attn_forward(float* o, float* zeta, float* final_S, float* final_z, const float* q, const float* k,
                         const float* v, const float* mu, int B, int N, int D, int H, float* workspace,
                         cudaStream_t stream) {
  validate(B, N, D, H);
  if (B == 0) return;
  if (N == 0) {
    // The CPU op still writes the (zero) final state.
    const size_t dh = D / H;
    if (final_S) MUSE_CUDA_CHECK(cudaMemsetAsync(final_S, 0, sizeof(float) * B * H * dh * dh, stream));
    if (final_z) MUSE_CUDA_CHECK(cudaMemsetAsync(final_z, 0, sizeof(float) * B * H * dh, stream));
    return;
  }
  if (workspace && D / H <= kChunkMaxHeadDim) {
    chunked_forward(o, zeta, final_S, final_z, q, k, v, mu, B, N, D, H, workspace, stream);
    return;
  }
  switch (rows_per_thread(D / H)) {
    case 1: forward_impl<1>(o, zeta, final_S, final_z, q, k, v, mu, B, N, D, H, workspace, stream); break;
    case 2: forward_impl<2>(o, zeta, final_S, final_z, q, k, v, mu, B, N, D, H, workspace, stream); break;
    case 4: forward_impl<4>(o, zeta, final_S, final_z, q, k, v, mu, B, N, D, H, workspace, stream); break;
    case 8: forward_impl<8>(o, zeta, final_S, final_z, q, k, v, mu, B, N, D, H, workspace, stream); break;
    case 16: forward_impl<16>(o, zeta, final_S, final_z, q, k, v, mu, B, N, D, H, workspace, stream); break;
    default: forward_impl<32>(o, zeta, final_S, final_z, q, k, v, mu, B, N, D, H, workspace, stream); break;
  }
}

size_t linear_attn_backward_workspace_floats(int B, int N, int D, int H) {
  if (B <= 0 || N <= 0 || H <= 0 || D <= 0) return 0;
  // The chunked form keeps the states before and after each chunk at once; the scans reuse one set.
  const size_t state_sets = D / H <= kChunkMaxHeadDim ? 2 : 1;
  return dzeta_floats(B, N, H) + state_sets * state_floats(B, N, D, H);
}

void linear_attn_backward(float* dq, float* dk, float* dv, float* dmu, const float* d_o, const float* o,
                          const float* zeta, const float* q, const float* k, const float* v, const float* mu, int B,
                          int N, int D, int H, float* workspace, const float* forward_workspace, cudaStream_t stream,
                          bool accumulate) {
  validate(B, N, D, H);
  if (!mu) dmu = nullptr;
  if (!dq && !dk && !dv && !dmu) return;
  if (B == 0 || N == 0) return;
  if ((dk || dv || dmu) && !workspace)
    throw std::invalid_argument("linear_attn_backward (cuda): dk/dv/dmu need a workspace");
  if (workspace && D / H <= kChunkMaxHeadDim) {
    chunked_backward(dq, dk, dv, dmu, d_o, o, zeta, q, k, v, mu, B, N, D, H, workspace, forward_workspace, accumulate,
                     stream);
    return;
  }
  if (!accumulate) {  // the sequential form adds: start its gradients from zero
    const size_t rows = size_t(B) * N;
    for (float* g : {dq, dk, dv})
      if (g) MUSE_CUDA_CHECK(cudaMemsetAsync(g, 0, rows * D * sizeof(float), stream));
    if (dmu) MUSE_CUDA_CHECK(cudaMemsetAsync(dmu, 0, rows * H * sizeof(float), stream));
  }
  switch (rows_per_thread(D / H)) {
    case 1: backward_impl<1>(dq, dk, dv, dmu, d_o, zeta, q, k, v, mu, B, N, D, H, workspace, stream); break;
    case 2: backward_impl<2>(dq, dk, dv, dmu, d_o, zeta, q, k, v, mu, B, N, D, H, workspace, stream); break;
    case 4: backward_impl<4>(dq, dk, dv, dmu, d_o, zeta, q, k, v, mu, B, N, D, H, workspace, stream); break;
    case 8: backward_impl<8>(dq, dk, dv, dmu, d_o, zeta, q, k, v, mu, B, N, D, H, workspace, stream); break;
    case 16: backward_impl<16>(dq, dk, dv, dmu, d_o, zeta, q, k, v, mu, B, N, D, H, workspace, stream); break;
    default: backward_impl<32>(dq, dk, dv, dmu, d_o, zeta, q, k, v, mu, B, N, D, H, workspace, stream); break;
  }
}

}  // namespace muse::cuda
