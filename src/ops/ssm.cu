// CUDA AR-SSM pieces: causal conv, decayed/prefix scan, rank mask and the elementwise gate/readout steps
// (see ssm.cuh and docs/kernels/bk_ssm_hybrid.md). fp32 storage and arithmetic.
#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "common/column_reduce.cuh"
#include "common/cuda_check.cuh"
#include "common/math.h"
#include "common/row_grid.cuh"
#include "ops/ssm.cuh"

namespace muse::cuda {

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr float kMaskSlope = 4.0f;  // as ops/ssm.cpp
constexpr int kRowWarps = 8;        // warps per block for one-warp-per-row kernels
constexpr int kMaskMaxBlocks = 256;
constexpr int kScanLanes = 8;    // scan channels per block
constexpr int kScanChunks = 32;  // scan chunks along time per block
static_assert(kSsmRankHidden == kWarp, "the rank-mask kernels map MLP_r's hidden units onto the lanes of a warp");

// Rank-mask parameter gradients, in this order: r_w2 [32], r_w1 [32], r_b1 [32], r_b2, w_pi [3], b_pi.
constexpr int kMaskParams = 3 * kSsmRankHidden + 5;

int ceil_div(long a, long b) { return int((a + b - 1) / b); }
int mask_blocks(long rows) { return std::max(1, std::min(ceil_div(rows, kRowWarps * 4), kMaskMaxBlocks)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFull, v, offset);
  return v;
}

// ---- causal conv -----------------------------------------------------------------------------------------

// The three taps [3, D] of kWidth channels from d.
template <int kWidth>
struct ConvTaps {
  float w0[kWidth], w1[kWidth], w2[kWidth];
  __device__ ConvTaps(const float* taps, int d, int D) {
    load_floats(w0, taps + d), load_floats(w1, taps + D + d), load_floats(w2, taps + 2 * D + d);
  }
};

// Row r (time t = r mod N) of y = causal depthwise conv of u, kWidth channels per thread (row_grid).
template <int kWidth>
__global__ void conv_forward_kernel(float* y, const float* u, const float* taps, int rows, int N, int D) {
  const int d = (blockIdx.x * blockDim.x + threadIdx.x) * kWidth;
  if (d >= D) return;
  const ConvTaps<kWidth> w(taps, d, D);
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const int t = r % N;
    const size_t i = size_t(r) * D + d;
    float now[kWidth], back1[kWidth] = {}, back2[kWidth] = {}, s[kWidth];
    load_floats(now, u + i);
    if (t >= 1) load_floats(back1, u + i - D);
    if (t >= 2) load_floats(back2, u + i - 2 * D);
#pragma unroll
    for (int k = 0; k < kWidth; ++k) {
      if (t >= 2)
        s[k] = (w.w0[k] * back2[k] + w.w1[k] * back1[k]) + w.w2[k] * now[k];
      else if (t == 1)
        s[k] = w.w1[k] * back1[k] + w.w2[k] * now[k];
      else
        s[k] = w.w2[k] * now[k];
    }
    store_floats(y + i, s);
  }
}

template <int kWidth>
__global__ void conv_backward_input_kernel(float* du, const float* dy, const float* taps, bool accumulate, int rows,
                                           int N, int D) {
  const int d = (blockIdx.x * blockDim.x + threadIdx.x) * kWidth;
  if (d >= D) return;
  const ConvTaps<kWidth> w(taps, d, D);
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const int t = r % N;
    const size_t i = size_t(r) * D + d;
    float now[kWidth], ahead1[kWidth] = {}, ahead2[kWidth] = {}, old[kWidth] = {};
    load_floats(now, dy + i);
    if (accumulate) load_floats(old, du + i);
    if (t + 1 < N) load_floats(ahead1, dy + i + D);
    if (t + 2 < N) load_floats(ahead2, dy + i + 2 * D);
#pragma unroll
    for (int k = 0; k < kWidth; ++k) {
      float s = w.w2[k] * now[k];
      if (t + 1 < N) s += w.w1[k] * ahead1[k];
      if (t + 2 < N) s += w.w0[k] * ahead2[k];
      old[k] += s;
    }
    store_floats(du + i, old);
  }
}

// D a multiple of 4 with 16-byte aligned rows and taps: four channels per thread.
bool conv_vectors(int D, std::initializer_list<const void*> arrays) {
  bool ok = D % 4 == 0;
  for (const void* a : arrays) ok = ok && reinterpret_cast<uintptr_t>(a) % 16 == 0;
  return ok;
}

// The conv taps' gradient terms for common/column_reduce.cuh: dtaps[k][d] = Σ_rows dy_t[d]·u_{t−2+k}[d]
// (zero left padding at each sequence start).
struct TapTerms {
  const float *dy, *u;
  int N, D;
  __device__ void operator()(long r, int d, float (&acc)[3]) const {
    const int t = int(r) % N;  // rows = B·N fits an int
    const long i = r * D + d;
    const float g = dy[i];
    acc[2] += g * u[i];
    if (t >= 1) acc[1] += g * u[i - D];
    if (t >= 2) acc[0] += g * u[i - 2L * D];
  }
};

// ---- scan ------------------------------------------------------------------------------------------------

// The scans run along time in kScanChunks chunks at once (one thread per (r, chunk); a block holds
// kScanLanes channels of one batch row): a sequential thread per (b, r) leaves most of the GPU idle (B·R =
// 512 threads at B = 16), each waiting on its own loads. The recurrence is linear, so each chunk first runs
// from a zero carry; the carries are then folded chunk by chunk in shared memory (λ^length per chunk), and
// each chunk adds its carry's decayed contribution. Channels r sit next to each other in memory, so the
// lanes of a chunk read a contiguous run.
//
// What thread (lane, chunk) of a scan block works on: channel r of batch row blockIdx.y (element
// base + t·R at token t), tokens [t0, t1), and the channel's λ and 1 − λ (1 and 1 for the prefix sum).
struct ScanLane {
  int lane, chunk, r;
  bool active;  // r < R
  long base;
  int t0, t1;
  float lambda, one_minus;
};

__device__ ScanLane scan_lane(const float* ell, int N, int R) {
  ScanLane s;
  s.lane = threadIdx.x, s.chunk = threadIdx.y;
  s.r = blockIdx.x * kScanLanes + s.lane;
  s.active = s.r < R;
  s.base = (long)blockIdx.y * N * R + s.r;
  const int len = (N + kScanChunks - 1) / kScanChunks;
  s.t0 = min(N, s.chunk * len), s.t1 = min(N, s.t0 + len);
  s.lambda = ell && s.active ? sigmoid(ell[s.r]) : 1.f;
  s.one_minus = ell && s.active ? sigmoid(-ell[s.r]) : 1.f;
  return s;
}

// Forward: S_t = λ·S_{t−1} + (1 − λ)·p_t (or S_{t−1} + p_t), S_{−1} = 0.
__global__ void __launch_bounds__(kScanLanes* kScanChunks)
    scan_forward_kernel(float* S, const float* p, const float* ell, int N, int R) {
  __shared__ float chunk_end[kScanChunks][kScanLanes];    // a chunk's last state from a zero carry
  __shared__ float chunk_decay[kScanChunks][kScanLanes];  // λ^(chunk length)
  const ScanLane sl = scan_lane(ell, N, R);
  float state = 0.f, decay = 1.f;
  if (sl.active)
    for (int t = sl.t0; t < sl.t1; ++t) {
      const long o = sl.base + (long)t * R;
      state = ell ? sl.lambda * state + sl.one_minus * p[o] : state + p[o];
      S[o] = state;
      decay *= sl.lambda;
    }
  chunk_end[sl.chunk][sl.lane] = state;
  chunk_decay[sl.chunk][sl.lane] = decay;
  __syncthreads();
  float carry = 0.f;  // the true state just before the chunk's first token
  for (int c = 0; c < sl.chunk; ++c) carry = chunk_decay[c][sl.lane] * carry + chunk_end[c][sl.lane];
  if (!sl.active || carry == 0.f) return;
  for (int t = sl.t0; t < sl.t1; ++t) {
    carry *= sl.lambda;
    S[sl.base + (long)t * R] += carry;
  }
}

// Backward, reverse in t: G_t = dS_t + λ·G_{t+1}, dp_t += (1 − λ)·G_t (or G_t), and when partial is
// non-null partial[b·R + r] = Σ_t G_t·(S_{t−1} − p_t) (chunks added in order). dS is read twice (the
// zero-carry pass keeps nothing but each chunk's first G).
__global__ void __launch_bounds__(kScanLanes* kScanChunks)
    scan_backward_kernel(float* dp, float* partial, const float* dS, const float* S, const float* p,
                         const float* ell, int N, int R) {
  __shared__ float chunk_first[kScanChunks][kScanLanes];  // G at a chunk's first token from a zero carry
  __shared__ float chunk_decay[kScanChunks][kScanLanes];
  __shared__ float chunk_acc[kScanChunks][kScanLanes];
  const ScanLane sl = scan_lane(ell, N, R);
  float G = 0.f, decay = 1.f;
  if (sl.active)
    for (int t = sl.t1 - 1; t >= sl.t0; --t) {
      G = dS[sl.base + (long)t * R] + sl.lambda * G;
      decay *= sl.lambda;
    }
  chunk_first[sl.chunk][sl.lane] = G;
  chunk_decay[sl.chunk][sl.lane] = decay;
  __syncthreads();
  G = 0.f;  // the true G at the next chunk's first token
  for (int c = kScanChunks - 1; c > sl.chunk; --c) G = chunk_decay[c][sl.lane] * G + chunk_first[c][sl.lane];
  float acc = 0.f;
  if (sl.active)
    for (int t = sl.t1 - 1; t >= sl.t0; --t) {
      const long o = sl.base + (long)t * R;
      G = dS[o] + sl.lambda * G;
      if (dp) dp[o] += ell ? sl.one_minus * G : G;
      if (partial) acc += G * ((t > 0 ? S[o - R] : 0.f) - p[o]);
    }
  if (!partial) return;
  chunk_acc[sl.chunk][sl.lane] = acc;
  __syncthreads();
  if (sl.chunk != 0 || !sl.active) return;
  float total = 0.f;
  for (int c = 0; c < kScanChunks; ++c) total += chunk_acc[c][sl.lane];
  partial[(long)blockIdx.y * R + sl.r] = total;
}

// dell[r] += λ(1−λ)·Σ_b partial[b·R + r], batches in order.
__global__ void scan_dell_finish_kernel(float* dell, const float* partial, const float* ell, int B, int R) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= R) return;
  float s = 0.f;
  for (int b = 0; b < B; ++b) s += partial[(long)b * R + r];
  dell[r] += s * sigmoid(ell[r]) * sigmoid(-ell[r]);
}

// ---- rank mask -------------------------------------------------------------------------------------------

struct MaskParams {
  const float *r_w1, *r_b1, *r_w2, *r_b2, *w_pi, *b_pi;
};

MaskParams mask_params(const SsmParams<float>& p) { return {p.r_w1, p.r_b1, p.r_w2, p.r_b2, p.w_pi, p.b_pi}; }

__device__ __forceinline__ float green_factor(const float* F_row, const MaskParams& p) {
  return sigmoid(p.w_pi[0] * F_row[0] + p.w_pi[1] * F_row[1] + p.w_pi[2] * F_row[2] + p.b_pi[0]);
}

__global__ void rank_mask_forward_kernel(float* m, const float* delta, const float* F, MaskParams p, int rows,
                                         int R) {
  const long row = (long)blockIdx.x * kRowWarps + threadIdx.y;
  if (row >= rows) return;  // warp-uniform
  const int k = threadIdx.x;
  const float h = p.r_w1[k] * delta[row] + p.r_b1[k];
  const float s = p.r_b2[0] + warp_sum(p.r_w2[k] * gelu(h));
  const float omega = sigmoid(s) * green_factor(F + 3 * row, p);
  for (int r = k; r < R; r += kWarp)
    m[row * R + r] =
        sigmoid(kMaskSlope * (float(kSsmRankMin) + omega * float(R - kSsmRankMin) - float(r) - 0.5f));
}

// Warp per row, grid-stride over rows with a grid fixed by rows; the parameter gradients are summed per warp,
// then over the block's warps in order, into partial[block·kMaskParams + i] (when partial is non-null).
__global__ void rank_mask_backward_kernel(float* ddelta, float* dF, float* partial, const float* dm, const float* m,
                                          const float* delta, const float* F, MaskParams p, int rows, int R) {
  __shared__ float warp_part[kRowWarps][kMaskParams];
  const int k = threadIdx.x, warp = threadIdx.y;
  const float w1 = p.r_w1[k], b1 = p.r_b1[k], w2 = p.r_w2[k];
  float acc_w2 = 0.f, acc_w1 = 0.f, acc_b1 = 0.f, acc_b2 = 0.f, acc_wpi[3] = {0.f, 0.f, 0.f}, acc_bpi = 0.f;
  for (long row = (long)blockIdx.x * kRowWarps + warp; row < rows; row += (long)gridDim.x * kRowWarps) {
    float domega = 0.f;
    for (int r = k; r < R; r += kWarp) {
      const float mr = m[row * R + r];
      domega += dm[row * R + r] * mr * (1.f - mr);
    }
    domega = warp_sum(domega) * kMaskSlope * float(R - kSsmRankMin);
    const float d = delta[row];
    const float h = w1 * d + b1;
    const float act = gelu(h);
    const float slope = w2 * gelu_grad(h);
    const float a = sigmoid(p.r_b2[0] + warp_sum(w2 * act));
    const float* F_row = F + 3 * row;
    const float pi = green_factor(F_row, p);
    const float ds = domega * pi * a * (1.f - a);
    const float dz = domega * a * pi * (1.f - pi);
    const float dd = warp_sum(slope * w1);  // every lane must take part
    if (k == 0) {
      if (ddelta) ddelta[row] += ds * dd;
      if (dF)
        for (int c = 0; c < 3; ++c) dF[3 * row + c] += dz * p.w_pi[c];
    }
    const float dh = ds * slope;
    acc_w2 += ds * act;
    acc_w1 += dh * d;
    acc_b1 += dh;
    acc_b2 += ds;
    for (int c = 0; c < 3; ++c) acc_wpi[c] += dz * F_row[c];
    acc_bpi += dz;
  }
  if (!partial) return;  // grid-uniform: no thread reaches the barrier below
  warp_part[warp][k] = acc_w2;
  warp_part[warp][kSsmRankHidden + k] = acc_w1;
  warp_part[warp][2 * kSsmRankHidden + k] = acc_b1;
  if (k == 0) {
    warp_part[warp][3 * kSsmRankHidden] = acc_b2;
    for (int c = 0; c < 3; ++c) warp_part[warp][3 * kSsmRankHidden + 1 + c] = acc_wpi[c];
    warp_part[warp][3 * kSsmRankHidden + 4] = acc_bpi;
  }
  __syncthreads();
  for (int i = warp * kWarp + k; i < kMaskParams; i += kRowWarps * kWarp) {
    float s = 0.f;
    for (int w = 0; w < kRowWarps; ++w) s += warp_part[w][i];
    partial[(long)blockIdx.x * kMaskParams + i] = s;
  }
}

// Second stage: thread i sums parameter i over the blocks in order and adds it to its gradient.
__global__ void rank_mask_finish_kernel(SsmGrads<float> g, const float* partial, int blocks) {
  const int i = threadIdx.x;
  if (i >= kMaskParams) return;
  float s = 0.f;
  for (int blk = 0; blk < blocks; ++blk) s += partial[(long)blk * kMaskParams + i];
  constexpr int H = kSsmRankHidden;
  if (i < H) {
    if (g.r_w2) g.r_w2[i] += s;
  } else if (i < 2 * H) {
    if (g.r_w1) g.r_w1[i - H] += s;
  } else if (i < 3 * H) {
    if (g.r_b1) g.r_b1[i - 2 * H] += s;
  } else if (i == 3 * H) {
    if (g.r_b2) g.r_b2[0] += s;
  } else if (i < 3 * H + 4) {
    if (g.w_pi) g.w_pi[i - 3 * H - 1] += s;
  } else if (g.b_pi) {
    g.b_pi[0] += s;
  }
}

// ---- elementwise steps -----------------------------------------------------------------------------------

__global__ void relu_forward_kernel(float* x, long n) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = x[i] > 0.f ? x[i] : 0.f;
}

__global__ void relu_backward_kernel(float* d, const float* hidden, long n) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && !(hidden[i] > 0.f)) d[i] = 0.f;
}

__device__ __forceinline__ float channel_gate(const float* chi, const float* mask, long i) {
  return mask ? chi[i] * mask[i] : chi[i];
}

__global__ void gate_forward_kernel(float* chi, float* scan_in, const float* chi_pre, const float* mask,
                                    const float* proj_u, long n) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float c = sigmoid(chi_pre[i]);
  chi[i] = c;
  scan_in[i] = proj_u[i] * (mask ? c * mask[i] : c);
}

__global__ void readout_forward_kernel(float* readout, const float* S, const float* proj_v, const float* chi,
                                       const float* mask, long n) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) readout[i] = S[i] * (proj_v[i] * channel_gate(chi, mask, i));
}

__global__ void readout_backward_kernel(float* dS, const float* dreadout, const float* proj_v, const float* chi,
                                        const float* mask, long n) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) dS[i] += dreadout[i] * (proj_v[i] * channel_gate(chi, mask, i));
}

__global__ void gate_backward_kernel(float* dproj_u, float* dproj_v, float* dchi_pre, float* dm, const float* dscan_in,
                                     const float* dreadout, const float* S, const float* proj_u, const float* proj_v,
                                     const float* chi, const float* mask, long n) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float gate = channel_gate(chi, mask, i);
  const float dq = dreadout[i] * S[i];
  const float dgate = dscan_in[i] * proj_u[i] + dq * proj_v[i];
  if (dproj_u) dproj_u[i] += dscan_in[i] * gate;
  if (dproj_v) dproj_v[i] += dq * gate;
  if (dchi_pre) dchi_pre[i] += (mask ? dgate * mask[i] : dgate) * chi[i] * (1.f - chi[i]);
  if (dm && mask) dm[i] += dgate * chi[i];
}

int elementwise_blocks(long n) { return ceil_div(n, 256); }

}  // namespace

// ---- launchers -------------------------------------------------------------------------------------------

void ssm_conv_forward(float* y, const float* u, const float* taps, int B, int N, int D, cudaStream_t stream) {
  const int rows = B * N;
  if (rows <= 0 || D <= 0) return;
  if (conv_vectors(D, {y, u, taps}))
    conv_forward_kernel<4><<<row_grid(rows, D / 4), kRowGridThreads, 0, stream>>>(y, u, taps, rows, N, D);
  else
    conv_forward_kernel<1><<<row_grid(rows, D), kRowGridThreads, 0, stream>>>(y, u, taps, rows, N, D);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t ssm_conv_backward_workspace_floats(int B, int N, int D) {
  return column_reduce_workspace_floats<3>((long)std::max(B, 0) * std::max(N, 0), D);
}

void ssm_conv_backward(float* du, float* dtaps, const float* dy, const float* u, const float* taps, int B, int N,
                       int D, float* workspace, cudaStream_t stream, bool accumulate) {
  const long rows = (long)B * N, total = rows * D;
  if (total <= 0) return;
  if (du) {
    if (conv_vectors(D, {du, dy, taps}))
      conv_backward_input_kernel<4><<<row_grid(int(rows), D / 4), kRowGridThreads, 0, stream>>>(
          du, dy, taps, accumulate, int(rows), N, D);
    else
      conv_backward_input_kernel<1><<<row_grid(int(rows), D), kRowGridThreads, 0, stream>>>(du, dy, taps, accumulate,
                                                                                            int(rows), N, D);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
  if (dtaps) {
    column_reduce<3>({dtaps, dtaps + D, dtaps + 2L * D}, TapTerms{dy, u, N, D}, rows, D, workspace,
                     ssm_conv_backward_workspace_floats(B, N, D), stream);
  }
}

void ssm_scan_forward(float* S, const float* p, const float* ell, int B, int N, int R, cudaStream_t stream) {
  const long lanes = (long)B * R;
  if (lanes <= 0 || N <= 0) return;
  scan_forward_kernel<<<dim3(ceil_div(R, kScanLanes), B), dim3(kScanLanes, kScanChunks), 0, stream>>>(S, p, ell, N, R);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t ssm_scan_backward_workspace_floats(int B, int R) { return size_t(std::max(B, 0)) * size_t(std::max(R, 0)); }

void ssm_scan_backward(float* dp, float* dell, const float* dS, const float* S, const float* p, const float* ell,
                       int B, int N, int R, float* workspace, cudaStream_t stream) {
  const long lanes = (long)B * R;
  if (lanes <= 0 || N <= 0) return;
  float* partial = (ell && dell) ? workspace : nullptr;
  if (!dp && !partial) return;
  scan_backward_kernel<<<dim3(ceil_div(R, kScanLanes), B), dim3(kScanLanes, kScanChunks), 0, stream>>>(
      dp, partial, dS, S, p, ell, N, R);
  MUSE_CUDA_CHECK(cudaGetLastError());
  if (partial) {
    scan_dell_finish_kernel<<<ceil_div(R, 128), 128, 0, stream>>>(dell, partial, ell, B, R);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
}

void ssm_rank_mask_forward(float* m, const float* delta, const float* F, const SsmParams<float>& params, int rows,
                           int R, cudaStream_t stream) {
  if (rows <= 0 || R <= 0) return;
  rank_mask_forward_kernel<<<ceil_div(rows, kRowWarps), dim3(kWarp, kRowWarps), 0, stream>>>(
      m, delta, F, mask_params(params), rows, R);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t ssm_rank_mask_backward_workspace_floats(int rows) { return size_t(mask_blocks(rows)) * kMaskParams; }

void ssm_rank_mask_backward(float* ddelta, float* dF, const SsmGrads<float>& g, const float* dm, const float* m,
                            const float* delta, const float* F, const SsmParams<float>& params, int rows, int R,
                            float* workspace, cudaStream_t stream) {
  if (rows <= 0 || R <= 0) return;
  const bool want_params = g.r_w1 || g.r_b1 || g.r_w2 || g.r_b2 || g.w_pi || g.b_pi;
  if (!want_params && !ddelta && !dF) return;
  const int blocks = mask_blocks(rows);
  float* partial = want_params ? workspace : nullptr;
  rank_mask_backward_kernel<<<blocks, dim3(kWarp, kRowWarps), 0, stream>>>(ddelta, dF, partial, dm, m, delta, F,
                                                                          mask_params(params), rows, R);
  MUSE_CUDA_CHECK(cudaGetLastError());
  if (want_params) {
    rank_mask_finish_kernel<<<1, 128, 0, stream>>>(g, partial, blocks);
    MUSE_CUDA_CHECK(cudaGetLastError());
  }
}

void ssm_relu_forward(float* x, long n, cudaStream_t stream) {
  if (n <= 0) return;
  relu_forward_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(x, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void ssm_relu_backward(float* dhidden, const float* hidden, long n, cudaStream_t stream) {
  if (n <= 0) return;
  relu_backward_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(dhidden, hidden, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void ssm_gate_forward(float* chi, float* scan_in, const float* chi_pre, const float* mask, const float* proj_u,
                      int rows, int R, cudaStream_t stream) {
  const long n = (long)rows * R;
  if (n <= 0) return;
  gate_forward_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(chi, scan_in, chi_pre, mask, proj_u, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void ssm_readout_forward(float* readout, const float* S, const float* proj_v, const float* chi, const float* mask,
                         int rows, int R, cudaStream_t stream) {
  const long n = (long)rows * R;
  if (n <= 0) return;
  readout_forward_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(readout, S, proj_v, chi, mask, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void ssm_readout_backward(float* dS, const float* dreadout, const float* proj_v, const float* chi,
                          const float* mask, int rows, int R, cudaStream_t stream) {
  const long n = (long)rows * R;
  if (n <= 0) return;
  readout_backward_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(dS, dreadout, proj_v, chi, mask, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void ssm_gate_backward(float* dproj_u, float* dproj_v, float* dchi_pre, float* dm, const float* dscan_in,
                       const float* dreadout, const float* S, const float* proj_u, const float* proj_v,
                       const float* chi, const float* mask, int rows, int R, cudaStream_t stream) {
  const long n = (long)rows * R;
  if (n <= 0 || !(dproj_u || dproj_v || dchi_pre || dm)) return;
  gate_backward_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(dproj_u, dproj_v, dchi_pre, dm, dscan_in,
                                                                  dreadout, S, proj_u, proj_v, chi, mask, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace muse::cuda
