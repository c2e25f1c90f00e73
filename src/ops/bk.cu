// CUDA BK-Core: causal Green recurrence, features, the BK layer and the feature gates (see bk.cuh and
// docs/kernels/bk_ssm_hybrid.md). fp32 storage and arithmetic.
#include <algorithm>

#include "common/column_reduce.cuh"
#include "common/cuda_check.cuh"
#include "common/math.h"
#include "common/row_grid.cuh"
#include "ops/bk.cuh"

namespace muse::cuda {

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr float kPotentialCap = 5.0f;  // v = cap_5(w_v·u + b_v), as ops/bk.cpp
constexpr int kRowWarps = 8;           // warps per block for one-warp-per-row kernels
constexpr int kReduceThreads = 256;    // block size of the first stage of the scalar reductions
constexpr int kReduceMaxBlocks = 256;  // fixed upper bound of its grid (the grid depends on rows only)
constexpr int kLayerScanMaxSegments = 32;  // warps of the layer scan's block (segments of the sequence)

int ceil_div(long a, long b) { return int((a + b - 1) / b); }

// Grid of the first reduction stage over `rows` items: depends on rows only, so the partial sums and their
// fixed-order combination are the same on every run.
int reduce_blocks(long rows) { return std::max(1, std::min<int>(ceil_div(rows, kReduceThreads), kReduceMaxBlocks)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFull, v, offset);
  return v;
}

// Sum over a block of kReduceThreads threads in a fixed order; the result is valid in thread 0.
// `scratch` holds kReduceThreads / 32 floats. Every thread of the block must call it.
__device__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // a previous call may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float s = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kReduceThreads / kWarp; ++w) s += scratch[w];
  return s;
}

// Second stage: out[0] += scale·Σ_i partial[i·stride] over i < count, in a fixed order (one warp: strided
// lane sums, then the butterfly). Launch with one warp.
__global__ void finish_sum_kernel(float* out, const float* partial, int count, int stride, float scale) {
  float s = 0;
  for (int i = threadIdx.x; i < count; i += kWarp) s += partial[(long)i * stride];
  s = warp_sum(s);
  if (threadIdx.x == 0) out[0] += scale * s;
}

struct Complex {
  float re, im;
};

__device__ __forceinline__ Complex cmul(Complex a, Complex b) { return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re}; }
__device__ __forceinline__ Complex conj(Complex a) { return {a.re, -a.im}; }
// 1/x as ops/bk.cpp writes it: conj(x)/|x|², |x| ≥ η > 0.
__device__ __forceinline__ Complex reciprocal(float re, float im) {
  const float n = re * re + im * im;
  return {re / n, -im / n};
}
__device__ __forceinline__ Complex load_complex(const float* p, long i) { return {p[2 * i], p[2 * i + 1]}; }
__device__ __forceinline__ void store_complex(float* p, long i, Complex x) {
  p[2 * i] = x.re;
  p[2 * i + 1] = x.im;
}

__device__ __forceinline__ float eta_from(const float* eps_p) { return softplus(eps_p[0]) + float(kBkEtaFloor); }

// The causal recurrence over one chunk of ≤ 32 steps, run by a whole warp: lane j holds d_re = a_j − E0 and
// the bond J2_j (0 at t = 0 or without hopping) of step t0 + j; every lane runs the same recurrence on
// broadcast values (no divergence) and lane j keeps g_{t0+j}. `previous` carries g_{t0−1} in and g of the
// chunk's last step out (identical in every lane).
__device__ __forceinline__ Complex scan_chunk(float d_re, float j2, float eta, int count, Complex& previous) {
  const int lane = threadIdx.x % kWarp;
  Complex mine = {0.f, 0.f};
  for (int j = 0; j < count; ++j) {
    const float dj = __shfl_sync(kFull, d_re, j);
    const float bj = __shfl_sync(kFull, j2, j);
    previous = reciprocal(dj - bj * previous.re, -eta - bj * previous.im);
    if (lane == j) mine = previous;
  }
  return mine;
}

// The reverse (adjoint) recurrence over one chunk: lane j holds ḡ_j and k_j = conj(J2_{j+1}·g_{j+1}²) (0 at
// the last step or without hopping); λ_j = ḡ_j + k_j·λ_{j+1}. `lambda` carries λ of the step after the
// chunk in and λ of the chunk's first step out.
__device__ __forceinline__ Complex adjoint_chunk(Complex gbar, Complex k, int count, Complex& lambda) {
  const int lane = threadIdx.x % kWarp;
  Complex mine = {0.f, 0.f};
  for (int j = count - 1; j >= 0; --j) {
    const Complex gj = {__shfl_sync(kFull, gbar.re, j), __shfl_sync(kFull, gbar.im, j)};
    const Complex kj = {__shfl_sync(kFull, k.re, j), __shfl_sync(kFull, k.im, j)};
    const Complex kl = cmul(kj, lambda);
    lambda = {gj.re + kl.re, gj.im + kl.im};
    if (lane == j) mine = lambda;
  }
  return mine;
}

// k_t = conj(J2_{t+1}·g_{t+1}²) for t + 1 < N, else 0.
__device__ __forceinline__ Complex adjoint_coefficient(const float* g, const float* J2, long base, int t, int N) {
  if (!J2 || t + 1 >= N) return {0.f, 0.f};
  const Complex gn = load_complex(g, base + t + 1);
  const Complex sq = cmul(gn, gn);
  const float j2 = J2[base + t + 1];
  return {j2 * sq.re, -(j2 * sq.im)};
}

// ---- stand-alone causal resolvent ---------------------------------------------------------------------

// One warp (the whole block) per batch row.
__global__ void causal_forward_kernel(float* g, const float* a, const float* J2, float E0, float eta, int N) {
  const int lane = threadIdx.x;
  const long base = (long)blockIdx.x * N;
  Complex previous = {0.f, 0.f};
  for (int t0 = 0; t0 < N; t0 += kWarp) {
    const int t = t0 + lane;
    const bool in = t < N;
    const float d_re = in ? a[base + t] - E0 : 0.f;
    Complex mine;
    if (J2) {
      const float j2 = (in && t > 0) ? J2[base + t] : 0.f;
      mine = scan_chunk(d_re, j2, eta, min(kWarp, N - t0), previous);
    } else {
      mine = reciprocal(d_re, -eta);
    }
    if (in) store_complex(g, base + t, mine);
  }
}

// One warp per batch row; partial[2b], partial[2b+1] = Σ_t Re w_t, Σ_t Im w_t when partial is non-null.
__global__ void causal_backward_kernel(float* da, float* dJ2, float* partial, const float* dg, const float* g,
                                       const float* J2, int N) {
  const int lane = threadIdx.x;
  const int b = blockIdx.x;
  const long base = (long)b * N;
  Complex lambda = {0.f, 0.f};
  float sum_re = 0.f, sum_im = 0.f;
  for (int t0 = ((N - 1) / kWarp) * kWarp; t0 >= 0; t0 -= kWarp) {
    const int t = t0 + lane;
    const bool in = t < N;
    const Complex gbar = in ? load_complex(dg, base + t) : Complex{0.f, 0.f};
    Complex lam;
    if (J2) {
      const Complex k = in ? adjoint_coefficient(g, J2, base, t, N) : Complex{0.f, 0.f};
      lam = adjoint_chunk(gbar, k, min(kWarp, N - t0), lambda);
    } else {
      lam = gbar;
    }
    if (in) {
      const Complex gt = load_complex(g, base + t);
      const Complex w = cmul(conj(cmul(gt, gt)), lam);  // ∂L/∂z
      if (da) da[base + t] -= w.re;
      if (dJ2 && J2 && t > 0) {
        const Complex gp = load_complex(g, base + t - 1);
        dJ2[base + t] += gp.re * w.re + gp.im * w.im;  // Re(conj(g_{t−1})·w)
      }
      sum_re += w.re;
      sum_im += w.im;
    }
  }
  if (partial) {
    sum_re = warp_sum(sum_re);
    sum_im = warp_sum(sum_im);
    if (lane == 0) {
      partial[2L * b] = sum_re;
      partial[2L * b + 1] = sum_im;
    }
  }
}

// ---- features --------------------------------------------------------------------------------------------

__global__ void features_forward_kernel(float* F, const float* g, float eta, int rows) {
  const long r = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float re = g[2 * r], im = g[2 * r + 1];
  F[3 * r] = eta * re;
  F[3 * r + 1] = eta * im;
  F[3 * r + 2] = eta * hypotf(re, im);
}

// Grid-stride over rows with a grid fixed by rows; partial[blockIdx.x] = the block's Σ dF·(Re g, Im g, |g|).
__global__ void features_backward_kernel(float* dg, float* partial, const float* dF, const float* g, float eta,
                                         int rows) {
  __shared__ float scratch[kReduceThreads / kWarp];
  float acc = 0.f;
  for (long r = (long)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += (long)gridDim.x * blockDim.x) {
    const float re = g[2 * r], im = g[2 * r + 1];
    const float modulus = hypotf(re, im);
    const float d0 = dF[3 * r], d1 = dF[3 * r + 1], d2 = dF[3 * r + 2];
    if (dg) {
      dg[2 * r] += eta * (d0 + d2 * re / modulus);
      dg[2 * r + 1] += eta * (d1 + d2 * im / modulus);
    }
    acc += d0 * re + d1 * im + d2 * modulus;
  }
  if (partial) {
    const float s = block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
  }
}

// ---- the BK layer ----------------------------------------------------------------------------------------

// One warp per row: v = cap5(w_v·u + b_v) into saved.v; with hopping, the two halves of w_J·u are parked in
// saved.J (the u_{t−1} half, used by row t + 1) and saved.J2 (the u_t half + b_J) for the scan kernel, which
// turns them into J and J².
__global__ void layer_projection_kernel(float* v, float* J_prev_half, float* J_cur_half, const float* u,
                                        const float* w_v, const float* b_v, const float* w_J, const float* b_J,
                                        bool hopping, int rows, int D) {
  const long row = (long)blockIdx.x * kRowWarps + threadIdx.y;
  if (row >= rows) return;  // warp-uniform
  const int lane = threadIdx.x;
  const float* ur = u + row * D;
  float sv = 0.f, sp = 0.f, sc = 0.f;
  if (hopping) {
    for (int i = lane; i < D; i += kWarp) {
      const float x = ur[i];
      sv += x * w_v[i];
      sp += x * w_J[i];
      sc += x * w_J[D + i];
    }
    sp = warp_sum(sp);
    sc = warp_sum(sc);
  } else {
    for (int i = lane; i < D; i += kWarp) sv += ur[i] * w_v[i];
  }
  sv = warp_sum(sv);
  if (lane == 0) {
    v[row] = cap(sv + b_v[0], kPotentialCap);
    if (hopping) {
      J_prev_half[row] = sp;
      J_cur_half[row] = sc + b_J[0];
    }
  }
}

// A Möbius map g ↦ (a·g + b)/(c·g + d): one causal step g_t = 1/(c_t − J²_t·g_{t−1}) is
// [[0, 1], [−J²_t, c_t]] with c_t = a_t − E0 − iη, and a run of steps is the product of theirs.
struct Mobius {
  Complex a, b, c, d;
};

__device__ __forceinline__ Complex cmla(Complex x, Complex y, Complex acc) {  // acc + x·y
  return {acc.re + x.re * y.re - x.im * y.im, acc.im + x.re * y.im + x.im * y.re};
}

// The step (j2, c) applied after m, rescaled so that its largest component is 1 (a Möbius map does not change
// under scaling, and the raw product would overflow within a few dozen steps).
__device__ __forceinline__ Mobius compose_step(const Mobius& m, float j2, Complex c) {
  Mobius r;
  r.a = m.c;
  r.b = m.d;
  r.c = cmla(c, m.c, {-j2 * m.a.re, -j2 * m.a.im});
  r.d = cmla(c, m.d, {-j2 * m.b.re, -j2 * m.b.im});
  const float big = fmaxf(fmaxf(fmaxf(fabsf(r.a.re), fabsf(r.a.im)), fmaxf(fabsf(r.b.re), fabsf(r.b.im))),
                          fmaxf(fmaxf(fabsf(r.c.re), fabsf(r.c.im)), fmaxf(fabsf(r.d.re), fabsf(r.d.im))));
  const float inv = 1.f / big;
  r.a = {r.a.re * inv, r.a.im * inv};
  r.b = {r.b.re * inv, r.b.im * inv};
  r.c = {r.c.re * inv, r.c.im * inv};
  r.d = {r.d.re * inv, r.d.im * inv};
  return r;
}

__device__ __forceinline__ Complex apply(const Mobius& m, Complex g) {
  const Complex num = cmla(m.a, g, m.b), den = cmla(m.c, g, m.d);
  const float n = den.re * den.re + den.im * den.im;
  return {(num.re * den.re + num.im * den.im) / n, (num.im * den.re - num.re * den.im) / n};
}

// One block per batch row, one warp per segment of seg_len tokens (whole 32-token chunks): J, J² (hopping),
// the recurrence and the features. With hopping the recurrence is sequential, so each warp first composes
// its segment's steps into one Möbius map, one thread then carries g across the segments in order, and
// every warp reruns its segment from its true g_{begin−1}: about 2·seg_len steps per warp instead of N.
__global__ void layer_scan_forward_kernel(float* g, float* F, float* v_saved, float* J_saved, float* J2_saved,
                                          const float* eps_p, const float* E0_param, float j_max, bool hopping,
                                          int N, int seg_len) {
  __shared__ float boundary_half[kLayerScanMaxSegments];  // the u_{t−1} half of the token before a segment
  __shared__ Mobius segment_map[kLayerScanMaxSegments];
  __shared__ Complex segment_in[kLayerScanMaxSegments];  // g_{begin−1} of each segment
  const int lane = threadIdx.x, seg = threadIdx.y;
  const long base = (long)blockIdx.x * N;
  const int begin = min(N, seg * seg_len), end = min(N, begin + seg_len);
  const float eta = eta_from(eps_p);
  const float E0 = hopping ? E0_param[0] : 0.f;
  Complex previous = {0.f, 0.f};
  if (hopping) {
    // Every warp reads the half it needs from the segment before it before any warp rewrites J_saved.
    if (lane == 0) boundary_half[seg] = begin > 0 && begin < N ? J_saved[base + begin - 1] : 0.f;
    __syncthreads();
    float carry_prev_half = boundary_half[seg];
    Mobius map = {{1.f, 0.f}, {0.f, 0.f}, {0.f, 0.f}, {1.f, 0.f}};
    for (int t0 = begin; t0 < end; t0 += kWarp) {
      const int t = t0 + lane;
      const bool in = t < end;
      const float prev_half = in ? J_saved[base + t] : 0.f;
      const float cur_half = in ? J2_saved[base + t] : 0.f;
      float before = __shfl_up_sync(kFull, prev_half, 1);
      if (lane == 0) before = carry_prev_half;
      carry_prev_half = __shfl_sync(kFull, prev_half, kWarp - 1);
      const float J = j_max * tanhf(cur_half + (t > 0 ? before : 0.f));
      const float j2 = t > 0 ? J * J : 0.f;
      if (in) {
        J_saved[base + t] = J;  // each lane rewrites only the element it read
        J2_saved[base + t] = J * J;
      }
      const float d_re = 1.f + (in ? v_saved[base + t] : 0.f) - E0;
      const int count = min(kWarp, end - t0);
      for (int j = 0; j < count; ++j)
        map = compose_step(map, __shfl_sync(kFull, j2, j), {__shfl_sync(kFull, d_re, j), -eta});
    }
    if (lane == 0) segment_map[seg] = map;
    __syncthreads();
    if (seg == 0 && lane == 0) {
      Complex carried = {0.f, 0.f};  // g_{−1} = 0
      for (int s = 0; s < blockDim.y; ++s) {
        segment_in[s] = carried;
        carried = apply(segment_map[s], carried);
      }
    }
    __syncthreads();
    previous = segment_in[seg];
  }
  for (int t0 = begin; t0 < end; t0 += kWarp) {
    const int t = t0 + lane;
    const bool in = t < end;
    const float d_re = 1.f + (in ? v_saved[base + t] : 0.f) - E0;
    Complex mine;
    if (hopping) {
      const float j2 = in && t > 0 ? J2_saved[base + t] : 0.f;
      mine = scan_chunk(d_re, j2, eta, min(kWarp, end - t0), previous);
    } else {
      mine = reciprocal(d_re, -eta);
    }
    if (in) {
      store_complex(g, base + t, mine);
      F[3 * (base + t)] = eta * mine.re;
      F[3 * (base + t) + 1] = eta * mine.im;
      F[3 * (base + t) + 2] = eta * hypotf(mine.re, mine.im);
    }
  }
}

// Layout of the layer backward's workspace.
struct LayerWorkspace {
  float* d_pre_v;   // [rows]  ∂L/∂(w_v·u + b_v)
  float* d_pre_J;   // [rows]  ∂L/∂(w_J·[u_{t−1}; u_t] + b_J)
  float* row_part;  // [B, 4]  per batch row: Σ Re w (E0), dη, Σ d_pre_v (b_v), Σ d_pre_J (b_J)
  float* col_part;  // the column reduction's partials of dw_v and dw_J's two halves
};

LayerWorkspace layer_workspace(float* w, int B, int N) {
  const long rows = (long)B * N;
  return {w, w + rows, w + 2 * rows, w + 2 * rows + 4L * B};
}

// One warp per batch row, reverse in time: ḡ = dg + features' backward, the adjoint recurrence, then the
// pre-activation gradients of v and J and the per-row sums of the scalar gradients.
__global__ void layer_scan_backward_kernel(LayerWorkspace ws, const float* dg, const float* dF, const float* g,
                                           const float* v_saved, const float* J_saved, const float* J2_saved,
                                           const float* eps_p, float j_max, bool hopping, int N) {
  const int lane = threadIdx.x;
  const int b = blockIdx.x;
  const long base = (long)b * N;
  const float eta = eta_from(eps_p);
  const float* J2 = hopping ? J2_saved : nullptr;
  Complex lambda = {0.f, 0.f};
  float sum_E0 = 0.f, sum_eta = 0.f, sum_bv = 0.f, sum_bJ = 0.f;
  for (int t0 = ((N - 1) / kWarp) * kWarp; t0 >= 0; t0 -= kWarp) {
    const int t = t0 + lane;
    const bool in = t < N;
    Complex gt = {0.f, 0.f}, gbar = {0.f, 0.f};
    if (in) {
      gt = load_complex(g, base + t);
      if (dg) gbar = load_complex(dg, base + t);
      if (dF) {
        const float modulus = hypotf(gt.re, gt.im);
        const float d0 = dF[3 * (base + t)], d1 = dF[3 * (base + t) + 1], d2 = dF[3 * (base + t) + 2];
        gbar.re += eta * (d0 + d2 * gt.re / modulus);
        gbar.im += eta * (d1 + d2 * gt.im / modulus);
        sum_eta += d0 * gt.re + d1 * gt.im + d2 * modulus;
      }
    }
    Complex lam;
    if (hopping) {
      const Complex k = in ? adjoint_coefficient(g, J2, base, t, N) : Complex{0.f, 0.f};
      lam = adjoint_chunk(gbar, k, min(kWarp, N - t0), lambda);
    } else {
      lam = gbar;
    }
    if (in) {
      const Complex w = cmul(conj(cmul(gt, gt)), lam);
      const float ratio = v_saved[base + t] / kPotentialCap;
      const float dpv = -w.re * (1.f - ratio * ratio);
      ws.d_pre_v[base + t] = dpv;
      sum_E0 += w.re;
      sum_eta += w.im;
      sum_bv += dpv;
      if (hopping) {
        float dpJ = 0.f;
        if (t > 0) {
          const Complex gp = load_complex(g, base + t - 1);
          const float dJ2 = gp.re * w.re + gp.im * w.im;
          const float J = J_saved[base + t];
          const float rj = J / j_max;
          dpJ = dJ2 * 2.f * J * j_max * (1.f - rj * rj);
        }
        ws.d_pre_J[base + t] = dpJ;
        sum_bJ += dpJ;
      }
    }
  }
  sum_E0 = warp_sum(sum_E0);
  sum_eta = warp_sum(sum_eta);
  sum_bv = warp_sum(sum_bv);
  sum_bJ = warp_sum(sum_bJ);
  if (lane == 0) {
    ws.row_part[4L * b] = sum_E0;
    ws.row_part[4L * b + 1] = sum_eta;
    ws.row_part[4L * b + 2] = sum_bv;
    ws.row_part[4L * b + 3] = sum_bJ;
  }
}

// du[r, :] += d_pre_v[r]·w_v + d_pre_J[r]·w_J[D:2D] + d_pre_J[r+1]·w_J[0:D] (the last only if t + 1 < N); one
// thread per column, rows on the grid's y (row_grid).
__global__ void layer_du_kernel(float* du, LayerWorkspace ws, const float* w_v, const float* w_J, bool hopping,
                                int rows, int N, int D) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const float wv = w_v[d], wj_now = hopping ? w_J[D + d] : 0.f, wj_next = hopping ? w_J[d] : 0.f;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const size_t i = size_t(r) * D + d;
    float s = ws.d_pre_v[r] * wv;
    if (hopping) {
      s += ws.d_pre_J[r] * wj_now;
      if (r % N + 1 < N) s += ws.d_pre_J[r + 1] * wj_next;
    }
    du[i] += s;
  }
}

// The terms of dw_v, dw_J (u_{t−1} half), dw_J (u_t half) for common/column_reduce.cuh: row r adds
// d_pre_v[r]·u_r, d_pre_J[r+1]·u_r (within its sequence) and d_pre_J[r]·u_r.
struct WeightTerms {
  const float *d_pre_v, *d_pre_J, *u;
  bool hopping;
  int N, D;
  __device__ void operator()(long r, int d, float (&acc)[3]) const {
    const float x = u[r * D + d];
    acc[0] += d_pre_v[r] * x;
    if (hopping) {
      if (int(r) % N + 1 < N) acc[1] += d_pre_J[r + 1] * x;  // rows = B·N fits an int
      acc[2] += d_pre_J[r] * x;
    }
  }
};

// The scalar gradients from the per-batch-row partials (one warp; lane k < 4 sums column k in row order).
__global__ void layer_scalars_kernel(BkGrads<float> grads, LayerWorkspace ws, const float* eps_p, bool hopping,
                                     int B) {
  const int k = threadIdx.x;
  if (k >= 4) return;
  float s = 0.f;
  for (int b = 0; b < B; ++b) s += ws.row_part[4L * b + k];
  if (k == 0 && hopping && grads.E0) grads.E0[0] += s;
  if (k == 1 && grads.eps_p) grads.eps_p[0] += s * sigmoid(eps_p[0]);
  if (k == 2 && grads.b_v) grads.b_v[0] += s;
  if (k == 3 && hopping && grads.b_J) grads.b_J[0] += s;
}

// ---- feature gates ---------------------------------------------------------------------------------------

__global__ void gate_forward_kernel(float* out, const float* F, const float* W, const float* b, int rows, int k) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long)rows * k) return;
  const long r = i / k;
  const int j = int(i - r * k);
  const float* f = F + 3 * r;
  out[i] = sigmoid(W[3 * j] * f[0] + W[3 * j + 1] * f[1] + W[3 * j + 2] * f[2] + b[j]);
}

__global__ void gate_backward_input_kernel(float* dF, const float* dout, const float* out, const float* W, int rows,
                                           int k) {
  const long r = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  float f0 = dF[3 * r], f1 = dF[3 * r + 1], f2 = dF[3 * r + 2];
  for (int j = 0; j < k; ++j) {
    const float o = out[r * k + j];
    const float s = dout[r * k + j] * o * (1.f - o);
    f0 += s * W[3 * j];
    f1 += s * W[3 * j + 1];
    f2 += s * W[3 * j + 2];
  }
  dF[3 * r] = f0;
  dF[3 * r + 1] = f1;
  dF[3 * r + 2] = f2;
}

// First stage of dW, db: blockIdx.y = output j; partial[((j·G) + block)·4 + c], c < 3: Σ s·F_c, c = 3: Σ s.
__global__ void gate_backward_params_kernel(float* partial, const float* dout, const float* out, const float* F,
                                            int rows, int k) {
  __shared__ float scratch[kReduceThreads / kWarp];
  const int j = blockIdx.y;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (long r = (long)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += (long)gridDim.x * blockDim.x) {
    const float o = out[r * k + j];
    const float s = dout[r * k + j] * o * (1.f - o);
    acc[0] += s * F[3 * r];
    acc[1] += s * F[3 * r + 1];
    acc[2] += s * F[3 * r + 2];
    acc[3] += s;
  }
  for (int c = 0; c < 4; ++c) {
    const float total = block_sum(acc[c], scratch);
    if (threadIdx.x == 0) partial[((long)j * gridDim.x + blockIdx.x) * 4 + c] = total;
  }
}

// Second stage: thread (j, c) sums the G block partials in order.
__global__ void gate_backward_finish_kernel(float* dW, float* db, const float* partial, int blocks, int k) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= 4 * k) return;
  const int j = i / 4, c = i % 4;
  float s = 0.f;
  for (int blk = 0; blk < blocks; ++blk) s += partial[((long)j * blocks + blk) * 4 + c];
  if (c < 3) {
    if (dW) dW[3 * j + c] += s;
  } else if (db) {
    db[j] += s;
  }
}

}  // namespace

// ---- launchers -------------------------------------------------------------------------------------------

void bk_causal_forward(float* g, const float* a, const float* J2, float E0, float eta, int B, int N,
                       cudaStream_t stream) {
  if (B <= 0 || N <= 0) return;
  causal_forward_kernel<<<B, kWarp, 0, stream>>>(g, a, J2, E0, eta, N);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t bk_causal_backward_workspace_floats(int B) { return 2 * size_t(std::max(B, 0)); }

void bk_causal_backward(float* da, float* dJ2, float* dE0, float* deta, const float* dg, const float* g,
                        const float* J2, int B, int N, float* workspace, cudaStream_t stream) {
  if (B <= 0 || N <= 0) return;
  float* partial = (dE0 || deta) ? workspace : nullptr;
  causal_backward_kernel<<<B, kWarp, 0, stream>>>(da, dJ2, partial, dg, g, J2, N);
  MUSE_CUDA_CHECK(cudaGetLastError());
  if (dE0) {
    finish_sum_kernel<<<1, kWarp, 0, stream>>>(dE0, partial, B, 2, 1.f);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
  if (deta) {
    finish_sum_kernel<<<1, kWarp, 0, stream>>>(deta, partial + 1, B, 2, 1.f);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
}

void bk_features_forward(float* F, const float* g, float eta, int rows, cudaStream_t stream) {
  if (rows <= 0) return;
  features_forward_kernel<<<ceil_div(rows, 256), 256, 0, stream>>>(F, g, eta, rows);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t bk_features_backward_workspace_floats(int rows) { return size_t(reduce_blocks(rows)); }

void bk_features_backward(float* dg, float* deta, const float* dF, const float* g, float eta, int rows,
                          float* workspace, cudaStream_t stream) {
  if (rows <= 0 || (!dg && !deta)) return;
  const int blocks = reduce_blocks(rows);
  float* partial = deta ? workspace : nullptr;
  features_backward_kernel<<<blocks, kReduceThreads, 0, stream>>>(dg, partial, dF, g, eta, rows);
  MUSE_CUDA_CHECK(cudaGetLastError());
  if (deta) {
    finish_sum_kernel<<<1, kWarp, 0, stream>>>(deta, partial, blocks, 1, 1.f);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
}

void bk_layer_forward(float* g, float* F, const BkSaved<float>& saved, const float* u, const BkParams<float>& params,
                      bool hopping, int B, int N, int D, cudaStream_t stream) {
  const int rows = B * N;
  if (rows <= 0) return;
  const dim3 block(kWarp, kRowWarps);
  layer_projection_kernel<<<ceil_div(rows, kRowWarps), block, 0, stream>>>(
      saved.v, hopping ? saved.J : nullptr, hopping ? saved.J2 : nullptr, u, params.w_v, params.b_v,
      hopping ? params.w_J : nullptr, hopping ? params.b_J : nullptr, hopping, rows, D);
  MUSE_CUDA_CHECK(cudaGetLastError());
  // As many 32-token segments as the sequence fills, up to one block of kLayerScanMaxSegments warps.
  const int chunks = ceil_div(N, kWarp), segments = std::min(chunks, kLayerScanMaxSegments);
  const int seg_len = ceil_div(chunks, segments) * kWarp;
  layer_scan_forward_kernel<<<B, dim3(kWarp, segments), 0, stream>>>(
      g, F, saved.v, hopping ? saved.J : nullptr, hopping ? saved.J2 : nullptr, params.eps_p,
      hopping ? params.E0 : nullptr, params.j_max, hopping, N, seg_len);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t bk_layer_backward_workspace_floats(int B, int N, int D) {
  const long rows = (long)std::max(B, 0) * std::max(N, 0);
  return size_t(2 * rows + 4L * std::max(B, 0)) + column_reduce_workspace_floats<3>(rows, std::max(D, 0));
}

void bk_layer_backward(float* du, const BkGrads<float>& grads, const float* dg, const float* dF, const float* u,
                       const float* g, const BkSaved<float>& saved, const BkParams<float>& params, bool hopping,
                       int B, int N, int D, float* workspace, cudaStream_t stream) {
  const int rows = B * N;
  if (rows <= 0) return;
  const LayerWorkspace ws = layer_workspace(workspace, B, N);
  layer_scan_backward_kernel<<<B, kWarp, 0, stream>>>(ws, dg, dF, g, saved.v, hopping ? saved.J : nullptr,
                                                      hopping ? saved.J2 : nullptr, params.eps_p, params.j_max,
                                                      hopping, N);
  MUSE_CUDA_CHECK(cudaGetLastError());
  layer_scalars_kernel<<<1, kWarp, 0, stream>>>(grads, ws, params.eps_p, hopping, B);
  MUSE_CUDA_CHECK(cudaGetLastError());
  if (du && D > 0) {
    layer_du_kernel<<<row_grid(rows, D), kRowGridThreads, 0, stream>>>(du, ws, params.w_v,
                                                                       hopping ? params.w_J : nullptr, hopping, rows,
                                                                       N, D);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
  if ((grads.w_v || (hopping && grads.w_J)) && D > 0) {
    float* dw_J = hopping ? grads.w_J : nullptr;
    const WeightTerms terms{ws.d_pre_v, ws.d_pre_J, u, hopping, N, D};
    column_reduce<3>({grads.w_v, dw_J, dw_J ? dw_J + D : nullptr}, terms, rows, D, ws.col_part,
                     column_reduce_workspace_floats<3>(rows, D), stream);
  }
}

void bk_gate_forward(float* out, const float* F, const float* W, const float* b, int rows, int k,
                     cudaStream_t stream) {
  const long n = (long)rows * k;
  if (n <= 0) return;
  gate_forward_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(out, F, W, b, rows, k);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t bk_gate_backward_workspace_floats(int rows, int k) {
  return size_t(reduce_blocks(rows)) * 4 * size_t(std::max(k, 0));
}

void bk_gate_backward(float* dF, float* dW, float* db, const float* dout, const float* out, const float* F,
                      const float* W, int rows, int k, float* workspace, cudaStream_t stream) {
  if (rows <= 0 || k <= 0) return;
  if (dF) {
    gate_backward_input_kernel<<<ceil_div(rows, 256), 256, 0, stream>>>(dF, dout, out, W, rows, k);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
  if (dW || db) {
    const int blocks = reduce_blocks(rows);
    gate_backward_params_kernel<<<dim3(blocks, k), kReduceThreads, 0, stream>>>(workspace, dout, out, F, rows, k);
    MUSE_CUDA_CHECK(cudaGetLastError());
    gate_backward_finish_kernel<<<ceil_div(4L * k, 128), 128, 0, stream>>>(dW, db, workspace, blocks, k);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace muse::cuda
