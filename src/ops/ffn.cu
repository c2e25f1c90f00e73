#include <cstdint>
#include <initializer_list>
#include <stdexcept>

#include "common/bf16_pack.cuh"
#include "common/cuda_check.cuh"
#include "common/row_grid.cuh"
#include "ops/ffn.cuh"
#include "ops/linear.cuh"

namespace muse::cuda {

namespace {

constexpr int kBlock = 256;
constexpr float kCap = float(kFfnCap);

// The float forms of common/math.h with its divisions by constants (√2, √(2π), the cap) as products by their
// reciprocals: an IEEE division is about a dozen instructions, and the capped GELU's two of them made its
// kernel compute-bound; the results differ by an ulp. erff/expf/tanhf differ from the host libm by at most
// 2 ulp.
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.707106781187f)); }
__device__ __forceinline__ float gelu_grad(float x) {
  const float cdf = 0.5f * (1.f + erff(x * 0.707106781187f));
  const float pdf = expf(-0.5f * x * x) * 0.398942280401f;  // 1/√(2π)
  return cdf + x * pdf;
}

int grid_for(long n) {
  const long blocks = (n + kBlock - 1) / kBlock;
  return int(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

// The element-wise GELU kernels move 4 elements per thread with 16-byte loads and stores: they are
// memory-bound, and the wide accesses nearly halve their time. The hidden width 4D makes every count a
// multiple of 4; the pointers must be 16-byte aligned (cudaMalloc and the model's arena give 256).
void require_vectorizable(long n, std::initializer_list<const void*> arrays) {
  bool ok = n % 4 == 0;
  for (const void* a : arrays) ok = ok && reinterpret_cast<uintptr_t>(a) % 16 == 0;
  if (!ok)
    throw std::invalid_argument("ffn (cuda): GELU buffers must be 16-byte aligned with a multiple of 4 elements");
}

template <bool kCapped>
__device__ __forceinline__ float gelu_forward_value(float pre) {
  const float g = gelu(pre);
  return kCapped ? kCap * tanhf(g * (1.f / kCap)) : g;
}

// hidden = cap10(GELU(pre)) (capped) or GELU(pre), 4 elements per step (n a multiple of 4).
template <bool kCapped>
__global__ void gelu_forward_kernel(float4* hidden, const float4* pre, long vectors) {
  for (long v = blockIdx.x * long(blockDim.x) + threadIdx.x; v < vectors; v += long(gridDim.x) * blockDim.x) {
    const float4 x = pre[v];
    hidden[v] = make_float4(gelu_forward_value<kCapped>(x.x), gelu_forward_value<kCapped>(x.y),
                            gelu_forward_value<kCapped>(x.z), gelu_forward_value<kCapped>(x.w));
  }
}

// ∂L/∂pre from ∂L/∂hidden: d·(1 − tanh²)·GELU′(pre) with tanh = hidden/10 (capped), or d·GELU′(pre).
template <bool kCapped>
__device__ __forceinline__ float gelu_backward_value(float d, float pre, float hidden) {
  float scale = gelu_grad(pre);
  if (kCapped) {
    const float t = hidden * (1.f / kCap);
    scale = (1.f - t * t) * scale;
  }
  return d * scale;
}

// d = ∂L/∂hidden on entry, ∂L/∂pre on exit (hidden is read only when capped), 4 elements per step.
template <bool kCapped>
__global__ void gelu_backward_kernel(float4* d, const float4* pre, const float4* hidden, long vectors) {
  for (long v = blockIdx.x * long(blockDim.x) + threadIdx.x; v < vectors; v += long(gridDim.x) * blockDim.x) {
    float4 g = d[v];
    const float4 x = pre[v];
    const float4 h = kCapped ? hidden[v] : make_float4(0.f, 0.f, 0.f, 0.f);
    g.x = gelu_backward_value<kCapped>(g.x, x.x, h.x);
    g.y = gelu_backward_value<kCapped>(g.y, x.y, h.y);
    g.z = gelu_backward_value<kCapped>(g.z, x.z, h.z);
    g.w = gelu_backward_value<kCapped>(g.w, x.w, h.w);
    d[v] = g;
  }
}

template <bool kCapped>
void gelu_forward(float* hidden, const float* pre, long n, cudaStream_t stream) {
  require_vectorizable(n, {hidden, pre});
  gelu_forward_kernel<kCapped><<<grid_for(n / 4), kBlock, 0, stream>>>(
      reinterpret_cast<float4*>(hidden), reinterpret_cast<const float4*>(pre), n / 4);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

template <bool kCapped>
void gelu_backward(float* d, const float* pre, const float* hidden, long n, cudaStream_t stream) {
  require_vectorizable(n, {d, pre, kCapped ? hidden : nullptr});
  gelu_backward_kernel<kCapped><<<grid_for(n / 4), kBlock, 0, stream>>>(
      reinterpret_cast<float4*>(d), reinterpret_cast<const float4*>(pre), reinterpret_cast<const float4*>(hidden),
      n / 4);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

size_t round_up_64(size_t n) { return (n + 63) / 64 * 64; }

// ---- bf16 storage (the low-rank FFN in bf16 math) --------------------------------------------------------

// The 4D-wide layer as [rows, F/4] vectors of four, on a row_grid (the bias b₁ loaded once per thread).
// Results are stored in bf16 (2⁻⁹ relative), so the cap's tanh and the GELU slope's exp use the special
// function unit (tanh.approx: ~2⁻¹¹ relative; __expf): the fp32 functions made these kernels compute-bound.
__device__ __forceinline__ float tanh_sfu(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float capped_gelu_sfu(float z) { return kCap * tanh_sfu(gelu(z) * (1.f / kCap)); }
__device__ __forceinline__ float capped_gelu_backward_sfu(float d, float z, float hidden) {
  const float cdf = 0.5f * (1.f + erff(z * 0.707106781187f));
  const float pdf = __expf(-0.5f * z * z) * 0.398942280401f;
  const float t = hidden * (1.f / kCap);
  return d * ((1.f - t * t) * (cdf + z * pdf));
}

// hidden = cap10(GELU(pre + b₁)), pre being U₁V₁x without the bias.
__global__ void capped_gelu_forward_bf16_kernel(uint2* hidden, const uint2* pre, const float4* b1, int rows,
                                                int vectors_per_row) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= vectors_per_row) return;
  const float4 b = b1[c];
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const size_t i = size_t(r) * vectors_per_row + c;
    const float4 z = widen4(pre[i]);
    hidden[i] = narrow4(make_float4(capped_gelu_sfu(z.x + b.x), capped_gelu_sfu(z.y + b.y),
                                    capped_gelu_sfu(z.z + b.z), capped_gelu_sfu(z.w + b.w)));
  }
}

// d = ∂L/∂hidden on entry, ∂L/∂pre on exit: d·(1 − tanh²)·GELU′(pre + b₁) with tanh = hidden/10.
__global__ void capped_gelu_backward_bf16_kernel(uint2* d, const uint2* pre, const uint2* hidden, const float4* b1,
                                                 int rows, int vectors_per_row) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= vectors_per_row) return;
  const float4 b = b1[c];
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const size_t i = size_t(r) * vectors_per_row + c;
    const float4 g = widen4(d[i]), z = widen4(pre[i]), h = widen4(hidden[i]);
    d[i] = narrow4(make_float4(capped_gelu_backward_sfu(g.x, z.x + b.x, h.x),
                               capped_gelu_backward_sfu(g.y, z.y + b.y, h.y),
                               capped_gelu_backward_sfu(g.z, z.z + b.z, h.z),
                               capped_gelu_backward_sfu(g.w, z.w + b.w, h.w)));
  }
}

void require_bf16_vectors(int F, std::initializer_list<const void*> arrays, const float* b1) {
  bool ok = F % 4 == 0 && reinterpret_cast<uintptr_t>(b1) % 16 == 0;
  for (const void* a : arrays) ok = ok && reinterpret_cast<uintptr_t>(a) % 8 == 0;
  if (!ok)
    throw std::invalid_argument("ffn (cuda, bf16): the 4D-wide buffers must be 8-byte and b1 16-byte aligned");
}

}  // namespace

size_t lowrank_ffn_backward_scratch_floats(int rows, int D, int rank) {
  return 2 * round_up_64(size_t(rows) * rank) + round_up_64(size_t(rows) * ffn_hidden(D));
}

size_t dense_mlp_backward_scratch_floats(int rows, int D) { return size_t(rows) * ffn_hidden(D); }

void lowrank_ffn_forward(float* y, const LowRankFfnSaved<float>& saved, const float* x,
                         const LowRankFfnParams<float>& params, int rows, int D, int rank, cudaStream_t stream,
                         const float* residual) {
  if (rows <= 0) return;
  const int F = ffn_hidden(D);
  const long n = long(rows) * F;
  linear_forward(saved.low1, x, params.V1, nullptr, rows, D, rank, stream);
  linear_forward(saved.pre, saved.low1, params.U1, params.b1, rows, rank, F, stream);
  gelu_forward<true>(saved.hidden, saved.pre, n, stream);
  linear_forward(saved.low2, saved.hidden, params.V2, nullptr, rows, F, rank, stream);
  linear_forward(y, saved.low2, params.U2, params.b2, rows, rank, D, stream, residual);
}

void lowrank_ffn_backward(float* dx, const LowRankFfnGrads<float>& grads, const float* dy,
                          const LowRankFfnSaved<float>& saved, const float* x, const LowRankFfnParams<float>& params,
                          int rows, int D, int rank, float* scratch, cudaStream_t stream) {
  if (rows <= 0) return;
  const int F = ffn_hidden(D);
  const long n = long(rows) * F;
  float* dlow2 = scratch;
  float* dlow1 = dlow2 + round_up_64(size_t(rows) * rank);
  float* dpre = dlow1 + round_up_64(size_t(rows) * rank);
  // The intermediate gradients are written (beta = 0), the parameter gradients and dx accumulated.
  gemm(false, false, rows, rank, D, 1.f, dy, D, params.U2, rank, 0.f, dlow2, rank, stream);  // dlow2 = dy·U₂
  linear_backward(nullptr, grads.U2, grads.b2, dy, saved.low2, params.U2, rows, rank, D, stream);
  gemm(false, false, rows, F, rank, 1.f, dlow2, rank, params.V2, F, 0.f, dpre, F, stream);  // ∂L/∂hidden
  linear_backward(nullptr, grads.V2, nullptr, dlow2, saved.hidden, params.V2, rows, F, rank, stream);
  gelu_backward<true>(dpre, saved.pre, saved.hidden, n, stream);
  gemm(false, false, rows, rank, F, 1.f, dpre, F, params.U1, rank, 0.f, dlow1, rank, stream);  // dlow1 = dpre·U₁
  linear_backward(nullptr, grads.U1, grads.b1, dpre, saved.low1, params.U1, rows, rank, F, stream);
  linear_backward(dx, grads.V1, nullptr, dlow1, x, params.V1, rows, D, rank, stream);
}

size_t lowrank_ffn_bf16_backward_scratch_floats(int rows, int D, int rank) {
  // bf16 pairs per float: dy [rows, D], ∂low2 and ∂low1 [rows, rank], ∂pre [rows, 4D].
  auto floats = [](size_t bf16s) { return round_up_64((bf16s + 1) / 2); };
  return floats(size_t(rows) * D) + 2 * floats(size_t(rows) * rank) + floats(size_t(rows) * ffn_hidden(D));
}

void lowrank_ffn_forward_bf16(float* y, const LowRankFfnSaved<__nv_bfloat16>& saved, const __nv_bfloat16* x,
                              const LowRankFfnParams<float>& params, const LowRankFfnParams<__nv_bfloat16>& weights,
                              int rows, int D, int rank, cudaStream_t stream, const float* residual) {
  if (rows <= 0) return;
  const int F = ffn_hidden(D);
  require_bf16_vectors(F, {saved.pre, saved.hidden}, params.b1);
  gemm_bf16(false, true, rows, rank, D, x, D, weights.V1, D, saved.low1, rank, stream);
  gemm_bf16(false, true, rows, F, rank, saved.low1, rank, weights.U1, rank, saved.pre, F, stream);
  capped_gelu_forward_bf16_kernel<<<row_grid(rows, F / 4), kRowGridThreads, 0, stream>>>(
      reinterpret_cast<uint2*>(saved.hidden), reinterpret_cast<const uint2*>(saved.pre),
      reinterpret_cast<const float4*>(params.b1), rows, F / 4);
  MUSE_CUDA_CHECK(cudaGetLastError());
  gemm_bf16(false, true, rows, rank, F, saved.hidden, F, weights.V2, F, saved.low2, rank, stream);
  linear_forward(y, saved.low2, weights.U2, params.b2, rows, rank, D, stream, residual);
}

void lowrank_ffn_backward_bf16(float* dx, const LowRankFfnGrads<float>& grads, const float* dy,
                               const LowRankFfnSaved<__nv_bfloat16>& saved, const __nv_bfloat16* x,
                               const LowRankFfnParams<float>& params, const LowRankFfnParams<__nv_bfloat16>& weights,
                               int rows, int D, int rank, float* scratch, cudaStream_t stream, bool accumulate) {
  if (rows <= 0) return;
  const int F = ffn_hidden(D);
  auto part = [&](size_t bf16s) {
    __nv_bfloat16* p = reinterpret_cast<__nv_bfloat16*>(scratch);
    scratch += round_up_64((bf16s + 1) / 2);
    return p;
  };
  __nv_bfloat16* dy_bf16 = part(size_t(rows) * D);
  __nv_bfloat16* dlow2 = part(size_t(rows) * rank);
  __nv_bfloat16* dlow1 = part(size_t(rows) * rank);
  __nv_bfloat16* dpre = part(size_t(rows) * F);
  require_bf16_vectors(F, {saved.pre, saved.hidden, dpre}, params.b1);
  to_bf16(dy_bf16, dy, size_t(rows) * D, stream);
  // The intermediate gradients are written, the parameter gradients and dx accumulated (fp32).
  gemm_bf16(false, false, rows, rank, D, dy_bf16, D, weights.U2, rank, dlow2, rank, stream);  // dlow2 = dy·U₂
  if (grads.U2) gemm(true, false, D, rank, rows, 1.f, dy_bf16, D, saved.low2, rank, 1.f, grads.U2, rank, stream);
  if (grads.b2) column_sum_accumulate(grads.b2, dy, rows, D, stream);
  gemm_bf16(false, false, rows, F, rank, dlow2, rank, weights.V2, F, dpre, F, stream);  // ∂L/∂hidden
  if (grads.V2) gemm(true, false, rank, F, rows, 1.f, dlow2, rank, saved.hidden, F, 1.f, grads.V2, F, stream);
  capped_gelu_backward_bf16_kernel<<<row_grid(rows, F / 4), kRowGridThreads, 0, stream>>>(
      reinterpret_cast<uint2*>(dpre), reinterpret_cast<const uint2*>(saved.pre),
      reinterpret_cast<const uint2*>(saved.hidden), reinterpret_cast<const float4*>(params.b1), rows, F / 4);
  MUSE_CUDA_CHECK(cudaGetLastError());
  gemm_bf16(false, false, rows, rank, F, dpre, F, weights.U1, rank, dlow1, rank, stream);  // dlow1 = dpre·U₁
  if (grads.U1) gemm(true, false, F, rank, rows, 1.f, dpre, F, saved.low1, rank, 1.f, grads.U1, rank, stream);
  if (grads.b1) column_sum_accumulate(grads.b1, dpre, rows, F, stream);
  if (dx) gemm(false, false, rows, D, rank, 1.f, dlow1, rank, weights.V1, D, accumulate ? 1.f : 0.f, dx, D, stream);
  if (grads.V1) gemm(true, false, rank, D, rows, 1.f, dlow1, rank, x, D, 1.f, grads.V1, D, stream);
}

void dense_mlp_forward(float* y, const DenseMlpSaved<float>& saved, const float* x, const DenseMlpParams<float>& params,
                       int rows, int D, cudaStream_t stream) {
  if (rows <= 0) return;
  const int F = ffn_hidden(D);
  const long n = long(rows) * F;
  linear_forward(saved.pre, x, params.W1, params.b1, rows, D, F, stream);
  gelu_forward<false>(saved.hidden, saved.pre, n, stream);
  linear_forward(y, saved.hidden, params.W2, params.b2, rows, F, D, stream);
}

void dense_mlp_backward(float* dx, const DenseMlpGrads<float>& grads, const float* dy, const DenseMlpSaved<float>& saved,
                        const float* x, const DenseMlpParams<float>& params, int rows, int D, float* scratch,
                        cudaStream_t stream) {
  if (rows <= 0) return;
  const int F = ffn_hidden(D);
  const long n = long(rows) * F;
  float* dpre = scratch;
  gemm(false, false, rows, F, D, 1.f, dy, D, params.W2, F, 0.f, dpre, F, stream);  // ∂L/∂hidden = dy·W₂
  linear_backward(nullptr, grads.W2, grads.b2, dy, saved.hidden, params.W2, rows, F, D, stream);
  gelu_backward<false>(dpre, saved.pre, nullptr, n, stream);
  linear_backward(dx, grads.W1, grads.b1, dpre, x, params.W1, rows, D, F, stream);
}

}  // namespace muse::cuda
