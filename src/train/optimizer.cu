#include <cmath>
#include <stdexcept>

#include "common/cuda_check.cuh"
#include "train/optimizer.cuh"

namespace muse::cuda {

namespace {

constexpr int kNormThreads = 256;
constexpr int kClipThreads = 256;
constexpr int kStepThreads = 256;

// Partial Σ g² per block (double), grid-stride over a grid that depends on n only.
__global__ void sum_squares_kernel(double* partials, const float* grads, size_t n) {
  __shared__ double partial[kNormThreads];
  double sum = 0;
  const size_t stride = size_t(gridDim.x) * kNormThreads;
  for (size_t i = size_t(blockIdx.x) * kNormThreads + threadIdx.x; i < n; i += stride)
    sum += double(grads[i]) * grads[i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int s = kNormThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = partial[0];
}

// norm = √(Σ partials), one block of kGradNormBlocks threads, fixed tree.
__global__ void finish_norm_kernel(double* norm, const double* partials, int blocks) {
  __shared__ double partial[kGradNormBlocks];
  partial[threadIdx.x] = int(threadIdx.x) < blocks ? partials[threadIdx.x] : 0.0;
  __syncthreads();
  for (int s = kGradNormBlocks / 2; s > 0; s /= 2) {
    if (int(threadIdx.x) < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) norm[0] = sqrt(partial[0]);
}

__global__ void clip_kernel(float* grads, size_t n, const double* norm, double max_norm) {
  const double total = norm[0];
  if (!(max_norm > 0 && total > max_norm)) return;  // NaN norm: no clipping, as on the CPU
  const float scale = float(max_norm / total);
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) grads[i] *= scale;
}

struct StepArgs {
  double b1, one_minus_b1, b2, one_minus_b2;
  double correction1, correction2, lr, eps, max_norm;
  float decay;  // float(1 − lr·weight_decay), applied to ranges with decay
};

// One block per chunk. The arithmetic mirrors muse::AdamW::step operation by operation (double with
// explicit rounding, so nvcc cannot contract it into FMAs the host does not use):
//   m = float(b1·m + (1−b1)·g);  v = float(b2·v + (1−b2)·g·g);
//   p = float(double(p ·_f32 decay) − lr·(m/c1) / (√(v/c2) + eps))
__global__ void adamw_kernel(float* params, const float* grads, float* m, float* v, const AdamW::Chunk* chunks,
                             StepArgs a, const double* clip_norm) {
  const AdamW::Chunk chunk = chunks[blockIdx.x];
  // A non-finite norm means a non-finite gradient: leave the weights and moments as they were, so the
  // trainer (which reads the norm after the step) can stop with the model intact.
  if (clip_norm && !isfinite(clip_norm[0])) return;
  bool clip = false;
  float clip_scale = 1.f;
  if (clip_norm && a.max_norm > 0) {
    const double total = clip_norm[0];
    if (total > a.max_norm) {
      clip = true;
      clip_scale = float(a.max_norm / total);
    }
  }
  const float decay = chunk.decay ? a.decay : 1.f;
  for (int k = threadIdx.x; k < chunk.size; k += blockDim.x) {
    const size_t i = size_t(chunk.offset) + k;
    float g = grads[i];
    if (clip) g = __fmul_rn(g, clip_scale);
    const double gd = double(g);
    const float mi = float(__dadd_rn(__dmul_rn(a.b1, double(m[i])), __dmul_rn(a.one_minus_b1, gd)));
    const float vi = float(__dadd_rn(__dmul_rn(a.b2, double(v[i])), __dmul_rn(__dmul_rn(a.one_minus_b2, gd), gd)));
    m[i] = mi;
    v[i] = vi;
    const double mhat = __ddiv_rn(double(mi), a.correction1);
    const double vhat = __ddiv_rn(double(vi), a.correction2);
    const double update = __ddiv_rn(__dmul_rn(a.lr, mhat), __dadd_rn(__dsqrt_rn(vhat), a.eps));
    params[i] = float(__dsub_rn(double(__fmul_rn(params[i], decay)), update));
  }
}

int norm_blocks(size_t n) {
  const size_t blocks = (n + size_t(kNormThreads) * 4 - 1) / (size_t(kNormThreads) * 4);
  return int(blocks < size_t(kGradNormBlocks) ? (blocks > 0 ? blocks : 1) : kGradNormBlocks);
}

}  // namespace

void grad_norm(double* norm, const float* grads, size_t n, double* partials, cudaStream_t stream) {
  const int blocks = norm_blocks(n);
  sum_squares_kernel<<<blocks, kNormThreads, 0, stream>>>(partials, grads, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
  finish_norm_kernel<<<1, kGradNormBlocks, 0, stream>>>(norm, partials, blocks);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void clip_grads(float* grads, size_t n, const double* norm, double max_norm, cudaStream_t stream) {
  if (n == 0 || !(max_norm > 0)) return;
  const size_t blocks = (n + kClipThreads - 1) / kClipThreads;
  const int grid = int(blocks < 65535 * 16 ? blocks : 65535 * 16);
  clip_kernel<<<grid, kClipThreads, 0, stream>>>(grads, n, norm, max_norm);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void clip_grad_norm(float* grads, size_t n, double max_norm, double* norm, double* partials, cudaStream_t stream) {
  grad_norm(norm, grads, n, partials, stream);
  clip_grads(grads, n, norm, max_norm, stream);
}

AdamW::AdamW(std::vector<ParamRange> ranges, size_t total, AdamWConfig config) : config_(config), total_(total) {
  std::vector<Chunk> chunks;
  for (const ParamRange& r : ranges) {
    if (r.offset + r.size > total) throw std::invalid_argument("cuda::AdamW: parameter range beyond the array");
    for (size_t start = 0; start < r.size; start += kChunk) {
      const size_t len = r.size - start < size_t(kChunk) ? r.size - start : size_t(kChunk);
      chunks.push_back({static_cast<unsigned long long>(r.offset + start), int(len), r.decay ? 1 : 0});
    }
  }
  if (chunks.size() > size_t(0x7fffffff)) throw std::invalid_argument("cuda::AdamW: too many chunks");
  num_chunks_ = int(chunks.size());
  const size_t bytes = (total > 0 ? total : 1) * sizeof(float);
  MUSE_CUDA_CHECK(cudaMalloc(&m_, bytes));
  MUSE_CUDA_CHECK(cudaMalloc(&v_, bytes));
  MUSE_CUDA_CHECK(cudaMemset(m_, 0, bytes));
  MUSE_CUDA_CHECK(cudaMemset(v_, 0, bytes));
  if (num_chunks_ > 0) {
    MUSE_CUDA_CHECK(cudaMalloc(&chunks_, chunks.size() * sizeof(Chunk)));
    MUSE_CUDA_CHECK(cudaMemcpy(chunks_, chunks.data(), chunks.size() * sizeof(Chunk), cudaMemcpyHostToDevice));
  }
  // step() runs on the caller's stream, which may be non-blocking (it does not wait for the default stream
  // these initialisations ran on): finish them here.
  MUSE_CUDA_CHECK(cudaDeviceSynchronize());
}

AdamW::~AdamW() {
  cudaFree(m_);
  cudaFree(v_);
  cudaFree(chunks_);
}

void AdamW::step(float* params, const float* grads, double lr, cudaStream_t stream, const double* clip_norm,
                 double max_norm) {
  ++t_;
  StepArgs a{};
  a.b1 = config_.beta1;
  a.b2 = config_.beta2;
  a.one_minus_b1 = 1 - config_.beta1;
  a.one_minus_b2 = 1 - config_.beta2;
  a.correction1 = 1.0 - std::pow(config_.beta1, double(t_));
  a.correction2 = 1.0 - std::pow(config_.beta2, double(t_));
  a.lr = lr;
  a.eps = config_.eps;
  a.max_norm = max_norm;
  a.decay = float(1.0 - lr * config_.weight_decay);
  if (num_chunks_ == 0) return;
  adamw_kernel<<<num_chunks_, kStepThreads, 0, stream>>>(params, grads, m_, v_, chunks_, a, clip_norm);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace muse::cuda
