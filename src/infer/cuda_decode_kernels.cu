#include "infer/cuda_decode_kernels.cuh"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/cuda_check.cuh"
#include "common/math.h"
#include "ops/bk.h"
#include "ops/ffn.h"
#include "ops/hybrid.h"
#include "ops/layernorm.h"
#include "ops/linear_attn.h"
#include "ops/poincare.h"
#include "ops/ssm.h"

namespace muse::cuda::decode {

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * kWarp;
constexpr int kMixerThreads = 128;
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

// One row x[0, D) in shared memory, owned by one warp, is replaced by LN(x)·gain + bias as ops/layernorm.cpp
// computes it: the mean, then the variance of x − mean. Returns Σx² of the input (for the radius δ).
__device__ float warp_layernorm(float* x, const float* gain, const float* bias, int D) {
  const int lane = threadIdx.x % kWarp;
  float sum = 0.f, squares = 0.f;
  for (int i = lane; i < D; i += kWarp) {
    sum += x[i];
    squares += x[i] * x[i];
  }
  const float mean = warp_sum(sum) / float(D);
  float var = 0.f;
  for (int i = lane; i < D; i += kWarp) {
    const float d = x[i] - mean;
    var += d * d;
  }
  const float rstd = 1.f / sqrtf(warp_sum(var) / float(D) + float(kLayerNormEps));
  warp_row_pass(
      D, [&](int i) { return (x[i] - mean) * rstd * __ldg(gain + i) + __ldg(bias + i); },
      [&](int i, float v) { x[i] = v; });
  return warp_sum(squares);
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
  const int per_slice = (units + plan.split - 1) / plan.split;
  begin = min(units, slice * per_slice);
  end = min(units, begin + per_slice);
}

__device__ __forceinline__ float finish_output(const GemvSegment& seg, float acc, int row, int j) {
  float y = acc;
  if (seg.bias) y += seg.bias[j];
  if (seg.epilogue == Epilogue::relu)
    y = y > 0.f ? y : 0.f;
  else if (seg.epilogue == Epilogue::gelu_cap10)
    y = cap(gelu(y), float(kFfnCap));
  if (seg.residual) y += seg.residual[size_t(row) * seg.out + j];
  return y;
}

// Weights do not depend on earlier kernels: before waiting for them, each warp asks L2 for the weight
// bytes of its first output, so the GEMV starts on L2 hits.
__device__ void prefetch_first_tile(const GemvPlan& plan) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int per_tile = kGemvWarps / plan.split;
  const int o = blockIdx.x * per_tile + warp / plan.split;
  if (o >= plan.total) return;
  int j = 0;
  const int seg = segment_of(plan, o, j);
  int begin = 0, end = 0;
  slice_range(plan, warp % plan.split, begin, end);
  const int unit_bytes = plan.vec4 ? 16 : 4;
  const char* row = reinterpret_cast<const char*>(plan.segments[seg].W + size_t(j) * plan.K);
  for (int at = begin * unit_bytes + lane * 128; at < end * unit_bytes; at += kWarp * 128) prefetch_l2(row + at);
}

// The plan's outputs for rows [row0, row0 + rows) (rows ≤ kRowsPerChunk) of x [rows, K] (shared or global
// memory). Tiles of kGemvWarps / split outputs go round the grid's blocks; in a tile, warp w computes output
// tile·(kGemvWarps / split) + w / split over K-slice w % split, and the slices' sums are added in slice
// order. partial: shared [kGemvWarps][kRowsPerChunk].
template <bool kVec4>
__device__ void run_gemv(const GemvPlan& plan, const float* x, int rows, int row0,
                         float (*partial)[kRowsPerChunk]) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int split = plan.split, per_tile = kGemvWarps / split, slice = warp % split;
  const int tiles = (plan.total + per_tile - 1) / per_tile;
  const int K = plan.K, units = kVec4 ? K / 4 : K;
  int begin = 0, end = 0;
  slice_range(plan, slice, begin, end);
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int o = tile * per_tile + warp / split;
    const bool active = o < plan.total;
    float acc[kRowsPerChunk];
#pragma unroll
    for (int r = 0; r < kRowsPerChunk; ++r) acc[r] = 0.f;
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
          for (int r = 0; r < kRowsPerChunk; ++r)
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
          for (int r = 0; r < kRowsPerChunk; ++r)
            if (r < rows) acc[r] += wv * x[size_t(r) * K + i];
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerChunk; ++r)
        if (r < rows) acc[r] = warp_sum(acc[r]);
    }
    if (split == 1) {
      if (active) {
        const GemvSegment& s = plan.segments[seg];
#pragma unroll
        for (int r = 0; r < kRowsPerChunk; ++r)
          if (r < rows && lane == r) s.y[size_t(row0 + r) * s.out + j] = finish_output(s, acc[r], row0 + r, j);
      }
    } else {
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < kRowsPerChunk; ++r) partial[warp][r] = acc[r];
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

// ---- kernels --------------------------------------------------------------------------------------------

template <bool kVec4>
__global__ void __launch_bounds__(kGemvThreads, kGemvBlocksPerSm)
    gemv_kernel(const float* x, int count, const __grid_constant__ GemvPlan plan) {
  __shared__ float partial[kGemvWarps][kRowsPerChunk];
  prefetch_first_tile(plan);
  wait_for_previous_kernel();
  allow_next_kernel();
  const int row0 = blockIdx.y * kRowsPerChunk, rows = min(kRowsPerChunk, count - row0);
  run_gemv<kVec4>(plan, x + size_t(row0) * plan.K, rows, row0, partial);
}

template <bool kVec4>
__global__ void __launch_bounds__(kGemvThreads, kGemvBlocksPerSm)
    block_input_kernel(StepRows rows, float* h_in, Embedding embedding, const __grid_constant__ BlockArgs b,
                       StepBuffers s, const __grid_constant__ GemvPlan plan) {
  extern __shared__ float x[];  // [rows of the chunk, D]: u
  __shared__ float partial[kGemvWarps][kRowsPerChunk];
  prefetch_first_tile(plan);
  wait_for_previous_kernel();
  allow_next_kernel();
  const int D = b.D, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int row0 = blockIdx.y * kRowsPerChunk, n = min(kRowsPerChunk, rows.count - row0);
  // Every block normalises its rows for its own GEMV; block 0 also writes what later kernels read.
  const bool writer = blockIdx.x == 0;
  if (warp < n) {
    const int r = row0 + warp, stream = rows.streams[r], position = rows.positions[stream];
    float* xr = x + size_t(warp) * D;
    float* hr = h_in + size_t(r) * D;
    if (embedding.E) {
      const float* e = embedding.E + size_t(rows.tokens[r]) * D;
      const float* p = embedding.positions ? embedding.positions + size_t(position) * D : nullptr;
      warp_row_pass(
          D, [&](int i) { return p ? __ldg(e + i) + __ldg(p + i) : __ldg(e + i); },
          [&](int i, float v) {
            xr[i] = v;
            if (writer) hr[i] = v;
          });
    } else {
      warp_row_pass(D, [&](int i) { return hr[i]; }, [&](int i, float v) { xr[i] = v; });
    }
    const float squares = warp_layernorm(xr, b.ln_gain, b.ln_bias, D);
    if (writer) {
      float* ur = s.u + size_t(r) * D;
      warp_row_pass(D, [&](int i) { return xr[i]; }, [&](int i, float v) { ur[i] = v; });
      if (lane == 0) s.delta[r] = 2.f * sqrtf(squares) / sqrtf(float(D));
    }
  }
  __syncthreads();
  run_gemv<kVec4>(plan, x, n, row0, partial);
}

// The BK step of one row (ops/bk.cpp's bk_decode_step) from the block_input GEMV's v_pre = w_v·u + b_v and
// the two halves of w_J·u, and g_{t−1}, w_J,prev·u_{t−1} of the state slot of this position's parity.
struct BkStep {
  float g_re, g_im;
  float F[3];       // (η Re g, η Im g, η |g|)
  float prev_half;  // w_J,prev·u_t: the next position's share of its bond (0 without hopping)
};

__device__ BkStep bk_step(const BlockArgs& b, const StepBuffers& s, int r, int stream, int position) {
  const bool hopping = b.hopping;
  const float eta = softplus(b.bk_eps_p[0]) + float(kBkEtaFloor);
  float d_re = (1.f + cap(s.bk_v[r], kPotentialCap)) - (hopping ? b.bk_E0[0] : 0.f);
  float d_im = -eta;
  BkStep step;
  step.prev_half = 0.f;
  if (hopping) {
    const float* previous = b.state.bk + size_t(stream) * b.state.stream_floats + (position % 2) * 4;
    const float J = b.j_max * tanhf(s.bk_J[2 * r + 1] + b.bk_b_J[0] + previous[2]);
    d_re -= (J * J) * previous[0];
    d_im -= (J * J) * previous[1];
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

// Σ of v over the mixer's block (every thread gets it). scratch: kMixerWarps floats of shared memory.
__device__ float block_sum(float v, float* scratch) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kMixerWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Windowed hyperbolic attention of head h for row r (ops/local_attn.cpp's decode push and step), then the
// linear-attention update and the curvature mix (ops/linear_attn.cpp, ops/hybrid.cpp), into s.mixed.
__device__ void attention_head(const BlockArgs& b, const StepBuffers& s, int r, int stream, int position, int h,
                               const float* F, float* smem) {
  const int D = b.D, H = b.H, W = b.W, dh = D / H, tid = threadIdx.x;
  float* q = smem;                 // [dh]
  float* scores = q + dh;          // [W]
  float* phi_k = scores + W;       // [dh]
  float* phi_q = phi_k + dh;       // [dh]
  float* z_new = phi_q + dh;       // [dh]
  float* o_local = z_new + dh;     // [dh]
  float* o_linear = o_local + dh;  // [dh]
  float* scratch = o_linear + dh;  // [kMixerWarps]
  float* S_old = scratch + kMixerWarps;  // [dh, dh] linear-attention state before this token
  const LayerState& st = b.state;
  const size_t at = size_t(stream) * st.stream_floats;
  float* keys = st.keys + at;
  float* values = st.values + at;
  float* key_norms = st.key_norms + at;
  float* ring_log_mu = st.log_mu ? st.log_mu + at : nullptr;

  const float c = curvature_of(b.c_raw[0]), sqrt_c = sqrtf(c);
  float mu = 1.f, log_mu = 0.f;
  if (b.key_gate_w) {
    const float* w = b.key_gate_w + 3 * h;
    mu = sigmoid(w[0] * F[0] + w[1] * F[1] + w[2] * F[2] + b.key_gate_b[h]);
    log_mu = logf(mu);
  }
  const float* qh = s.q + size_t(r) * D + h * dh;
  const float* kh = s.k + size_t(r) * D + h * dh;
  const float* vh = s.v + size_t(r) * D + h * dh;

  // Push: the new key and value go to slot position % W, which holds a key no query from here on sees.
  const int slot = position % W;
  float q_squares = 0.f, k_squares = 0.f;
  for (int e = tid; e < dh; e += blockDim.x) {
    const float qe = qh[e], ke = kh[e];
    q[e] = qe;
    q_squares += qe * qe;
    k_squares += ke * ke;
    keys[size_t(slot) * D + h * dh + e] = ke;
    values[size_t(slot) * D + h * dh + e] = vh[e];
  }
  q_squares = block_sum(q_squares, scratch);
  k_squares = block_sum(k_squares, scratch);
  const TangentNorm<float> q_norm = tangent_norm_from_squared(q_squares, sqrt_c);
  if (tid == 0) {
    const TangentNorm<float> k_norm = tangent_norm_from_squared(k_squares, sqrt_c);
    reinterpret_cast<float4*>(key_norms)[slot * H + h] = make_float4(k_norm.norm, k_norm.a, k_norm.ls2a, k_norm.coth2a);
    if (ring_log_mu) ring_log_mu[slot * H + h] = log_mu;
  }
  __syncthreads();  // the new key is in the ring

  // Scores of the window's keys, one thread per key, oldest first.
  const int first = b.sliding ? max(0, position - W + 1) : position - position % W;
  const int n = position - first + 1;
  const float temperature = softplus(b.beta[h]);
  const float slope = b.alibi_slopes ? b.alibi_slopes[h] : 0.f;
  for (int m = tid; m < n; m += blockDim.x) {
    const int j = first + m, key_slot = j % W;
    const float* kj = keys + size_t(key_slot) * D + h * dh;
    float dot = 0.f;
    if (dh % 4 == 0) {
      const float4* k4 = reinterpret_cast<const float4*>(kj);
      const float4* q4 = reinterpret_cast<const float4*>(q);
      for (int e = 0; e < dh / 4; ++e) {
        const float4 kv = k4[e], qv = q4[e];
        dot += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
      }
    } else {
      for (int e = 0; e < dh; ++e) dot += q[e] * kj[e];
    }
    const float4 norms = reinterpret_cast<const float4*>(key_norms)[key_slot * H + h];
    const TangentNorm<float> k_norm{norms.x, norms.y, norms.z, norms.w, false};
    const float rho = scaled_distance(q_norm, k_norm, dot);
    float score = -temperature * rho / sqrt_c - slope * float(position - j);
    if (ring_log_mu) score += ring_log_mu[key_slot * H + h];
    scores[m] = score;
  }
  __syncthreads();
  float max_score = -INFINITY;
  for (int m = 0; m < n; ++m) max_score = fmaxf(max_score, scores[m]);
  __syncthreads();  // every thread has read the scores before they become weights
  for (int m = tid; m < n; m += blockDim.x) scores[m] = expf(scores[m] - max_score);
  __syncthreads();
  float sum = 0.f;
  for (int m = 0; m < n; ++m) sum += scores[m];
  for (int e = tid; e < dh; e += blockDim.x) {
    float acc = 0.f;
#pragma unroll 4
    for (int m = 0; m < n; ++m) acc += scores[m] * values[size_t((first + m) % W) * D + h * dh + e];
    o_local[e] = acc / sum;
  }

  float* mixed = s.mixed + size_t(r) * D + h * dh;
  if (!b.linear_attn) {
    for (int e = tid; e < dh; e += blockDim.x) mixed[e] = o_local[e];
    return;
  }

  // Linear attention: S += φ̃(k)vᵀ, z += φ̃(k), o = Sᵀφ(q) / max(zᵀφ(q), floor), rows of S in order. S comes
  // into shared memory in one batch of loads, so the update below streams its stores without waiting.
  const float scale = 1.f / sqrtf(float(dh));
  float* S = st.lin_S + at + size_t(h) * dh * dh;
  float* z = st.lin_z + at + size_t(h) * dh;
  batched_pass<16>(dh * dh, tid, blockDim.x, [&](int i) { return S[i]; }, [&](int i, float v) { S_old[i] = v; });
  for (int e = tid; e < dh; e += blockDim.x) {
    phi_k[e] = mu * linear_feature(kh[e], scale);
    phi_q[e] = linear_feature(q[e], scale);
  }
  __syncthreads();
  constexpr int kRows = 8;
  for (int col = tid; col < dh; col += blockDim.x) {
    const float v_col = vh[col];
    float out = 0.f;
    for (int row0 = 0; row0 < dh; row0 += kRows) {
      float updated[kRows], weight[kRows];
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        const int row = row0 + k;
        updated[k] = row < dh ? S_old[size_t(row) * dh + col] + phi_k[row] * v_col : 0.f;
        weight[k] = row < dh ? phi_q[row] : 0.f;
      }
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        const int row = row0 + k;
        if (row < dh) {
          S[size_t(row) * dh + col] = updated[k];
          out += weight[k] * updated[k];
        }
      }
    }
    o_linear[col] = out;
  }
  for (int e = tid; e < dh; e += blockDim.x) {
    z_new[e] = z[e] + phi_k[e];
    z[e] = z_new[e];
  }
  __syncthreads();
  float zeta = 0.f;
  for (int e = 0; e < dh; ++e) zeta += z_new[e] * phi_q[e];
  const float inv_denominator = 1.f / fmaxf(zeta, float(kLinearAttnDenominatorFloor));
  // Without the curvature mix the paths are averaged: α(0.55) = 1/2.
  const float mix_c = b.curvature_mix ? c : float(kCurvatureMixCentre);
  const float alpha = sigmoid(float(kCurvatureMixSlope) * (mix_c - float(kCurvatureMixCentre)));
  const float rest = 1.f - alpha;
  for (int e = tid; e < dh; e += blockDim.x) mixed[e] = alpha * o_local[e] + rest * (o_linear[e] * inv_denominator);
}

// The AR-SSM step of row r (ops/ssm.cpp's ssm_decode_step) from the block_input GEMV's ReLU(W₁u + b₁), W_U u
// and W_V u: gate χ, rank mask, scan, readout, W_O, causal conv, into s.y_glob.
__device__ void ssm_step(const BlockArgs& b, const StepBuffers& s, int r, int stream, const float* F, float* smem) {
  const int D = b.D, R = b.R, G = D / 4, tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  float* chi = smem;             // [R]
  float* readout = chi + R;      // [R]
  float* omega = readout + R;    // [1]
  const size_t at = size_t(stream) * b.state.stream_floats;
  const float* u = s.u + size_t(r) * D;
  const float* hidden = s.ssm_hidden + size_t(r) * G;
  const float* proj_u = s.proj_u + size_t(r) * R;
  const float* proj_v = s.proj_v + size_t(r) * R;

  // χ = σ(W₂·hidden + b₂): `group` lanes per gate row (a power of two, so a row's lanes share a warp), all
  // R rows at once when R·group fits the block; the row loop's trip count is the same for every thread.
  int group = kWarp;
  while (group > 1 && group * R > int(blockDim.x)) group /= 2;
  const int rows_per_pass = blockDim.x / group, sub = tid % group;
  for (int base = 0; base < R; base += rows_per_pass) {
    const int i = base + tid / group;
    float dot = 0.f;
    if (i < R)
      for (int e = sub; e < G; e += group) dot += __ldg(b.ssm_w2 + size_t(i) * G + e) * hidden[e];
    for (int offset = group / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(kFull, dot, offset);
    if (i < R && sub == 0) chi[i] = sigmoid(dot + b.ssm_b2[i]);
  }
  const bool mask = b.rank_w1 != nullptr;
  if (mask && warp == 0) {
    // ω = σ(MLP_r(δ))·σ(w_π·F + b_π): lane k holds hidden unit k of MLP_r.
    const float delta = s.delta[r];
    const float unit = b.rank_w2[lane] * gelu(b.rank_w1[lane] * delta + b.rank_b1[lane]);
    const float mlp = b.rank_b2[0] + warp_sum(unit);
    if (lane == 0)
      omega[0] = sigmoid(mlp) * sigmoid(b.pi_w[0] * F[0] + b.pi_w[1] * F[1] + b.pi_w[2] * F[2] + b.pi_b[0]);
  }
  __syncthreads();
  float* S = b.state.ssm_S + at;
  for (int i = tid; i < R; i += blockDim.x) {
    float gate = chi[i];
    if (mask)
      gate *= sigmoid(kMaskSlope * (float(kSsmRankMin) + omega[0] * float(R - kSsmRankMin) - float(i) - 0.5f));
    const float scan_in = proj_u[i] * gate;
    // λ = σ(ℓ) and 1 − λ = σ(−ℓ) (Phase 8); Phase 7 has no ℓ and sums.
    const float state = b.ssm_ell ? sigmoid(b.ssm_ell[i]) * S[i] + sigmoid(-b.ssm_ell[i]) * scan_in : S[i] + scan_in;
    S[i] = state;
    readout[i] = state * (proj_v[i] * gate);
  }
  __syncthreads();
  // y = W_O·readout + b_O + (w₀⊙u_{t−2} + w₁⊙u_{t−1}) + w₂⊙u_t, and the conv tail moves on; every load of
  // a batch of kUnroll channels comes before its stores.
  constexpr int kUnroll = 4;
  float* tail = b.state.conv_tail + at;
  float* y_glob = s.y_glob + size_t(r) * D;
  const float* w0 = b.conv;
  const float* w1 = b.conv + D;
  const float* w2 = b.conv + 2 * D;
  for (int base = tid; base < D; base += blockDim.x * kUnroll) {
    float y[kUnroll], u_now[kUnroll], u_prev[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int d = base + k * blockDim.x;
      if (d >= D) continue;
      const float* wo = b.ssm_w_o + size_t(d) * R;
      float acc = 0.f;
      for (int i = 0; i < R; ++i) acc += __ldg(wo + i) * readout[i];
      u_now[k] = u[d];
      u_prev[k] = tail[D + d];
      y[k] = acc + __ldg(b.ssm_b_o + d);
      y[k] += (__ldg(w0 + d) * tail[d] + __ldg(w1 + d) * u_prev[k]) + __ldg(w2 + d) * u_now[k];
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int d = base + k * blockDim.x;
      if (d >= D) continue;
      y_glob[d] = y[k];
      tail[d] = u_prev[k];
      tail[D + d] = u_now[k];
    }
  }
}

// Blocks (h < H, r): attention head h of row r; blocks (H, r): the AR-SSM of row r. Every block runs the BK
// step of its row (a few scalar operations; the key gate and the rank mask need F); the SSM block records g
// and F for the residual mix and writes the BK state of the next position (the current one's slot, which
// the other blocks read, stays as it is). Each block owns its slices of the stream's state (head h's ring
// columns, norms and linear state; the SSM's), so no two blocks write the same state.
__global__ void __launch_bounds__(kMixerThreads) mixer_kernel(StepRows rows, const __grid_constant__ BlockArgs b,
                                                              StepBuffers s) {
  extern __shared__ float smem[];
  wait_for_previous_kernel();
  allow_next_kernel();
  const int r = blockIdx.y, stream = rows.streams[r], position = rows.positions[stream];
  const BkStep bk = bk_step(b, s, r, stream, position);
  if (int(blockIdx.x) < b.H) {
    attention_head(b, s, r, stream, position, blockIdx.x, bk.F, smem);
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
  ssm_step(b, s, r, stream, bk.F, smem);
}

template <bool kVec4>
__global__ void __launch_bounds__(kGemvThreads, kGemvBlocksPerSm)
    residual_mix_kernel(int count, const float* h_in, float* h_mid, const __grid_constant__ BlockArgs b,
                        StepBuffers s, const __grid_constant__ GemvPlan plan) {
  extern __shared__ float x[];  // [rows of the chunk, D]: h_mid, then LN_ffn(h_mid)
  __shared__ float partial[kGemvWarps][kRowsPerChunk];
  prefetch_first_tile(plan);
  wait_for_previous_kernel();
  allow_next_kernel();
  const int D = b.D, warp = threadIdx.x / kWarp;
  const int row0 = blockIdx.y * kRowsPerChunk, n = min(kRowsPerChunk, count - row0);
  if (warp < n) {
    const int r = row0 + warp;
    float* xr = x + size_t(warp) * D;
    const float* F = s.F + 3 * r;
    const float xi = b.phase8 ? sigmoid(b.xi_w[0] * F[0] + b.xi_w[1] * F[1] + b.xi_w[2] * F[2] + b.xi_b[0])
                              : sigmoid(b.xi_s[0] * fabsf(s.g[2 * r + 1]));
    const float rest = 1.f - xi;
    const float* y_att = s.y_att + size_t(r) * D;
    const float* y_glob = s.y_glob + size_t(r) * D;
    warp_row_pass(
        D, [&](int i) { return cap(xi * y_att[i] + rest * y_glob[i], float(kResidualCap)); },
        [&](int i, float v) { xr[i] = v; });
    warp_layernorm(xr, b.ln_h_gain, b.ln_h_bias, D);
    const float* hr = h_in + size_t(r) * D;
    float* mid = h_mid + size_t(r) * D;
    warp_row_pass(
        D, [&](int i) { return hr[i] + xr[i]; },
        [&](int i, float v) {
          xr[i] = v;
          if (blockIdx.x == 0) mid[i] = v;
        });
    if (b.ln_ffn_gain) warp_layernorm(xr, b.ln_ffn_gain, b.ln_ffn_bias, D);
  }
  __syncthreads();
  run_gemv<kVec4>(plan, x, n, row0, partial);
}

template <bool kVec4>
__global__ void __launch_bounds__(kGemvThreads, kGemvBlocksPerSm)
    head_kernel(StepRows rows, const float* h, const float* gain, const float* bias, int D,
                const __grid_constant__ GemvPlan plan) {
  extern __shared__ float x[];  // [rows of the chunk, D]: LN_final(h)
  __shared__ float partial[kGemvWarps][kRowsPerChunk];
  prefetch_first_tile(plan);
  wait_for_previous_kernel();
  allow_next_kernel();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int row0 = blockIdx.y * kRowsPerChunk, n = min(kRowsPerChunk, rows.count - row0);
  if (warp < n) {
    const int r = row0 + warp;
    float* xr = x + size_t(warp) * D;
    const float* hr = h + size_t(r) * D;
    warp_row_pass(D, [&](int i) { return hr[i]; }, [&](int i, float v) { xr[i] = v; });
    warp_layernorm(xr, gain, bias, D);
    // No kernel of this step reads a position after this one starts.
    if (blockIdx.x == 0 && lane == 0) rows.positions[rows.streams[r]] += 1;
  }
  __syncthreads();
  run_gemv<kVec4>(plan, x, n, row0, partial);
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
  const int per_tile = kGemvWarps / plan.split;
  const int tiles = (plan.total + per_tile - 1) / per_tile;
  return std::max(1, std::min(tiles, max_blocks));
}

size_t prologue_bytes(int D) { return size_t(kRowsPerChunk) * D * sizeof(float); }


void allow_shared(const void* kernel, size_t bytes) {
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
  return p;
}

size_t mixer_shared_bytes(int D, int H, int W, int R, bool linear_attn) {
  const size_t dh = D / H;
  const size_t attention = 6 * dh + W + kMixerWarps + (linear_attn ? dh * dh : 0);
  return std::max(attention, size_t(2 * R + 1)) * sizeof(float);
}

void configure_kernels(int D, int H, int W, int R, bool linear_attn) {
  const size_t prologue = prologue_bytes(D);
  for (const void* k : {reinterpret_cast<const void*>(&block_input_kernel<true>),
                        reinterpret_cast<const void*>(&block_input_kernel<false>),
                        reinterpret_cast<const void*>(&residual_mix_kernel<true>),
                        reinterpret_cast<const void*>(&residual_mix_kernel<false>),
                        reinterpret_cast<const void*>(&head_kernel<true>),
                        reinterpret_cast<const void*>(&head_kernel<false>)})
    allow_shared(k, prologue);
  allow_shared(reinterpret_cast<const void*>(&mixer_kernel), mixer_shared_bytes(D, H, W, R, linear_attn));
}

void block_input(const StepRows& rows, float* h_in, const Embedding* embedding, const BlockArgs& b,
                 const StepBuffers& s, const GemvPlan& plan, int max_blocks, bool overlap, cudaStream_t stream) {
  const dim3 grid(gemv_blocks(plan, max_blocks), chunks(rows.count));
  const Embedding e = embedding ? *embedding : Embedding{};
  launch(plan.vec4 ? &block_input_kernel<true> : &block_input_kernel<false>, grid, dim3(kGemvThreads),
         prologue_bytes(b.D), overlap, stream, rows, h_in, e, b, s, plan);
}

void mixer(const StepRows& rows, const BlockArgs& b, const StepBuffers& s, bool overlap, cudaStream_t stream) {
  launch(&mixer_kernel, dim3(b.H + 1, rows.count), dim3(kMixerThreads),
         mixer_shared_bytes(b.D, b.H, b.W, b.R, b.linear_attn), overlap, stream, rows, b, s);
}

void gemv(const float* x, int count, const GemvPlan& plan, int max_blocks, bool overlap, cudaStream_t stream) {
  const dim3 grid(gemv_blocks(plan, max_blocks), chunks(count));
  launch(plan.vec4 ? &gemv_kernel<true> : &gemv_kernel<false>, grid, dim3(kGemvThreads), 0, overlap, stream, x,
         count, plan);
}

void residual_mix(int count, const float* h_in, float* h_mid, const BlockArgs& b, const StepBuffers& s,
                  const GemvPlan& plan, int max_blocks, bool overlap, cudaStream_t stream) {
  const dim3 grid(gemv_blocks(plan, max_blocks), chunks(count));
  launch(plan.vec4 || plan.count == 0 ? &residual_mix_kernel<true> : &residual_mix_kernel<false>, grid,
         dim3(kGemvThreads), prologue_bytes(b.D), overlap, stream, count, h_in, h_mid, b, s, plan);
}

void head(const StepRows& rows, const float* h, const float* gain, const float* bias, int D, const GemvPlan& plan,
          int max_blocks, bool overlap, cudaStream_t stream) {
  const dim3 grid(gemv_blocks(plan, max_blocks), chunks(rows.count));
  launch(plan.vec4 ? &head_kernel<true> : &head_kernel<false>, grid, dim3(kGemvThreads), prologue_bytes(D), overlap,
         stream, rows, h, gain, bias, D, plan);
}

}  // namespace muse::cuda::decode
