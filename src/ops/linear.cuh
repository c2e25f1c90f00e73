// CUDA linear layer and GEMM on cuBLASLt: the same contract as ops/linear.h and common/blas.h, on device
// pointers (fp32 storage, plus bf16 operands where a caller keeps bf16 copies).
//
// Precision: by default every GEMM runs with CUBLAS_COMPUTE_32F and fp32 scale type — plain fp32 FMA, no
// TF32 (cuBLASLt ignores the legacy handle math mode, and NVIDIA_TF32_OVERRIDE can only disable TF32) and no
// BF16x9 emulation (not on sm_90, and no emulation descriptor is set). This is the fp32 reference mode of
// SPEC §6: results match the CPU GEMM to summation-order rounding (~1e-6 relative for K up to a few
// thousand). BlasLt::set_math switches fp32-storage GEMMs to the tensor cores: GemmMath::tf32 or
// GemmMath::bf16 (the model's fast modes). GEMMs whose operands are stored in bf16 always accumulate in fp32.
//
// Determinism: cuBLASLt gives bit-identical results run to run for the same problem, algorithm, workspace
// size and GPU model. The algorithm for a problem is chosen once (heuristic, cached in BlasLt) and reused.
#pragma once
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <array>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace muse::cuda {

// One cuBLASLt handle, one workspace and a cache of chosen algorithms, for one device. for_device() hands
// out a process-wide instance per device (created on first use, never destroyed: its lifetime is the
// process, which avoids tearing cuBLASLt down after the CUDA runtime at exit). Host-side use is
// thread-safe (the algorithm cache is locked). The workspace is shared by every GEMM on the device and by
// the column reductions of the parameter gradients (column_sum_accumulate, layernorm_backward), which keep
// their partial sums there between GEMMs: work issued on two different streams that runs concurrently would
// race on it, so keep the GEMMs and backward passes of one device on one stream.
// How the GEMMs multiply: fp32 is plain fp32 FMA (the reference mode: results match the CPU to summation
// order); tf32 runs the products on the tensor cores with 10-bit mantissas and fp32 accumulation
// (CUBLAS_COMPUTE_32F_FAST_TF32: inputs and outputs stay fp32), several times faster, ~1e-3 relative;
// bf16 rounds the inputs to bf16 (8-bit mantissas) for the bf16 tensor cores with fp32 accumulation
// (CUBLAS_COMPUTE_32F_FAST_16BF, which may also pick TF32 kernels: never less accurate than bf16), ~4e-3
// relative per product; on fp32 storage it ran no faster than tf32 (H200, the model's GEMMs). In bf16 math
// the GPU model's training head goes further and multiplies bf16 copies of its operands
// (model/cuda_model.h): 2.5× faster than tf32 there.
enum class GemmMath { fp32, tf32, bf16 };

// "fp32", "tf32" or "bf16" (the --gpu-math flag); throws std::invalid_argument naming the value otherwise.
GemmMath gemm_math_from_string(const std::string& name);

// Whether the current device's GEMM math (BlasLt::current()) is fp32: the attention kernels' own tensor-core
// products then run as 3xTF32 (fp32-accurate), under tf32 and bf16 as one TF32 pass, as the GEMMs do.
bool fp32_products();

class BlasLt {
 public:
  static constexpr size_t kWorkspaceBytes = size_t(32) << 20;  // NVIDIA's recommendation for Hopper

  explicit BlasLt(int device);
  ~BlasLt();
  BlasLt(const BlasLt&) = delete;
  BlasLt& operator=(const BlasLt&) = delete;

  // The shared instance for the current device (cudaGetDevice).
  static BlasLt& current();

  cublasLtHandle_t handle() const { return handle_; }
  // The math of every GEMM issued through this instance from now on (default fp32).
  void set_math(GemmMath math) { math_ = math; }
  GemmMath math() const { return math_; }
  void* workspace() const { return workspace_; }
  int device() const { return device_; }

  // Cache of heuristic choices: a problem key (shape, strides, transposes, epilogue, pointer alignments,
  // batch; built in linear.cu) → (algorithm, whether cuBLASLt offered one).
  using Key = std::array<int, 16>;
  bool lookup(const Key& key, cublasLtMatmulAlgo_t* algo, bool* available);
  void remember(const Key& key, const cublasLtMatmulAlgo_t& algo, bool available);

 private:
  int device_;
  GemmMath math_ = GemmMath::fp32;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  std::mutex mutex_;
  std::map<Key, std::pair<cublasLtMatmulAlgo_t, bool>> algos_;
};

// Row-major C[M×N] = alpha·op(A)[M×K]·op(B)[K×N] + beta·C, op(X) = Xᵀ when trans_X; lda/ldb/ldc are the
// row strides as stored (exactly common/blas.h's gemm). M, N or K may be 0 (K = 0 scales C by beta).
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc, cudaStream_t stream = 0);
void gemm(BlasLt& blas, bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc, cudaStream_t stream = 0);

// batch GEMMs of one shape in one launch: C_i = alpha·op(A_i)·op(B_i) + beta·C_i with X_i = X + i·stride_X
// elements (a stride of 0 shares one matrix between all of them, e.g. one input against several weights).
void gemm_strided_batched(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                          long long stride_a, const float* B, int ldb, long long stride_b, float beta, float* C,
                          int ldc, long long stride_c, int batch, cudaStream_t stream = 0);

// The same GEMMs with bf16 operands and an fp32 C, accumulated in fp32 whatever the GemmMath: the training
// step's GEMMs in bf16 math (bf16 copies of the weights and of the activations that feed them).
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const __nv_bfloat16* A, int lda,
          const __nv_bfloat16* B, int ldb, float beta, float* C, int ldc, cudaStream_t stream = 0);
void gemm_strided_batched(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const __nv_bfloat16* A,
                          int lda, long long stride_a, const __nv_bfloat16* B, int ldb, long long stride_b, float beta,
                          float* C, int ldc, long long stride_c, int batch, cudaStream_t stream = 0);

// out[i] = bf16(x[i]), rounded to nearest: a bf16 copy of an operand.
void to_bf16(__nv_bfloat16* out, const float* x, size_t n, cudaStream_t stream = 0);
// out[r, c] = bf16(x[r, c]) for row-major x [rows, cols] into a bf16 matrix of row stride ld ≥ cols: x as a
// block of columns of a wider bf16 operand (q, k, v's gradients side by side for one GEMM).
void to_bf16_columns(__nv_bfloat16* out, int ld, const float* x, int rows, int cols, cudaStream_t stream = 0);

// Row-major C[M×N] = op(A)·op(B) with bf16 storage and fp32 accumulation (no alpha/beta: C is written).
// The inference head's GEMM (bf16 logits, SPEC §7).
void gemm_bf16(bool trans_a, bool trans_b, int M, int N, int K, const __nv_bfloat16* A, int lda,
               const __nv_bfloat16* B, int ldb, __nv_bfloat16* C, int ldc, cudaStream_t stream = 0);

// y[rows, out] = x[rows, in]·Wᵀ + b + residual   (b and residual may be null; residual may be y itself, which
// then accumulates). W is [out, in] row-major. The bias is fused into the GEMM as a cuBLASLt BIAS epilogue
// when b is 16-byte aligned, and the residual is the GEMM's C (beta = 1, written to y); otherwise, or when
// cuBLASLt has no epilogue algorithm for the shape, a broadcast kernel writes b + residual into y and the
// GEMM runs with beta = 1.
void linear_forward(float* y, const float* x, const float* W, const float* b, int rows, int in, int out,
                    cudaStream_t stream = 0, const float* residual = nullptr);

// The same with bf16 x and W (fp32 accumulation, fp32 y and b).
void linear_forward(float* y, const __nv_bfloat16* x, const __nv_bfloat16* W, const float* b, int rows, int in,
                    int out, cudaStream_t stream = 0, const float* residual = nullptr);

// dx += dy·W,  dW += dyᵀ·x,  db += Σ_rows dy   (each may be null; accumulated: GEMMs with beta = 1, the
// bias gradient by a deterministic column reduction).
void linear_backward(float* dx, float* dW, float* db, const float* dy, const float* x, const float* W, int rows,
                     int in, int out, cudaStream_t stream = 0);

// db[cols] += Σ_r dy[r, cols] over a row-major [rows, cols] matrix, in a fixed order (deterministic; two
// stages with the partials in BlasLt::current()'s workspace, see common/column_reduce.cuh).
void column_sum_accumulate(float* db, const float* dy, int rows, int cols, cudaStream_t stream = 0);
// The same over bf16 dy (summed in fp32).
void column_sum_accumulate(float* db, const __nv_bfloat16* dy, int rows, int cols, cudaStream_t stream = 0);

}  // namespace muse::cuda
