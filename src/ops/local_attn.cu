// Windowed attention engine (local_attn: hyperbolic score; causal_attn: dot-product score) and the
// local_attn launchers. Layout and design: docs/kernels/attention.md.
//
// Two families of kernels:
// * Tiled (window ≤ 65 and d_h ≤ 64: every preset). 64-token tiles; a query's window lies in its own tile
//   and the one before. The products (forward q·k, P·V; backward q·k, dO·v, Pᵀ·dO, Xᵀ·Q, X·K) are 3xTF32
//   tensor-core products on shared-memory operands (fp32-accurate); scores, distances and softmax
//   statistics are fp32. The forward is one block per query tile, the backward one block per key tile
//   that scores each pair once (dq's part from the previous key tile goes through a workspace "carry").
// * Streaming (wider windows or heads, causal_attn beyond N = 65, a backward without workspace): 256
//   threads = 8 warps per block own one (b, h) and a tile of queries (forward, backward dq pass) or keys
//   (backward dk/dv pass); the other side is streamed through shared memory in chunks of 32 tokens, lane l
//   owns pair (row, chunk start + l), and the warp accumulates its row's d_h-vector in shared memory, so
//   d_h is a runtime value (≤ 256).
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_check.cuh"
#include "common/mma_tf32.cuh"
#include "common/row_grid.cuh"
#include "ops/linear.cuh"
#include "ops/local_attn.cuh"
#include "ops/poincare.cuh"
#include "ops/poincare.h"

namespace muse::cuda {

namespace detail {

namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarp * kWarps;
constexpr int kChunk = 32;                 // streamed tokens per shared-memory chunk (one per lane)
constexpr int kFwdQueriesPerWarp = 8;      // forward tile: 64 queries
constexpr int kBwdQueriesPerWarp = 4;      // backward dq tile: 32 queries
constexpr int kBwdKeysPerWarp = 4;         // backward dk/dv tile: 32 keys
constexpr int kFwdTile = kWarps * kFwdQueriesPerWarp;
constexpr int kBwdQueryTile = kWarps * kBwdQueriesPerWarp;
constexpr int kBwdKeyTile = kWarps * kBwdKeysPerWarp;
constexpr int kMaxHeadDim = 256;
constexpr int kReduceThreads = 256;

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// common/math.h's sigmoid and softplus, same formulas.
__device__ __forceinline__ float device_sigmoid(float x) {
  if (x >= 0.f) return 1.f / (1.f + expf(-x));
  const float e = expf(x);
  return e / (1.f + e);
}
__device__ __forceinline__ float device_softplus(float x) { return x > 0.f ? x + log1pf(expf(-x)) : log1pf(expf(x)); }

// Sizes and index maps of one launch.
struct Geometry {
  int N, H, D, dh, window;
  bool sliding, lse_bnh;

  // First key of query i's window (the last is i).
  __device__ int window_start(int i) const {
    if (sliding) return i - window + 1 > 0 ? i - window + 1 : 0;
    return i - i % window;
  }
  // Last query whose window contains key j (the first is j).
  __device__ int last_query(int j) const {
    const long long end = sliding ? (long long)j + window - 1 : (long long)(j / window) * window + window - 1;
    return end < N - 1 ? (int)end : N - 1;
  }
  __device__ long row(int b, int t, int h) const { return ((long)b * N + t) * D + (long)h * dh; }
  __device__ long lse_index(int b, int i, int h) const {
    return lse_bnh ? ((long)b * N + i) * H + h : ((long)b * H + h) * N + i;
  }
};

// What one pair contributes to the backward.
struct PairGrad {
  float p;        // softmax probability
  float dscore;   // ∂L/∂s_ij (the key-gate bias gradient)
  float cross;    // coefficient of k_j in dq_i and of q_i in dk_j
  float self_q;   // coefficient of q_i in dq_i
  float self_k;   // coefficient of k_j in dk_j
  float dbeta;    // subtracted from dβ_h
  float dc;       // subtracted from dc
};

// s_ij = −softplus(β_h)·ρ_ij/√c − m_h·(i − j) + log μ_j, ρ by the log-domain kernel of ops/poincare.h.
struct HyperbolicScore {
  using Token = TangentNorm<float>;
  static constexpr bool kNeedsNorm = true;
  float sqrt_c, c, temperature, dtemperature, slope;
  float inv_sqrt_c, inv_two_c;  // 1/√c, 1/(2c): products instead of divisions in the per-pair code
  const float* log_mu;  // element (b, 0, h), stride H; null: no gate
  int H;

  __device__ Token token(float squared_norm) const { return tangent_norm_from_squared(squared_norm, sqrt_c); }

  __device__ float score_from_rho(int i, int j, float rho) const {
    float s = -temperature * rho * inv_sqrt_c - slope * float(i - j);
    if (log_mu) s += log_mu[(long)j * H];
    return s;
  }

  __device__ float score(int i, int j, const Token& qt, const Token& kt, float dot) const {
    return score_from_rho(i, j, scaled_distance<float, PairMath>(qt, kt, dot));
  }

  // Mirrors the pair loop of local_attn_backward in ops/local_attn.cpp.
  __device__ PairGrad pair_grad(int i, int j, const Token& qt, const Token& kt, float dot_qk, float dot_gv,
                                float lse, float go) const {
    ScaledDistanceGrad<float> grad;
    const float rho = scaled_distance<float, PairMath>(qt, kt, dot_qk, &grad);
    PairGrad r;
    r.p = PairMath::exp(score_from_rho(i, j, rho) - lse);
    r.dscore = r.p * (dot_gv - go);
    r.dbeta = r.dscore * dtemperature * rho * inv_sqrt_c;
    r.dc = r.dscore * temperature * (grad.sqrt_c - rho * inv_sqrt_c) * inv_two_c;
    const float g = -r.dscore * temperature * inv_sqrt_c;
    r.cross = g * grad.dot;
    r.self_q = g * PairMath::div(grad.norm_q, qt.norm);
    r.self_k = g * PairMath::div(grad.norm_k, kt.norm);
    return r;
  }
};

struct HyperbolicParams {
  using Score = HyperbolicScore;
  static constexpr bool kHasParamGrads = true;
  float c;
  const float* c_device;  // when set, c is read here (the model's curvature, computed on the device)
  const float* beta;
  const float* log_mu;
  bool alibi;
  int N, H;

  __device__ Score at(int b, int h) const {
    Score s;
    s.c = c_device ? *c_device : c;
    s.sqrt_c = sqrtf(s.c);
    s.inv_sqrt_c = 1.f / s.sqrt_c;
    s.inv_two_c = 0.5f / s.c;
    s.temperature = device_softplus(beta[h]);
    s.dtemperature = device_sigmoid(beta[h]);
    s.slope = alibi ? float(exp2(-8.0 * (h + 1) / H)) : 0.f;
    s.log_mu = log_mu ? log_mu + (long)b * N * H + h : nullptr;
    s.H = H;
    return s;
  }
};

// s_ij = q_i·k_j/√d_h − m_h·(i − j) (ops/causal_attn.cpp).
struct DotScore {
  struct Token {};
  static constexpr bool kNeedsNorm = false;
  float scale, slope;

  __device__ Token token(float) const { return Token{}; }
  __device__ float score(int i, int j, const Token&, const Token&, float dot) const {
    return dot * scale - slope * float(i - j);
  }
  __device__ PairGrad pair_grad(int i, int j, const Token& qt, const Token& kt, float dot_qk, float dot_gv,
                                float lse, float go) const {
    PairGrad r;
    r.p = PairMath::exp(score(i, j, qt, kt, dot_qk) - lse);
    r.dscore = r.p * (dot_gv - go);
    r.cross = r.p * (dot_gv - go) * scale;
    r.self_q = r.self_k = r.dbeta = r.dc = 0.f;
    return r;
  }
};

struct DotParams {
  using Score = DotScore;
  static constexpr bool kHasParamGrads = false;
  float scale;
  bool alibi;
  int H;

  __device__ Score at(int, int h) const {
    Score s;
    s.scale = scale;
    s.slope = alibi ? float(exp2(-8.0 * (h + 1) / H)) : 0.f;
    return s;
  }
};

// Shared-memory carve-up: consecutive float arrays, then the per-token score data (4-byte aligned).
struct SmemCursor {
  float* at;
  __device__ float* take(long n) {
    float* p = at;
    at += n;
    return p;
  }
};

// Odd row stride for arrays read with lane = row (bank-conflict free for any d_h).
__host__ __device__ inline int odd_stride(int dh) { return dh | 1; }

template <class Token> size_t forward_smem_bytes(int dh) {
  const int ks = odd_stride(dh);
  const size_t floats = size_t(2) * kFwdTile * dh + size_t(kChunk) * ks + size_t(kChunk) * dh + 2 * kFwdTile +
                        kWarps * kChunk;
  return floats * sizeof(float) + (kFwdTile + kChunk) * sizeof(Token);
}

template <class Token> size_t backward_query_smem_bytes(int dh) {
  const int ks = odd_stride(dh);
  const size_t floats = size_t(3) * kBwdQueryTile * dh + size_t(2) * kChunk * ks + kWarps * kChunk +
                        3 * kBwdQueryTile + 2 * kWarps;
  return floats * sizeof(float) + (kBwdQueryTile + kChunk) * sizeof(Token);
}

template <class Token> size_t backward_key_smem_bytes(int dh) {
  const int ks = odd_stride(dh);
  const size_t floats = size_t(4) * kBwdKeyTile * dh + size_t(2) * kChunk * ks + 2 * kWarps * kChunk + 2 * kChunk +
                        2 * kBwdKeyTile;
  return floats * sizeof(float) + (kBwdKeyTile + kChunk) * sizeof(Token);
}

// ---------------------------------------------------------------------------------------------------
// Forward: block (query tile, h, b). Warp w owns queries w, w + 8, … of the tile; their running max,
// sum and output accumulator live in shared memory.
template <class Params>
__global__ void __launch_bounds__(kThreads)
    attn_forward_kernel(float* o, float* lse, const float* q, const float* k, const float* v, Geometry geo,
                        Params params) {
  using Score = typename Params::Score;
  using Token = typename Score::Token;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kFwdTile;
  const int dh = geo.dh, ks = odd_stride(dh);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int i_last = min(i0 + kFwdTile, geo.N) - 1;
  const Score pol = params.at(b, h);

  extern __shared__ float smem[];
  SmemCursor cur{smem};
  float* Qs = cur.take((long)kFwdTile * dh);   // queries of the tile
  float* Os = cur.take((long)kFwdTile * dh);   // unnormalised output accumulators
  float* Ks = cur.take((long)kChunk * ks);     // key chunk (odd stride: lane = key)
  float* Vs = cur.take((long)kChunk * dh);     // value chunk
  float* Ms = cur.take(kFwdTile);              // running max
  float* Ls = cur.take(kFwdTile);              // running Σ e^{s − max}
  float* Ps = cur.take(kWarps * kChunk);       // per-warp probabilities of the current chunk
  Token* Qt = reinterpret_cast<Token*>(cur.at);
  Token* Kt = Qt + kFwdTile;

  for (int t = warp; t < kFwdTile; t += kWarps) {
    const int i = i0 + t;
    if (i > i_last) break;
    const float* qi = q + geo.row(b, i, h);
    float sq = 0.f;
    for (int e = lane; e < dh; e += kWarp) {
      const float x = qi[e];
      Qs[t * dh + e] = x;
      Os[t * dh + e] = 0.f;
      sq += x * x;
    }
    if (Score::kNeedsNorm) sq = warp_sum(sq);
    if (lane == 0) {
      Qt[t] = pol.token(sq);
      Ms[t] = -INFINITY;
      Ls[t] = 0.f;
    }
  }

  const int key_lo = geo.window_start(i0), key_hi = i_last;
  for (int cs = key_lo; cs <= key_hi; cs += kChunk) {
    __syncthreads();  // the previous chunk is no longer read
    for (int t = warp; t < kChunk; t += kWarps) {
      const int j = cs + t;
      if (j > key_hi) break;
      const float* kj = k + geo.row(b, j, h);
      const float* vj = v + geo.row(b, j, h);
      float sq = 0.f;
      for (int e = lane; e < dh; e += kWarp) {
        const float x = kj[e];
        Ks[t * ks + e] = x;
        Vs[t * dh + e] = vj[e];
        sq += x * x;
      }
      if (Score::kNeedsNorm) sq = warp_sum(sq);
      if (lane == 0) Kt[t] = pol.token(sq);
    }
    __syncthreads();

    for (int qq = 0; qq < kFwdQueriesPerWarp; ++qq) {
      const int t = warp + kWarps * qq, i = i0 + t;
      if (i > i_last) break;
      const int lo = max(geo.window_start(i), cs), hi = min(i, cs + kChunk - 1);
      if (lo > hi) continue;  // warp-uniform
      const int j = cs + lane;
      const bool valid = j >= lo && j <= hi;
      float s = -INFINITY;
      if (valid) {
        const float* qrow = Qs + t * dh;
        const float* krow = Ks + lane * ks;
        float dot = 0.f;
        for (int e = 0; e < dh; ++e) dot += qrow[e] * krow[e];
        s = pol.score(i, j, Qt[t], Kt[lane], dot);
      }
      const float m_old = Ms[t];
      const float m_new = fmaxf(m_old, warp_max(s));
      const float alpha = expf(m_old - m_new);  // 0 on the first chunk (m_old = −∞)
      const float p = valid ? PairMath::exp(s - m_new) : 0.f;
      const float l_new = Ls[t] * alpha + warp_sum(p);
      Ps[warp * kChunk + lane] = p;
      __syncwarp();
      for (int e = lane; e < dh; e += kWarp) {
        float acc = Os[t * dh + e] * alpha;
        for (int jj = lo - cs; jj <= hi - cs; ++jj) acc += Ps[warp * kChunk + jj] * Vs[jj * dh + e];
        Os[t * dh + e] = acc;
      }
      __syncwarp();  // Ps and Ms[t] read by every lane before they change
      if (lane == 0) {
        Ms[t] = m_new;
        Ls[t] = l_new;
      }
    }
  }

  __syncwarp();
  for (int qq = 0; qq < kFwdQueriesPerWarp; ++qq) {
    const int t = warp + kWarps * qq, i = i0 + t;
    if (i > i_last) break;
    float* oi = o + geo.row(b, i, h);
    const float sum = Ls[t];
    for (int e = lane; e < dh; e += kWarp) oi[e] = Os[t * dh + e] / sum;
    if (lane == 0) lse[geo.lse_index(b, i, h)] = Ms[t] + logf(sum);
  }
}

// ---------------------------------------------------------------------------------------------------
// Tiled kernels (window ≤ 65 and d_h ≤ 64: every preset). 64-token tiles; a query's window lies in its
// own tile and the one before. Their products are 3xTF32 tensor-core products (common/mma_tf32.cuh) on
// shared-memory operands: warp w of 8 owns the 8-row blocks w % 4 and 7 − w % 4 of a 64-row product (the
// windows make a tile's pairs a triangle; a block near each end gives every warp a similar share) and
// half w / 4 of its columns.
constexpr int kTiledQueries = 64, kTiledKeys = 128, kTiledMaxHeadDim = 64, kTiledThreads = 256;
constexpr int kTiledMaxWindow = kTiledKeys - kTiledQueries + 1;
static_assert(kTiledThreads == kWarps * kWarp);

// The two 8-row blocks of a 64-row operand that warp w's fragment rows g and g + 8 stand for.
__device__ __forceinline__ int low_row(int warp, int g) { return 8 * (warp % 4) + g; }
__device__ __forceinline__ int high_row(int warp, int g) { return 8 * (7 - warp % 4) + g; }

// Where this thread's accumulator element c of column block n (an m16n8 C fragment: c0, c1 on row g, c2, c3
// on row g + 8, columns 2t, 2t + 1) lies in a 64 × 64 product split as above.
struct AccumulatorMap {
  int row_lo, row_hi, col0, t;
  __device__ AccumulatorMap(int warp, int lane)
      : row_lo(low_row(warp, lane / 4)), row_hi(high_row(warp, lane / 4)), col0(32 * (warp / 4)), t(lane % 4) {}
  __device__ int row(int c) const { return c < 2 ? row_lo : row_hi; }
  __device__ int col(int n, int c) const { return col0 + 8 * n + 2 * t + c % 2; }
};

// An accumulator pair (elements c, c + 1: columns e, e + 1 of one row, e even) to or from a row of global
// memory: one 8-byte access when both columns are inside d_h and the row is 8-byte aligned (d_h even), for
// whole 32-byte runs per row; element by element otherwise. Outside d_h a load gives 0.
__device__ __forceinline__ float2 load_pair(const float* row, int e, int dh) {
  if (dh % 2 == 0) return e < dh ? *reinterpret_cast<const float2*>(row + e) : make_float2(0.f, 0.f);
  return make_float2(e < dh ? row[e] : 0.f, e + 1 < dh ? row[e + 1] : 0.f);
}
__device__ __forceinline__ void store_pair(float* row, int e, int dh, float2 value) {
  if (dh % 2 == 0) {
    if (e < dh) *reinterpret_cast<float2*>(row + e) = value;
    return;
  }
  if (e < dh) row[e] = value.x;
  if (e + 1 < dh) row[e + 1] = value.y;
}

// Σ_e row[e]² over a staged row of kTiledMaxHeadDim floats (zero past d_h), reduced across the warp.
__device__ __forceinline__ float row_squared_norm(const float* row, int lane) {
  float sq = 0.f;
#pragma unroll
  for (int c = 0; c < kTiledMaxHeadDim / kWarp; ++c) sq += row[lane + 32 * c] * row[lane + 32 * c];
  return warp_sum(sq);
}

// dst[r·stride + e] = row t0 + r, column e of head h of a [B, N, D] tensor, for r < kRows and e < 64 (zero
// for r ≥ valid or e ≥ d_h), all of a thread's loads issued before its stores. When rows start on 16 bytes
// (d_h and D multiples of 4, src aligned) the loads are float4: a quarter of the instructions of a
// per-float copy, whose index arithmetic was most of its cost. Returns whether every value this thread
// copied is finite (see all_finite below).
template <int kRows>
__device__ __forceinline__ bool stage_tile(float* dst, int stride, const float* src, const Geometry& geo, int b, int h,
                                           int t0, int valid) {
  bool finite = true;
  constexpr int kVectorsPerRow = kTiledMaxHeadDim / 4, kPerThread = kRows * kVectorsPerRow / kTiledThreads;
  static_assert(kRows * kVectorsPerRow % kTiledThreads == 0, "every thread copies the same number of vectors");
  if (geo.dh % 4 == 0 && geo.D % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    float4 x[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int slot = threadIdx.x + u * kTiledThreads, r = slot / kVectorsPerRow, e = 4 * (slot % kVectorsPerRow);
      x[u] = r < valid && e < geo.dh ? *reinterpret_cast<const float4*>(src + geo.row(b, t0 + r, h) + e)
                                     : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int slot = threadIdx.x + u * kTiledThreads, r = slot / kVectorsPerRow, e = 4 * (slot % kVectorsPerRow);
      *reinterpret_cast<float4*>(dst + r * stride + e) = x[u];
      finite = finite && isfinite(x[u].x) && isfinite(x[u].y) && isfinite(x[u].z) && isfinite(x[u].w);
    }
    return finite;
  }
  for (int part = 0; part < 4; ++part) {  // a quarter of the rows at a time, kPerThread loads in flight
    float x[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int idx = threadIdx.x + u * kTiledThreads, r = part * (kRows / 4) + idx / kTiledMaxHeadDim,
                e = idx % kTiledMaxHeadDim;
      x[u] = r < valid && e < geo.dh ? src[geo.row(b, t0 + r, h) + e] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int idx = threadIdx.x + u * kTiledThreads, r = part * (kRows / 4) + idx / kTiledMaxHeadDim,
                e = idx % kTiledMaxHeadDim;
      dst[r * stride + e] = x[u];
      finite = finite && isfinite(x[u]);
    }
  }
  return finite;
}

// A product over a tile's pairs on the tensor cores multiplies the masked pairs' operands by 0, which
// SPEC §2.5 forbids where a value could be non-finite (0·∞ would leak a future value). Kernels check their
// staged operands with all_finite(the staging's results) — every thread of the block calls it — and take
// the tensor cores only when it holds, an element-wise loop that skips masked pairs otherwise.
__device__ __forceinline__ bool all_finite(bool mine) { return __syncthreads_and(mine) != 0; }

// The union of the windows of queries [first, last] is the contiguous key range [window_start(first),
// last], so a block of pairs (queries [qa, qb], keys [ka, kb]) holds a valid pair iff it meets it.
__device__ __forceinline__ bool pairs_meet_windows(const Geometry& geo, int qa, int qb, int ka, int kb) {
  return qa <= qb && ka <= kb && ka <= qb && kb >= geo.window_start(qa);
}

// Forward: block (64-query tile, h, b) of 8 warps. Every key the tile can see (from its first query's window
// start to its last query: at most 64 + window − 1 ≤ 128) is staged at once, so the softmax needs no online
// rescaling.
//   (s)  S = Q·Kᵀ (64 × 128, summed over e) into SS [query][key]; the fragments' summed index k = t, t + 4
//        is e = 2t, 2t + 1 of each 8-column slice (one 8-byte load per row);
//   (p)  one warp per query (w, w + 8, …), lanes over the keys of its window: the score, the row's max and
//        sum (warp reductions), lse; the row of SS is zeroed and p written over its window;
//   (o)  O = P·V (64 × d_h, summed over the keys): here k = t, t + 4 is key 2t, 2t + 1 (one 8-byte load
//        of P), divided by the row's sum.
// Products skip the 8-wide blocks that hold no pair of a window; masked pairs get p = 0.
constexpr int kFwdRowStride = kTiledMaxHeadDim + 8;  // Qs, Ks [row][e], ≡ 8: 8-byte fragment loads
constexpr int kFwdScoreStride = kTiledKeys + 8;      // SS [query][key], ≡ 8: 8-byte fragment stores and loads
constexpr int kFwdValueStride = kTiledMaxHeadDim + 4;  // Vs [key][e], ≡ 4: B fragment rows 2t, 2t + 1
static_assert(kFwdRowStride % 32 == 8 && kFwdScoreStride % 32 == 8 && kFwdValueStride % 32 == 4);
// SS overlays Qs and Ks, dead once the scores are in registers.
constexpr int kFwdStagedFloats = (kTiledQueries + kTiledKeys) * kFwdRowStride;
static_assert(kTiledQueries * kFwdScoreStride <= kFwdStagedFloats);

template <class Token> size_t tiled_forward_smem_bytes() {
  const size_t floats =
      size_t(kFwdStagedFloats) + size_t(kTiledKeys) * kFwdValueStride  // Qs, Ks (then SS), Vs
      + kTiledQueries + kTiledQueries + kTiledKeys;                     // RowSum, Sq
  return floats * sizeof(float) + (kTiledQueries + kTiledKeys) * sizeof(Token);
}

template <class Params, bool kExact>
__global__ void __launch_bounds__(kTiledThreads, 2)
    attn_forward_tiled_kernel(float* o, float* lse, const float* q, const float* k, const float* v, Geometry geo,
                              Params params) {
  using Score = typename Params::Score;
  using Token = typename Score::Token;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kTiledQueries;
  const int dh = geo.dh, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, t = lane % 4, half = warp / 4;
  const AccumulatorMap place(warp, lane);
  const int row_lo = place.row_lo, row_hi = place.row_hi;
  const int i_last = min(i0 + kTiledQueries, geo.N) - 1, rows = i_last - i0 + 1;
  const int key_lo = geo.window_start(i0), keys = i_last - key_lo + 1;
  const Score pol = params.at(b, h);

  extern __shared__ float smem[];
  SmemCursor cur{smem};
  float* Qs = cur.take(kFwdStagedFloats);                 // [query][e]
  float* Ks = Qs + kTiledQueries * kFwdRowStride;         // [key][e]
  float* SS = Qs;                                         // [query][key], once Qs and Ks are dead
  float* Vs = cur.take(kTiledKeys * kFwdValueStride);     // [key][e]
  float* RowSum = cur.take(kTiledQueries);               // Σ p of each query
  float* Sq = cur.take(kTiledQueries + kTiledKeys);      // squared norms: queries, then keys
  Token* Qt = reinterpret_cast<Token*>(cur.at);
  Token* Kt = Qt + kTiledQueries;

  stage_tile<kTiledQueries>(Qs, kFwdRowStride, q, geo, b, h, i0, rows);
  stage_tile<kTiledKeys>(Ks, kFwdRowStride, k, geo, b, h, key_lo, keys);
  const bool values_finite = all_finite(stage_tile<kTiledKeys>(Vs, kFwdValueStride, v, geo, b, h, key_lo, keys));
  for (int r = warp; r < kTiledQueries + kTiledKeys; r += kWarps) {
    const float* row = r < kTiledQueries ? Qs + r * kFwdRowStride : Ks + (r - kTiledQueries) * kFwdRowStride;
    const float sq = Score::kNeedsNorm ? row_squared_norm(row, lane) : 0.f;
    if (lane == 0) Sq[r] = sq;
  }

  // (s): query rows row_lo, row_hi against the 8-key blocks 2n + half that meet their windows.
  const int q_lo0 = i0 + low_row(warp, 0), q_hi0 = i0 + high_row(warp, 0);
  auto blocks_meet = [&](int qa, int ka) {
    return pairs_meet_windows(geo, qa, min(qa + 7, i_last), ka, min(ka + 7, i_last));
  };
  unsigned live = 0;
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    const int ja = key_lo + 8 * (2 * n + half);
    if (blocks_meet(q_lo0, ja) || blocks_meet(q_hi0, ja)) live |= 1u << n;
  }
  float s_acc[8][4] = {};
  if (live) {
#pragma unroll 1
    for (int kk = 0; kk < kTiledMaxHeadDim / 8; ++kk) {
      if (8 * kk >= dh) break;
      const int e = 8 * kk + 2 * t;
      const Tf32A qa = tf32_a_adjacent(Qs, kFwdRowStride, row_lo, row_hi, e);
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        if (!(live & (1u << n))) continue;
        mma_3xtf32(s_acc[n], qa, tf32_b_adjacent(Ks, kFwdRowStride, 8 * (2 * n + half) + g, e));
      }
    }
  }
  __syncthreads();  // Qs and Ks are read by everyone (and Sq written) before SS overwrites them
  // The tokens, one per thread (a token is ~60 instructions of special functions: one lane of a warp per
  // row would leave the other 31 idle).
  for (int r = threadIdx.x; r < kTiledQueries + kTiledKeys; r += kTiledThreads)
    (r < kTiledQueries ? Qt[r] : Kt[r - kTiledQueries]) = pol.token(Sq[r]);
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    if (!(live & (1u << n))) continue;
    const int key = 8 * (2 * n + half) + 2 * t;
    *reinterpret_cast<float2*>(SS + row_lo * kFwdScoreStride + key) = make_float2(s_acc[n][0], s_acc[n][1]);
    *reinterpret_cast<float2*>(SS + row_hi * kFwdScoreStride + key) = make_float2(s_acc[n][2], s_acc[n][3]);
  }
  __syncthreads();

  // (p): query r of this warp, keys window_start(i) + lane + 32c; the row is zeroed for (o) first.
  constexpr int kWindowSlots = (kTiledMaxWindow + kWarp - 1) / kWarp;
  for (int r = warp; r < kTiledQueries; r += kWarps) {
    const int i = i0 + r;
    float* srow = SS + r * kFwdScoreStride;
    if (i > i_last) {
#pragma unroll
      for (int c = 0; c < kTiledKeys / kWarp; ++c) srow[lane + 32 * c] = 0.f;
      continue;
    }
    const int first = geo.window_start(i) - key_lo;
    float s[kWindowSlots], m = -INFINITY;
#pragma unroll
    for (int c = 0; c < kWindowSlots; ++c) {
      const int tk = first + lane + 32 * c;
      s[c] = key_lo + tk <= i ? pol.score(i, key_lo + tk, Qt[r], Kt[tk], srow[tk]) : -INFINITY;
      m = fmaxf(m, s[c]);
    }
    m = warp_max(m);
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < kWindowSlots; ++c) {
      s[c] = s[c] == -INFINITY ? 0.f : PairMath::exp(s[c] - m);
      sum += s[c];
    }
    sum = warp_sum(sum);
    __syncwarp();  // every lane has read its scores before the row is zeroed
#pragma unroll
    for (int c = 0; c < kTiledKeys / kWarp; ++c) srow[lane + 32 * c] = 0.f;
    __syncwarp();
#pragma unroll
    for (int c = 0; c < kWindowSlots; ++c) {
      const int tk = first + lane + 32 * c;
      if (key_lo + tk <= i) srow[tk] = s[c];
    }
    if (lane == 0) {
      RowSum[r] = sum;
      lse[geo.lse_index(b, i, h)] = m + logf(sum);
    }
  }
  __syncthreads();

  // (o): rows row_lo, row_hi, columns 32·half + 8n + 2t (+1), over the 8-key blocks in their windows.
  float acc[4][4] = {};
  if (q_lo0 <= i_last && values_finite) {
    for (int kk = 0; kk < kTiledKeys / 8; ++kk) {
      const int ja = key_lo + 8 * kk;
      if (ja > i_last) break;
      if (!blocks_meet(q_lo0, ja) && !blocks_meet(q_hi0, ja)) continue;
      const Tf32A pa = tf32_a_adjacent<kExact>(SS, kFwdScoreStride, row_lo, row_hi, 8 * kk + 2 * t);
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const int col = 32 * half + 8 * n;
        if (col >= dh) break;
        const int at = (8 * kk + 2 * t) * kFwdValueStride + col + g;
        mma_tf32_product<kExact>(acc[n], pa, to_tf32_b<kExact>(Vs[at], Vs[at + kFwdValueStride]));
      }
    }
  } else if (q_lo0 <= i_last) {  // a non-finite value: element-wise over each row's window
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int r = place.row(c), i = i0 + r;
      if (i > i_last) continue;
      for (int j = geo.window_start(i) - key_lo; j <= i - key_lo; ++j) {
        const float p = SS[r * kFwdScoreStride + j];
        if (p == 0.f) continue;
#pragma unroll
        for (int n = 0; n < 4; ++n) acc[n][c] += p * Vs[j * kFwdValueStride + place.col(n, c)];
      }
    }
  }
#pragma unroll
  for (int c = 0; c < 4; c += 2) {
    const int r = place.row(c), i = i0 + r;
    if (i > i_last) continue;
    const float inv_sum = 1.f / RowSum[r];
    float* oi = o + geo.row(b, i, h);
#pragma unroll
    for (int n = 0; n < 4; ++n)
      store_pair(oi, place.col(n, c), dh, make_float2(acc[n][c] * inv_sum, acc[n][c + 1] * inv_sum));
  }
}

// The block's partial sums of dc and dβ_h (each thread's, summed over its warp, then over the warps in
// order) into partials[block] and partials[blocks + block]. Red: 2·kWarps floats of shared memory; every
// thread of the block calls it.
__device__ void write_param_partials(float* partials, float dc_acc, float dbeta_acc, float* Red, int b, int h) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  dc_acc = warp_sum(dc_acc);
  dbeta_acc = warp_sum(dbeta_acc);
  if (lane == 0) {
    Red[warp] = dc_acc;
    Red[kWarps + warp] = dbeta_acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float dc_sum = 0.f, dbeta_sum = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      dc_sum += Red[w];
      dbeta_sum += Red[kWarps + w];
    }
    const long blocks = (long)gridDim.x * gridDim.y * gridDim.z;
    const long block = ((long)b * gridDim.y + h) * gridDim.x + blockIdx.x;
    partials[block] = dc_sum;
    partials[blocks + block] = dbeta_sum;
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward, query side: block (query tile, h, b) → dq, and per-block partials of dc and dβ_h
// (partials[block] and partials[blocks + block]).
template <class Params>
__global__ void __launch_bounds__(kThreads)
    attn_backward_query_kernel(float* dq, float* partials, const float* d_o, const float* o, const float* lse,
                               const float* q, const float* k, const float* v, Geometry geo, Params params) {
  using Score = typename Params::Score;
  using Token = typename Score::Token;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kBwdQueryTile;
  const int dh = geo.dh, ks = odd_stride(dh);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int i_last = min(i0 + kBwdQueryTile, geo.N) - 1;
  const Score pol = params.at(b, h);
  const bool want_dq = dq != nullptr;

  extern __shared__ float smem[];
  SmemCursor cur{smem};
  float* Qs = cur.take((long)kBwdQueryTile * dh);
  float* Gs = cur.take((long)kBwdQueryTile * dh);   // dO rows
  float* DQs = cur.take((long)kBwdQueryTile * dh);  // Σ_j cross_ij·k_j
  float* Ks = cur.take((long)kChunk * ks);
  float* Vs = cur.take((long)kChunk * ks);
  float* Xs = cur.take(kWarps * kChunk);            // per-warp cross coefficients of the chunk
  float* LSEs = cur.take(kBwdQueryTile);
  float* GOs = cur.take(kBwdQueryTile);             // dO_i·o_i
  float* DQself = cur.take(kBwdQueryTile);          // Σ_j self_q,ij
  float* Red = cur.take(2 * kWarps);
  Token* Qt = reinterpret_cast<Token*>(cur.at);
  Token* Kt = Qt + kBwdQueryTile;

  for (int t = warp; t < kBwdQueryTile; t += kWarps) {
    const int i = i0 + t;
    if (i > i_last) break;
    const long at = geo.row(b, i, h);
    float sq = 0.f, go = 0.f;
    for (int e = lane; e < dh; e += kWarp) {
      const float x = q[at + e], g = d_o[at + e];
      Qs[t * dh + e] = x;
      Gs[t * dh + e] = g;
      DQs[t * dh + e] = 0.f;
      sq += x * x;
      go += g * o[at + e];
    }
    if (Score::kNeedsNorm) sq = warp_sum(sq);
    go = warp_sum(go);
    if (lane == 0) {
      Qt[t] = pol.token(sq);
      LSEs[t] = lse[geo.lse_index(b, i, h)];
      GOs[t] = go;
      DQself[t] = 0.f;
    }
  }

  float dc_acc = 0.f, dbeta_acc = 0.f;  // this lane's share of the block's partials
  const int key_lo = geo.window_start(i0), key_hi = i_last;
  for (int cs = key_lo; cs <= key_hi; cs += kChunk) {
    __syncthreads();
    for (int t = warp; t < kChunk; t += kWarps) {
      const int j = cs + t;
      if (j > key_hi) break;
      const long at = geo.row(b, j, h);
      float sq = 0.f;
      for (int e = lane; e < dh; e += kWarp) {
        const float x = k[at + e];
        Ks[t * ks + e] = x;
        Vs[t * ks + e] = v[at + e];
        sq += x * x;
      }
      if (Score::kNeedsNorm) sq = warp_sum(sq);
      if (lane == 0) Kt[t] = pol.token(sq);
    }
    __syncthreads();

    for (int qq = 0; qq < kBwdQueriesPerWarp; ++qq) {
      const int t = warp + kWarps * qq, i = i0 + t;
      if (i > i_last) break;
      const int lo = max(geo.window_start(i), cs), hi = min(i, cs + kChunk - 1);
      if (lo > hi) continue;
      const int j = cs + lane;
      const bool valid = j >= lo && j <= hi;
      float cross = 0.f, self_q = 0.f;
      if (valid) {
        const float* qrow = Qs + t * dh;
        const float* grow = Gs + t * dh;
        const float* krow = Ks + lane * ks;
        const float* vrow = Vs + lane * ks;
        float dot_qk = 0.f, dot_gv = 0.f;
        for (int e = 0; e < dh; ++e) {
          dot_qk += qrow[e] * krow[e];
          dot_gv += grow[e] * vrow[e];
        }
        const PairGrad pg = pol.pair_grad(i, j, Qt[t], Kt[lane], dot_qk, dot_gv, LSEs[t], GOs[t]);
        dbeta_acc -= pg.dbeta;
        dc_acc -= pg.dc;
        cross = pg.cross;
        self_q = pg.self_q;
      }
      if (want_dq) {
        Xs[warp * kChunk + lane] = cross;
        const float self_sum = warp_sum(self_q);
        __syncwarp();
        for (int e = lane; e < dh; e += kWarp) {
          float acc = DQs[t * dh + e];
          for (int jj = lo - cs; jj <= hi - cs; ++jj) acc += Xs[warp * kChunk + jj] * Ks[jj * ks + e];
          DQs[t * dh + e] = acc;
        }
        if (lane == 0) DQself[t] += self_sum;
        __syncwarp();  // Xs read by every lane before the next query overwrites it
      }
    }
  }

  __syncwarp();
  if (want_dq) {
    for (int qq = 0; qq < kBwdQueriesPerWarp; ++qq) {
      const int t = warp + kWarps * qq, i = i0 + t;
      if (i > i_last) break;
      float* dqi = dq + geo.row(b, i, h);
      const float self = DQself[t];
      for (int e = lane; e < dh; e += kWarp) dqi[e] += DQs[t * dh + e] + self * Qs[t * dh + e];
    }
  }
  if (Params::kHasParamGrads && partials) write_param_partials(partials, dc_acc, dbeta_acc, Red, b, h);
}

// ---------------------------------------------------------------------------------------------------
// Backward, key side: block (key tile, h, b) → dk, dv, dlog μ. Warp w owns keys w, w + 8, … of the
// tile; queries i ∈ [j, last_query(j)] stream through shared memory.
template <class Params>
__global__ void __launch_bounds__(kThreads)
    attn_backward_key_kernel(float* dk, float* dv, float* dlog_mu, const float* d_o, const float* o,
                             const float* lse, const float* q, const float* k, const float* v, Geometry geo,
                             Params params) {
  using Score = typename Params::Score;
  using Token = typename Score::Token;
  const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * kBwdKeyTile;
  const int dh = geo.dh, ks = odd_stride(dh);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int j_last = min(j0 + kBwdKeyTile, geo.N) - 1;
  const Score pol = params.at(b, h);

  extern __shared__ float smem[];
  SmemCursor cur{smem};
  float* Ks = cur.take((long)kBwdKeyTile * dh);
  float* Vs = cur.take((long)kBwdKeyTile * dh);
  float* DKs = cur.take((long)kBwdKeyTile * dh);  // Σ_i cross_ij·q_i
  float* DVs = cur.take((long)kBwdKeyTile * dh);  // Σ_i p_ij·dO_i
  float* Qc = cur.take((long)kChunk * ks);        // query chunk (odd stride: lane = query)
  float* Gc = cur.take((long)kChunk * ks);        // dO chunk
  float* Ps = cur.take(kWarps * kChunk);
  float* Xs = cur.take(kWarps * kChunk);
  float* LSEc = cur.take(kChunk);
  float* GOc = cur.take(kChunk);
  float* DKself = cur.take(kBwdKeyTile);
  float* DMU = cur.take(kBwdKeyTile);
  Token* Kt = reinterpret_cast<Token*>(cur.at);
  Token* Qt = Kt + kBwdKeyTile;

  for (int t = warp; t < kBwdKeyTile; t += kWarps) {
    const int j = j0 + t;
    if (j > j_last) break;
    const long at = geo.row(b, j, h);
    float sq = 0.f;
    for (int e = lane; e < dh; e += kWarp) {
      const float x = k[at + e];
      Ks[t * dh + e] = x;
      Vs[t * dh + e] = v[at + e];
      DKs[t * dh + e] = 0.f;
      DVs[t * dh + e] = 0.f;
      sq += x * x;
    }
    if (Score::kNeedsNorm) sq = warp_sum(sq);
    if (lane == 0) {
      Kt[t] = pol.token(sq);
      DKself[t] = 0.f;
      DMU[t] = 0.f;
    }
  }

  const int query_lo = j0, query_hi = geo.last_query(j_last);
  for (int cs = query_lo; cs <= query_hi; cs += kChunk) {
    __syncthreads();
    for (int t = warp; t < kChunk; t += kWarps) {
      const int i = cs + t;
      if (i > query_hi) break;
      const long at = geo.row(b, i, h);
      float sq = 0.f, go = 0.f;
      for (int e = lane; e < dh; e += kWarp) {
        const float x = q[at + e], g = d_o[at + e];
        Qc[t * ks + e] = x;
        Gc[t * ks + e] = g;
        sq += x * x;
        go += g * o[at + e];
      }
      if (Score::kNeedsNorm) sq = warp_sum(sq);
      go = warp_sum(go);
      if (lane == 0) {
        Qt[t] = pol.token(sq);
        LSEc[t] = lse[geo.lse_index(b, i, h)];
        GOc[t] = go;
      }
    }
    __syncthreads();

    for (int kk = 0; kk < kBwdKeysPerWarp; ++kk) {
      const int t = warp + kWarps * kk, j = j0 + t;
      if (j > j_last) break;
      const int lo = max(j, cs), hi = min(geo.last_query(j), cs + kChunk - 1);
      if (lo > hi) continue;
      const int i = cs + lane;
      const bool valid = i >= lo && i <= hi;
      float p = 0.f, cross = 0.f, self_k = 0.f, dscore = 0.f;
      if (valid) {
        const float* qrow = Qc + lane * ks;
        const float* grow = Gc + lane * ks;
        const float* krow = Ks + t * dh;
        const float* vrow = Vs + t * dh;
        float dot_qk = 0.f, dot_gv = 0.f;
        for (int e = 0; e < dh; ++e) {
          dot_qk += qrow[e] * krow[e];
          dot_gv += grow[e] * vrow[e];
        }
        const PairGrad pg = pol.pair_grad(i, j, Qt[lane], Kt[t], dot_qk, dot_gv, LSEc[lane], GOc[lane]);
        p = pg.p;
        cross = pg.cross;
        self_k = pg.self_k;
        dscore = pg.dscore;
      }
      Ps[warp * kChunk + lane] = p;
      Xs[warp * kChunk + lane] = cross;
      const float self_sum = warp_sum(self_k), dscore_sum = warp_sum(dscore);
      __syncwarp();
      for (int e = lane; e < dh; e += kWarp) {
        float dv_acc = DVs[t * dh + e], dk_acc = DKs[t * dh + e];
        for (int ii = lo - cs; ii <= hi - cs; ++ii) {
          dv_acc += Ps[warp * kChunk + ii] * Gc[ii * ks + e];
          dk_acc += Xs[warp * kChunk + ii] * Qc[ii * ks + e];
        }
        DVs[t * dh + e] = dv_acc;
        DKs[t * dh + e] = dk_acc;
      }
      if (lane == 0) {
        DKself[t] += self_sum;
        DMU[t] += dscore_sum;
      }
      __syncwarp();
    }
  }

  __syncwarp();
  for (int kk = 0; kk < kBwdKeysPerWarp; ++kk) {
    const int t = warp + kWarps * kk, j = j0 + t;
    if (j > j_last) break;
    const long at = geo.row(b, j, h);
    if (dk) {
      const float self = DKself[t];
      for (int e = lane; e < dh; e += kWarp) dk[at + e] += DKs[t * dh + e] + self * Ks[t * dh + e];
    }
    if (dv)
      for (int e = lane; e < dh; e += kWarp) dv[at + e] += DVs[t * dh + e];
    if (dlog_mu && lane == 0) dlog_mu[((long)b * geo.N + j) * geo.H + h] += DMU[t];
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward, tiled, on the tensor cores: block (64-key tile, h, b) of 8 warps computes every pair of its
// keys once. The queries that see key tile [j0, j0 + 63] are [j0, last_query(j0 + 63)] (≤ 128 with
// window ≤ 65); they are taken 64 at a time. Every product is a 3xTF32 mma.sync (common/mma_tf32.cuh),
// fp32-accurate. Per step:
//   (a, b) S = Q·Kᵀ and dP = dO·Vᵀ (64 × 64, summed over e) into PT and XT ([key][query]);
//   (pair) PairGrad from the saved lse, one warp per eight keys (w, w + 8, …) and lanes over queries: p
//          overwrites S in PT and the cross coefficient x overwrites dP in XT; row sums of self_q go to
//          RowSelf per warp, key sums of self_k and dscore stay in registers (lane m: key w + 8m);
//   (d, e) dV += Pᵀ·dO, dK += Xᵀ·Q (64 × d_h, summed over the step's queries), accumulated over the steps;
//   (f)    dQ = X·K + (Σ self_q)·q (64 × d_h, summed over the tile's keys).
// In the products warp w owns the 32-column half w / 4 and two 8-row blocks, w % 4 and 7 − w % 4: the
// windows make the pairs of a step a triangle, and a block near each end gives every warp a similar share.
// dk, dv and dlog μ of the tile are complete at the end. A query's dq gets terms from its own 64-key tile
// and, when its window starts earlier, from the previous one: the own tile's part is added to dq here, the
// previous tile's part (from block t − 1) is written to `carry` and added by add_dq_carry_kernel
// afterwards. No pair is scored twice and no element has two writers; all sums are in a fixed order.
// Products skip the 8-wide blocks that hold no pair of a window; masked pairs get p = x = 0.
constexpr int kBwdTiledKeys = 64, kBwdTiledStep = 64;
constexpr int kBwdRowStride = kTiledMaxHeadDim + 8;  // Ks, Vs, Qs, Gs [row][e], ≡ 8: the (a, b) fragments
                                                     // read e = 2t, 2t + 1 as one 8-byte load, and the
                                                     // (d, e), (f) B fragments rows t, t + 4 at column g
constexpr int kBwdCoefStride = kBwdTiledStep + 4;    // PT, XT [key][query], ≡ 4: A fragments (g, t) and the
                                                     // (a, b) stores (key 2t + x, query g) conflict-free
static_assert(kBwdRowStride % 32 == 8 && kBwdCoefStride % 32 == 4);
static_assert(kBwdTiledKeys + kTiledMaxWindow - 1 <= 2 * kBwdTiledStep, "two steps cover a key tile's queries");
static_assert(kTiledMaxHeadDim == 64 && kBwdTiledKeys == 64 && kBwdTiledStep == 64 && kWarps == 8,
              "warp w owns the row blocks w % 4, 7 − w % 4 and the column half w / 4 of each 64 × 64 product");

template <class Token> size_t tiled_backward_smem_bytes() {
  const size_t floats = size_t(2) * (kBwdTiledKeys + kBwdTiledStep) * kBwdRowStride  // Ks, Vs, Qs, Gs
                        + size_t(2) * kBwdTiledKeys * kBwdCoefStride                  // PT, XT
                        + 2 * kBwdTiledStep                                           // lse, dO·o of the step
                        + size_t(kWarps) * kBwdTiledStep                              // RowSelf
                        + kBwdTiledStep + kBwdTiledKeys                               // Sq
                        + 2 * kWarps;                                                 // Red
  return floats * sizeof(float) + (kBwdTiledKeys + kBwdTiledStep) * sizeof(Token);
}

template <class Params, bool kExact>
__global__ void __launch_bounds__(kTiledThreads, 2)
    attn_backward_tiled_kernel(float* dq, float* carry, float* dk, float* dv, float* dlog_mu, float* partials,
                               const float* d_o, const float* o, const float* lse, const float* q, const float* k,
                               const float* v, Geometry geo, Params params) {
  using Score = typename Params::Score;
  using Token = typename Score::Token;
  constexpr int EB = kTiledMaxHeadDim / kWarp;  // columns per lane in the row loops
  const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * kBwdTiledKeys;
  const int dh = geo.dh, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, t = lane % 4, half = warp / 4;
  const AccumulatorMap place(warp, lane);
  const int row_lo = place.row_lo, row_hi = place.row_hi, col0 = place.col0;
  const int j_last = min(j0 + kBwdTiledKeys, geo.N) - 1, query_hi = geo.last_query(j_last);
  const Score pol = params.at(b, h);

  extern __shared__ float smem[];
  SmemCursor cur{smem};
  float* Ks = cur.take(kBwdTiledKeys * kBwdRowStride);
  float* Vs = cur.take(kBwdTiledKeys * kBwdRowStride);
  float* Qs = cur.take(kBwdTiledStep * kBwdRowStride);
  float* Gs = cur.take(kBwdTiledStep * kBwdRowStride);  // dO
  float* PT = cur.take(kBwdTiledKeys * kBwdCoefStride);
  float* XT = cur.take(kBwdTiledKeys * kBwdCoefStride);
  float* LSEs = cur.take(kBwdTiledStep);
  float* GOs = cur.take(kBwdTiledStep);                  // dO_i·o_i
  float* RowSelf = cur.take(kWarps * kBwdTiledStep);     // [warp][query]: Σ self_q over the warp's keys
  float* Sq = cur.take(kBwdTiledStep + kBwdTiledKeys);   // squared norms: the step's queries, then the keys
  float* Red = cur.take(2 * kWarps);
  Token* Kt = reinterpret_cast<Token*>(cur.at);
  Token* Qt = Kt + kBwdTiledKeys;

  const bool k_finite = stage_tile<kBwdTiledKeys>(Ks, kBwdRowStride, k, geo, b, h, j0, j_last - j0 + 1);
  stage_tile<kBwdTiledKeys>(Vs, kBwdRowStride, v, geo, b, h, j0, j_last - j0 + 1);
  const bool keys_finite = all_finite(k_finite);
  for (int r = warp; r < kBwdTiledKeys; r += kWarps) {
    const float sq = Score::kNeedsNorm ? row_squared_norm(Ks + r * kBwdRowStride, lane) : 0.f;
    if (lane == 0) Sq[kBwdTiledStep + r] = sq;
  }

  const bool want_dq = dq != nullptr, want_dk = dk != nullptr, want_dv = dv != nullptr;
  float dv_acc[4][4] = {}, dk_acc[4][4] = {};  // (d, e): element c of block n is key place.row(c), column place.col(n, c)
  float key_self = 0.f, key_score = 0.f;  // lane m < 8: Σ self_k, Σ dscore of key warp + 8m over the steps
  float dc_acc = 0.f, dbeta_acc = 0.f;
  // Does the block of queries [qa, qa + 7] ∩ [.., q_end] hold a pair with keys [ka, ka + 7] ∩ [.., j_last]?
  auto blocks_meet = [&](int qa, int q_end, int ka) {
    return pairs_meet_windows(geo, qa, min(qa + 7, q_end), ka, min(ka + 7, j_last));
  };

  for (int step0 = j0; step0 <= query_hi; step0 += kBwdTiledStep) {
    const int rows = min(kBwdTiledStep, query_hi - step0 + 1), step_end = step0 + rows - 1;
    __syncthreads();  // the previous step's operands and coefficients are no longer read (and Sq is written)
    const bool q_finite = stage_tile<kBwdTiledStep>(Qs, kBwdRowStride, q, geo, b, h, step0, rows);
    const bool rows_finite = all_finite(stage_tile<kBwdTiledStep>(Gs, kBwdRowStride, d_o, geo, b, h, step0, rows) && q_finite);
    // Per query: its squared norm, lse and dO·o. The o and lse loads of all of a warp's queries are issued
    // before the first is used (a loop over queries would wait out one memory latency per query).
    constexpr int kStepRowsPerWarp = kBwdTiledStep / kWarps;
    float o_in[kStepRowsPerWarp][EB], lse_in[kStepRowsPerWarp];
#pragma unroll
    for (int n = 0; n < kStepRowsPerWarp; ++n) {
      const int r = warp + n * kWarps;
      const long at = geo.row(b, step0 + r, h);
#pragma unroll
      for (int c = 0; c < EB; ++c) o_in[n][c] = r < rows && lane + 32 * c < dh ? o[at + lane + 32 * c] : 0.f;
      lse_in[n] = r < rows && lane == 0 ? lse[geo.lse_index(b, step0 + r, h)] : 0.f;
    }
#pragma unroll
    for (int n = 0; n < kStepRowsPerWarp; ++n) {
      const int r = warp + n * kWarps;
      if (r >= rows) break;
      float sq = 0.f, go = 0.f;
#pragma unroll
      for (int c = 0; c < EB; ++c) {
        const int e = lane + 32 * c;
        sq += Qs[r * kBwdRowStride + e] * Qs[r * kBwdRowStride + e];
        go += Gs[r * kBwdRowStride + e] * o_in[n][c];
      }
      if (Score::kNeedsNorm) sq = warp_sum(sq);
      go = warp_sum(go);
      if (lane == 0) {
        Sq[r] = sq;
        LSEs[r] = lse_in[n];
        GOs[r] = go;
      }
    }

    // (a, b): query rows row_lo, row_hi against key blocks 2n + half that meet their windows. The
    // fragments' summed index k = t, t + 4 is e = 2t, 2t + 1 of each 8-column slice (one 8-byte load).
    const int q_lo0 = step0 + low_row(warp, 0), q_hi0 = step0 + high_row(warp, 0);
    unsigned live = 0;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int ja = j0 + 8 * (2 * n + half);
      if (blocks_meet(q_lo0, step_end, ja) || blocks_meet(q_hi0, step_end, ja)) live |= 1u << n;
    }
    if (live) {
      float s_acc[4][4] = {}, dp_acc[4][4] = {};
#pragma unroll 1
      for (int kk = 0; kk < kTiledMaxHeadDim / 8; ++kk) {
        if (8 * kk >= dh) break;
        const int e = 8 * kk + 2 * t;
        const Tf32A qa = tf32_a_adjacent(Qs, kBwdRowStride, row_lo, row_hi, e);
        const Tf32A ga = tf32_a_adjacent<kExact>(Gs, kBwdRowStride, row_lo, row_hi, e);
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          if (!(live & (1u << n))) continue;
          const int key = 8 * (2 * n + half) + g;
          mma_3xtf32(s_acc[n], qa, tf32_b_adjacent(Ks, kBwdRowStride, key, e));
          mma_tf32_product<kExact>(dp_acc[n], ga, tf32_b_adjacent<kExact>(Vs, kBwdRowStride, key, e));
        }
      }
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        if (!(live & (1u << n))) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int at = (8 * (2 * n + half) + 2 * t + c % 2) * kBwdCoefStride + place.row(c);
          PT[at] = s_acc[n][c];
          XT[at] = dp_acc[n][c];
        }
      }
    }
    __syncthreads();
    // The tokens of the step's queries (and, in the first step, of the keys), one per thread: a token is ~60
    // instructions of special functions, which one lane of a warp per row would run with 31 lanes idle.
    if (threadIdx.x < kBwdTiledStep)
      Qt[threadIdx.x] = pol.token(Sq[threadIdx.x]);
    else if (step0 == j0 && threadIdx.x < kBwdTiledStep + kBwdTiledKeys)
      Kt[threadIdx.x - kBwdTiledStep] = pol.token(Sq[threadIdx.x]);
    __syncthreads();

    // Pair gradients: warp w takes keys w + 8m, lanes the queries lane, lane + 32; (S, dP) in PT, XT are
    // overwritten by (p, x), 0 where the pair is masked (also where (a, b) skipped the block).
    float row_self[2] = {};
#pragma unroll 1
    for (int m = 0; m < kBwdTiledKeys / kWarps; ++m) {
      const int tk = warp + kWarps * m, j = j0 + tk;
      const bool key_live = j <= j_last && j <= step_end && geo.last_query(j) >= step0;
      float self_k = 0.f, dscore = 0.f;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int tq = lane + 32 * c, i = step0 + tq, at = tk * kBwdCoefStride + tq;
        float p = 0.f, cross = 0.f;
        if (key_live && tq < rows && j >= geo.window_start(i) && j <= i) {
          const PairGrad pg = pol.pair_grad(i, j, Qt[tq], Kt[tk], PT[at], XT[at], LSEs[tq], GOs[tq]);
          p = pg.p;
          cross = pg.cross;
          row_self[c] += pg.self_q;
          self_k += pg.self_k;
          dscore += pg.dscore;
          dc_acc -= pg.dc;
          dbeta_acc -= pg.dbeta;
        }
        PT[at] = p;
        XT[at] = cross;
      }
      if (key_live) {
        self_k = warp_sum(self_k);
        dscore = warp_sum(dscore);
        if (lane == m) {
          key_self += self_k;
          key_score += dscore;
        }
      }
    }
    if (want_dq) {
      RowSelf[warp * kBwdTiledStep + lane] = row_self[0];
      RowSelf[warp * kBwdTiledStep + lane + 32] = row_self[1];
    }
    __syncthreads();

    // (d, e): dV and dK of key rows row_lo, row_hi, columns col0… , over the step's queries in 8-query
    // blocks that see them. A = Pᵀ or Xᵀ from PT, XT; B = dO or Q (rows t, t + 4 of the block).
    const int k_lo0 = j0 + low_row(warp, 0), k_hi0 = j0 + high_row(warp, 0);
    if ((want_dv || want_dk) && k_lo0 <= j_last && rows_finite) {
      for (int qq = 0; qq < kBwdTiledStep / 8; ++qq) {
        const int ia = step0 + 8 * qq;
        if (ia > step_end) break;
        if (!blocks_meet(ia, step_end, k_lo0) && !blocks_meet(ia, step_end, k_hi0)) continue;
        const float* p_lo = PT + row_lo * kBwdCoefStride + 8 * qq + t;
        const float* p_hi = PT + row_hi * kBwdCoefStride + 8 * qq + t;
        const float* x_lo = XT + row_lo * kBwdCoefStride + 8 * qq + t;
        const float* x_hi = XT + row_hi * kBwdCoefStride + 8 * qq + t;
        const Tf32A pa = to_tf32_a<kExact>(p_lo[0], p_hi[0], p_lo[4], p_hi[4]);
        const Tf32A xa = to_tf32_a<kExact>(x_lo[0], x_hi[0], x_lo[4], x_hi[4]);
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          if (col0 + 8 * n >= dh) break;
          const int at = (8 * qq + t) * kBwdRowStride + col0 + 8 * n + g;
          mma_tf32_product<kExact>(dv_acc[n], pa, to_tf32_b<kExact>(Gs[at], Gs[at + 4 * kBwdRowStride]));
          mma_tf32_product<kExact>(dk_acc[n], xa, to_tf32_b<kExact>(Qs[at], Qs[at + 4 * kBwdRowStride]));
        }
      }
    } else if ((want_dv || want_dk) && k_lo0 <= j_last) {  // a non-finite q or dO: element-wise, masked skipped
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int tk = place.row(c);
        for (int tq = 0; tq < rows; ++tq) {
          const float p = PT[tk * kBwdCoefStride + tq], x = XT[tk * kBwdCoefStride + tq];
#pragma unroll
          for (int n = 0; n < 4; ++n) {
            const int at = tq * kBwdRowStride + place.col(n, c);
            if (p != 0.f) dv_acc[n][c] += p * Gs[at];
            if (x != 0.f) dk_acc[n][c] += x * Qs[at];
          }
        }
      }
    }

    // (f): dq of query rows row_lo, row_hi, columns col0… , over the tile's keys in 8-key blocks in their
    // windows. A = X from XT (rows t, t + 4 of key block kk: a two-way bank conflict), B = K.
    if (want_dq && q_lo0 <= step_end) {
      float dq_acc[4][4] = {};
      for (int kk = 0; kk < (keys_finite ? kBwdTiledKeys / 8 : 0); ++kk) {
        const int ja = j0 + 8 * kk;
        if (ja > j_last) break;
        if (!blocks_meet(q_lo0, step_end, ja) && !blocks_meet(q_hi0, step_end, ja)) continue;
        const float* x_col = XT + (8 * kk + t) * kBwdCoefStride;
        constexpr int kRight = 4 * kBwdCoefStride;
        const Tf32A xa =
            to_tf32_a<kExact>(x_col[row_lo], x_col[row_hi], x_col[kRight + row_lo], x_col[kRight + row_hi]);
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          if (col0 + 8 * n >= dh) break;
          const int at = (8 * kk + t) * kBwdRowStride + col0 + 8 * n + g;
          mma_tf32_product<kExact>(dq_acc[n], xa, to_tf32_b<kExact>(Ks[at], Ks[at + 4 * kBwdRowStride]));
        }
      }
      if (!keys_finite) {  // a non-finite k: element-wise, masked pairs skipped
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int tq = place.row(c);
          for (int tk = 0; tk <= j_last - j0; ++tk) {
            const float x = XT[tk * kBwdCoefStride + tq];
            if (x == 0.f) continue;
#pragma unroll
            for (int n = 0; n < 4; ++n) dq_acc[n][c] += x * Ks[tk * kBwdRowStride + place.col(n, c)];
          }
        }
      }
      float self[2] = {};
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        self[0] += RowSelf[w * kBwdTiledStep + row_lo];
        self[1] += RowSelf[w * kBwdTiledStep + row_hi];
      }
      // The old dq of every element first, then the stores: interleaved, each load would wait for the store
      // before it (the compiler cannot tell that they never alias).
      float2 dq_old[4][2];
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int c = 0; c < 4; c += 2) {
          const int i = step0 + place.row(c);
          const bool in_dq = i <= step_end && i < j0 + kBwdTiledKeys;
          dq_old[n][c / 2] = in_dq ? load_pair(dq + geo.row(b, i, h), place.col(n, c), dh) : make_float2(0.f, 0.f);
        }
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int c = 0; c < 4; c += 2) {
          const int tq = place.row(c), i = step0 + tq, e = place.col(n, c);
          if (i > step_end || e >= dh) continue;
          const float* qrow = Qs + tq * kBwdRowStride + e;
          const float2 value =
              make_float2(dq_acc[n][c] + self[c / 2] * qrow[0], dq_acc[n][c + 1] + self[c / 2] * qrow[1]);
          const float2 old = dq_old[n][c / 2];
          if (i < j0 + kBwdTiledKeys)
            store_pair(dq + geo.row(b, i, h), e, dh, make_float2(old.x + value.x, old.y + value.y));
          else
            store_pair(carry + geo.row(b, i, h), e, dh, value);
        }
    }
  }

  // The key sums (lane m of warp w holds key w + 8m) to shared memory for the dk epilogue; RowSelf is free.
  __syncthreads();
  float* KeySelf = RowSelf;
  if (lane < kBwdTiledKeys / kWarps) KeySelf[warp + kWarps * lane] = key_self;
  __syncthreads();
  // Every old value first, then the stores (as for dq above); dk, then dv.
  auto add_into = [&](float* out, float (&acc)[4][4], bool with_self) {
    float2 old[4][2];
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int c = 0; c < 4; c += 2) {
        const int j = j0 + place.row(c);
        old[n][c / 2] = j <= j_last ? load_pair(out + geo.row(b, j, h), place.col(n, c), dh) : make_float2(0.f, 0.f);
      }
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int c = 0; c < 4; c += 2) {
        const int tk = place.row(c), j = j0 + tk, e = place.col(n, c);
        if (j > j_last || e >= dh) continue;
        float2 value = make_float2(acc[n][c], acc[n][c + 1]);
        if (with_self) {
          const float* krow = Ks + tk * kBwdRowStride + e;
          value.x += KeySelf[tk] * krow[0], value.y += KeySelf[tk] * krow[1];
        }
        store_pair(out + geo.row(b, j, h), e, dh, make_float2(old[n][c / 2].x + value.x, old[n][c / 2].y + value.y));
      }
  };
  if (want_dk) add_into(dk, dk_acc, true);
  if (want_dv) add_into(dv, dv_acc, false);
  if (dlog_mu && lane < kBwdTiledKeys / kWarps) {
    const int j = j0 + warp + kWarps * lane;
    if (j <= j_last) dlog_mu[((long)b * geo.N + j) * geo.H + h] += key_score;
  }
  if (Params::kHasParamGrads && partials) write_param_partials(partials, dc_acc, dbeta_acc, Red, b, h);
}

// dq += carry for the queries whose window starts in the key tile before their own (the part the tiled
// backward's block t − 1 wrote), on a row grid (rows = B·N tokens), kWidth columns a thread.
template <int kWidth>
__global__ void add_dq_carry_kernel(float* dq, const float* carry, Geometry geo, int rows) {
  const int c = (blockIdx.x * blockDim.x + threadIdx.x) * kWidth;
  if (c >= geo.D) return;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const int i = r % geo.N;
    if (geo.window_start(i) >= i - i % kBwdTiledKeys) continue;
    const size_t at = size_t(r) * geo.D + c;
    float sum[kWidth], add[kWidth];
    load_floats(sum, dq + at), load_floats(add, carry + at);
#pragma unroll
    for (int k = 0; k < kWidth; ++k) sum[k] += add[k];
    store_floats(dq + at, sum);
  }
}

// dc += Σ_blocks partials[block]; dβ_h += Σ_{blocks of head h} partials[blocks + block]. Block x < H
// reduces dβ_x, block H reduces dc; fixed strided assignment and a fixed tree: deterministic.
__global__ void __launch_bounds__(kReduceThreads)
    reduce_param_partials_kernel(float* dc, float* dbeta, const float* partials, int B, int H, int tiles) {
  __shared__ float red[kReduceThreads];
  const int out = blockIdx.x, tid = threadIdx.x;
  const long blocks = (long)B * H * tiles;
  float acc = 0.f;
  if (out == H) {
    for (long idx = tid; idx < blocks; idx += kReduceThreads) acc += partials[idx];
  } else {
    const long n = (long)B * tiles;
    for (long idx = tid; idx < n; idx += kReduceThreads) {
      const long bb = idx / tiles, tile = idx % tiles;
      acc += partials[blocks + (bb * H + out) * tiles + tile];
    }
  }
  red[tid] = acc;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s /= 2) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  if (tid == 0) {
    if (out == H) {
      if (dc) *dc += red[0];
    } else if (dbeta) {
      dbeta[out] += red[0];
    }
  }
}

// Dynamic shared memory above the 48 KiB default needs an opt-in per kernel.
template <class Kernel> void prepare_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    MUSE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

void validate(const WindowedAttnArgs& a) {
  if (a.B < 0 || a.N < 0 || a.H < 1 || a.D < 1 || a.D % a.H != 0)
    throw std::invalid_argument("windowed attention (cuda): D (" + std::to_string(a.D) +
                                ") must be a positive multiple of H (" + std::to_string(a.H) + ")");
  if (a.D / a.H > kMaxHeadDim)
    throw std::invalid_argument("windowed attention (cuda): d_h = " + std::to_string(a.D / a.H) +
                                " exceeds the supported maximum " + std::to_string(kMaxHeadDim));
  if (a.window < 1) throw std::invalid_argument("windowed attention (cuda): window must be at least 1");
}

Geometry geometry(const WindowedAttnArgs& a) {
  return Geometry{a.N, a.H, a.D, a.D / a.H, a.window, a.sliding, a.lse_bnh};
}

HyperbolicParams hyperbolic_params(const WindowedAttnArgs& a) {
  if (!a.beta) throw std::invalid_argument("local_attn (cuda): beta is required");
  return HyperbolicParams{a.c, a.c_device, a.beta, a.log_mu, a.alibi, a.N, a.H};
}

DotParams dot_params(const WindowedAttnArgs& a) {
  return DotParams{1.f / std::sqrt(float(a.D / a.H)), a.alibi, a.H};
}

int tiles(int N, int tile) { return (N + tile - 1) / tile; }

// The tiled kernels serve every preset; wider windows and heads (and causal_attn beyond N = 65) stream.
// Their score products q·k (the distances) are 3xTF32 always; the others (P·V, dO·V, Pᵀ·dO, Xᵀ·Q, X·K) are
// 3xTF32 under the fp32 GEMM math and one TF32 pass under tf32/bf16 (fp32_products()).

bool tiled_kernels_apply(const Geometry& geo) { return geo.window <= kTiledMaxWindow && geo.dh <= kTiledMaxHeadDim; }

template <class Params>
void launch_tiled_forward(float* o, float* lse, const float* q, const float* k, const float* v, const Geometry& geo,
                          const Params& params, int B, cudaStream_t stream) {
  const size_t smem = tiled_forward_smem_bytes<typename Params::Score::Token>();
  const dim3 grid(tiles(geo.N, kTiledQueries), geo.H, B);
  with_exactness(fp32_products(), [&](auto exact) {
    auto kernel = attn_forward_tiled_kernel<Params, decltype(exact)::value>;
    prepare_smem(kernel, smem);
    kernel<<<grid, kTiledThreads, smem, stream>>>(o, lse, q, k, v, geo, params);
  });
  MUSE_CUDA_CHECK(cudaGetLastError());
}

template <class Params>
void launch_forward(float* o, float* lse, const float* q, const float* k, const float* v, const Geometry& geo,
                    const Params& params, int B, cudaStream_t stream) {
  if (tiled_kernels_apply(geo)) {
    launch_tiled_forward(o, lse, q, k, v, geo, params, B, stream);
    return;
  }
  using Token = typename Params::Score::Token;
  const size_t smem = forward_smem_bytes<Token>(geo.dh);
  prepare_smem(attn_forward_kernel<Params>, smem);
  const dim3 grid(tiles(geo.N, kFwdTile), geo.H, B);
  attn_forward_kernel<Params><<<grid, kThreads, smem, stream>>>(o, lse, q, k, v, geo, params);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

// Workspace layout: dc and dβ partials (2 per block of whichever backward runs), then, for the tiled
// backward, dq's carry [B, N, D].
size_t param_partials_floats(int B, int H, int N) { return size_t(2) * B * H * tiles(N, kBwdQueryTile); }
static_assert(kBwdQueryTile <= kBwdTiledKeys, "the partials region fits either backward's blocks");

template <class Params>
void launch_tiled_backward(float* dq, float* dk, float* dv, float* dlog_mu, float* partials, float* carry,
                           const float* d_o, const float* o, const float* lse, const float* q, const float* k,
                           const float* v, const Geometry& geo, const Params& params, int B, cudaStream_t stream) {
  const size_t smem = tiled_backward_smem_bytes<typename Params::Score::Token>();
  const dim3 grid(tiles(geo.N, kBwdTiledKeys), geo.H, B);
  with_exactness(fp32_products(), [&](auto exact) {
    auto kernel = attn_backward_tiled_kernel<Params, decltype(exact)::value>;
    prepare_smem(kernel, smem);
    kernel<<<grid, kTiledThreads, smem, stream>>>(dq, carry, dk, dv, dlog_mu, partials, d_o, o, lse, q, k, v, geo,
                                                  params);
  });
  MUSE_CUDA_CHECK(cudaGetLastError());
}

template <class Params>
void launch_backward(float* dq, float* dk, float* dv, float* dc, float* dbeta, float* dlog_mu, const float* d_o,
                     const float* o, const float* lse, const float* q, const float* k, const float* v,
                     const Geometry& geo, const Params& params, int B, float* workspace, cudaStream_t stream) {
  using Token = typename Params::Score::Token;
  const bool want_params = Params::kHasParamGrads && (dc || dbeta);
  if (want_params && !workspace)
    throw std::invalid_argument("local_attn_backward (cuda): dc/dbeta need a workspace");
  float* partials = want_params ? workspace : nullptr;

  // Tiled: one kernel, plus dq's carry and the parameter reduction. It needs the workspace for dq's carry.
  if (tiled_kernels_apply(geo) && (workspace || !dq)) {
    float* carry = dq ? workspace + param_partials_floats(B, geo.H, geo.N) : nullptr;
    launch_tiled_backward(dq, dk, dv, dlog_mu, partials, carry, d_o, o, lse, q, k, v, geo, params, B, stream);
    if (want_params) {
      reduce_param_partials_kernel<<<geo.H + 1, kReduceThreads, 0, stream>>>(dc, dbeta, partials, B, geo.H,
                                                                              tiles(geo.N, kBwdTiledKeys));
      MUSE_CUDA_CHECK(cudaGetLastError());
    }
    if (dq) {
      const int rows = B * geo.N;
      const bool vectors = geo.D % 4 == 0 && reinterpret_cast<uintptr_t>(dq) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(carry) % 16 == 0;
      if (vectors)
        add_dq_carry_kernel<4><<<row_grid(rows, geo.D / 4), kRowGridThreads, 0, stream>>>(dq, carry, geo, rows);
      else
        add_dq_carry_kernel<1><<<row_grid(rows, geo.D), kRowGridThreads, 0, stream>>>(dq, carry, geo, rows);
      MUSE_CUDA_CHECK(cudaGetLastError());
    }
    return;
  }

  if (dq || want_params) {
    const size_t smem = backward_query_smem_bytes<Token>(geo.dh);
    prepare_smem(attn_backward_query_kernel<Params>, smem);
    const dim3 grid(tiles(geo.N, kBwdQueryTile), geo.H, B);
    attn_backward_query_kernel<Params><<<grid, kThreads, smem, stream>>>(dq, partials, d_o, o, lse, q, k, v, geo,
                                                                         params);
    MUSE_CUDA_CHECK(cudaGetLastError());
    if (want_params) {
      reduce_param_partials_kernel<<<geo.H + 1, kReduceThreads, 0, stream>>>(dc, dbeta, partials, B, geo.H,
                                                                              (int)grid.x);
      MUSE_CUDA_CHECK(cudaGetLastError());
    }
  }
  if (dk || dv || dlog_mu) {
    const size_t smem = backward_key_smem_bytes<Token>(geo.dh);
    prepare_smem(attn_backward_key_kernel<Params>, smem);
    const dim3 grid(tiles(geo.N, kBwdKeyTile), geo.H, B);
    attn_backward_key_kernel<Params><<<grid, kThreads, smem, stream>>>(dk, dv, dlog_mu, d_o, o, lse, q, k, v, geo,
                                                                       params);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace

void windowed_attn_forward(float* o, float* lse, const float* q, const float* k, const float* v,
                           const WindowedAttnArgs& args, cudaStream_t stream) {
  validate(args);
  if (args.B == 0 || args.N == 0) return;
  const Geometry geo = geometry(args);
  if (args.score == AttnScore::hyperbolic)
    launch_forward(o, lse, q, k, v, geo, hyperbolic_params(args), args.B, stream);
  else
    launch_forward(o, lse, q, k, v, geo, dot_params(args), args.B, stream);
}

size_t windowed_attn_workspace_floats(const WindowedAttnArgs& args) {
  if (args.B <= 0 || args.N <= 0 || args.H <= 0) return 0;
  const size_t partials = param_partials_floats(args.B, args.H, args.N);
  if (args.D % args.H != 0 || !tiled_kernels_apply(geometry(args))) return partials;
  return partials + size_t(args.B) * args.N * args.D;
}

void windowed_attn_backward(float* dq, float* dk, float* dv, float* dc, float* dbeta, float* dlog_mu,
                            const float* d_o, const float* o, const float* lse, const float* q, const float* k,
                            const float* v, const WindowedAttnArgs& args, float* workspace, cudaStream_t stream) {
  validate(args);
  if (args.B == 0 || args.N == 0) return;
  const Geometry geo = geometry(args);
  if (args.score == AttnScore::hyperbolic) {
    if (!args.log_mu) dlog_mu = nullptr;
    launch_backward(dq, dk, dv, dc, dbeta, dlog_mu, d_o, o, lse, q, k, v, geo, hyperbolic_params(args), args.B,
                    workspace, stream);
  } else {
    launch_backward(dq, dk, dv, nullptr, nullptr, nullptr, d_o, o, lse, q, k, v, geo, dot_params(args), args.B,
                    nullptr, stream);
  }
}

}  // namespace detail

namespace {

detail::WindowedAttnArgs local_args(float c, const float* c_device, const float* beta, const float* log_mu,
                                    const LocalAttnConfig& cfg) {
  detail::WindowedAttnArgs a;
  a.score = detail::AttnScore::hyperbolic;
  a.B = cfg.B;
  a.N = cfg.N;
  a.H = cfg.H;
  a.D = cfg.D;
  a.window = cfg.window;
  a.sliding = cfg.sliding;
  a.alibi = cfg.alibi;
  a.lse_bnh = true;
  a.c = c;
  a.c_device = c_device;
  a.beta = beta;
  a.log_mu = log_mu;
  return a;
}

}  // namespace

void local_attn_forward(float* o, float* lse, const float* q, const float* k, const float* v, float c,
                        const float* beta, const float* log_mu, const LocalAttnConfig& cfg, cudaStream_t stream) {
  detail::windowed_attn_forward(o, lse, q, k, v, local_args(c, nullptr, beta, log_mu, cfg), stream);
}

void local_attn_forward(float* o, float* lse, const float* q, const float* k, const float* v, const float* c,
                        const float* beta, const float* log_mu, const LocalAttnConfig& cfg, cudaStream_t stream) {
  detail::windowed_attn_forward(o, lse, q, k, v, local_args(0.f, c, beta, log_mu, cfg), stream);
}

size_t local_attn_backward_workspace_floats(const LocalAttnConfig& cfg) {
  return detail::windowed_attn_workspace_floats(local_args(1.f, nullptr, nullptr, nullptr, cfg));
}

void local_attn_backward(float* dq, float* dk, float* dv, float* dc, float* dbeta, float* dlog_mu, const float* d_o,
                         const float* o, const float* lse, const float* q, const float* k, const float* v, float c,
                         const float* beta, const float* log_mu, const LocalAttnConfig& cfg, float* workspace,
                         cudaStream_t stream) {
  detail::windowed_attn_backward(dq, dk, dv, dc, dbeta, dlog_mu, d_o, o, lse, q, k, v,
                                 local_args(c, nullptr, beta, log_mu, cfg), workspace, stream);
}

void local_attn_backward(float* dq, float* dk, float* dv, float* dc, float* dbeta, float* dlog_mu, const float* d_o,
                         const float* o, const float* lse, const float* q, const float* k, const float* v,
                         const float* c, const float* beta, const float* log_mu, const LocalAttnConfig& cfg,
                         float* workspace, cudaStream_t stream) {
  detail::windowed_attn_backward(dq, dk, dv, dc, dbeta, dlog_mu, d_o, o, lse, q, k, v,
                                 local_args(0.f, c, beta, log_mu, cfg), workspace, stream);
}

}  // namespace muse::cuda
