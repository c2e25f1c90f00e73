#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/bf16_pack.cuh"
#include "common/column_reduce.cuh"
#include "common/cuda_check.cuh"
#include "common/row_grid.cuh"
#include "ops/linear.cuh"

#define MUSE_CUBLAS_CHECK(call)                                                                                \
  do {                                                                                                         \
    cublasStatus_t muse_status_ = (call);                                                                      \
    if (muse_status_ != CUBLAS_STATUS_SUCCESS)                                                                 \
      throw std::runtime_error(std::string("cuBLASLt error: ") + cublasLtGetStatusString(muse_status_) + " in " + \
                               #call + " at " + __FILE__ + ":" + std::to_string(__LINE__));                    \
  } while (0)

namespace muse::cuda {

// ---------------------------------------------------------------------------------------------------------
// BlasLt

BlasLt::BlasLt(int device) : device_(device) {
  int previous = 0;
  MUSE_CUDA_CHECK(cudaGetDevice(&previous));
  MUSE_CUDA_CHECK(cudaSetDevice(device));
  MUSE_CUBLAS_CHECK(cublasLtCreate(&handle_));
  MUSE_CUDA_CHECK(cudaMalloc(&workspace_, kWorkspaceBytes));
  MUSE_CUDA_CHECK(cudaSetDevice(previous));
}

BlasLt::~BlasLt() {
  // Errors are ignored: a destructor must not throw, and at process exit the runtime may be gone already.
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

BlasLt& BlasLt::current() {
  int device = 0;
  MUSE_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::vector<BlasLt*> instances;  // leaked on purpose: see the class comment
  std::lock_guard<std::mutex> lock(mutex);
  if (instances.size() <= size_t(device)) instances.resize(size_t(device) + 1, nullptr);
  if (!instances[device]) instances[device] = new BlasLt(device);
  return *instances[device];
}

bool BlasLt::lookup(const Key& key, cublasLtMatmulAlgo_t* algo, bool* available) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = algos_.find(key);
  if (it == algos_.end()) return false;
  *algo = it->second.first;
  *available = it->second.second;
  return true;
}

void BlasLt::remember(const Key& key, const cublasLtMatmulAlgo_t& algo, bool available) {
  std::lock_guard<std::mutex> lock(mutex_);
  algos_[key] = {algo, available};
}

namespace {

// ---------------------------------------------------------------------------------------------------------
// Small kernels

// C[M×N] (row stride ldc) = beta·C, or 0 when beta == 0 (never reads C then): the K = 0 GEMM.
__global__ void scale_matrix_kernel(float* C, int M, int N, int ldc, float beta) {
  const long total = long(M) * N;
  for (long idx = blockIdx.x * long(blockDim.x) + threadIdx.x; idx < total; idx += long(gridDim.x) * blockDim.x) {
    float* c = C + (idx / N) * long(ldc) + idx % N;
    *c = beta == 0.f ? 0.f : beta * *c;
  }
}

// y[r, o] = b[o] + residual[r, o] (either may be null; residual may be y): what the GEMM then adds to with
// beta = 1, when no BIAS-epilogue algorithm exists (exactly like the CPU op) or in = 0.
__global__ void broadcast_rows_kernel(float* y, const float* b, const float* residual, int rows, int cols) {
  const long total = long(rows) * cols;
  for (long idx = blockIdx.x * long(blockDim.x) + threadIdx.x; idx < total; idx += long(gridDim.x) * blockDim.x)
    y[idx] = (b ? b[idx % cols] : 0.f) + (residual ? residual[idx] : 0.f);
}

// The bias gradient's term for common/column_reduce.cuh: row r's dy (fp32 or bf16, summed in fp32).
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
struct RowTerm {
  const T* dy;
  int cols;
  __device__ void operator()(long r, int c, float (&acc)[1]) const { acc[0] += widen(dy[r * cols + c]); }
};

constexpr int kColumnThreads = 128;  // D = 512 is 128 vectors of four

// out[r·ld + c] = bf16(x[r·cols + c]) on a row_grid. kVectors: 4 columns per thread (cols a multiple of 4, x
// 16-byte and out 8-byte aligned, ld a multiple of 4).
template <bool kVectors>
__global__ void to_bf16_columns_kernel(__nv_bfloat16* out, int ld, const float* x, int rows, int cols) {
  constexpr int kWidth = kVectors ? 4 : 1;
  const int c = (blockIdx.x * blockDim.x + threadIdx.x) * kWidth;
  if (c >= cols) return;
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* from = x + size_t(r) * cols + c;
    __nv_bfloat16* to = out + size_t(r) * ld + c;
    if constexpr (kVectors) {
      *reinterpret_cast<uint2*>(to) = narrow4(*reinterpret_cast<const float4*>(from));
    } else {
      *to = __float2bfloat16_rn(*from);
    }
  }
}

// kVectors: 4 values per step (x 16-byte, out 8-byte aligned; the last n % 4 one by one).
template <bool kVectors>
__global__ void to_bf16_kernel(__nv_bfloat16* out, const float* x, size_t n) {
  const size_t first = blockIdx.x * size_t(blockDim.x) + threadIdx.x, stride = size_t(gridDim.x) * blockDim.x;
  size_t done = 0;
  if constexpr (kVectors) {
    done = n / 4 * 4;
    for (size_t i = first; i < n / 4; i += stride)
      reinterpret_cast<uint2*>(out)[i] = narrow4(reinterpret_cast<const float4*>(x)[i]);
  }
  for (size_t i = done + first; i < n; i += stride) out[i] = __float2bfloat16_rn(x[i]);
}

int grid_for(long total, int block) {
  const long blocks = (total + block - 1) / block;
  return int(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

// Largest power of two ≤ 256 dividing the address: what cuBLASLt may assume about a pointer. (Its default
// assumption is 256 bytes, wrong for sub-buffers such as one tensor inside a flat gradient array.)
int alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  int align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

// A strided batch of GEMMs: matrix i of X is X + i·stride_X elements (stride 0: one matrix for all).
struct Batch {
  int count = 1;
  long long stride_a = 0, stride_b = 0, stride_c = 0;
};

// What cuBLASLt may assume about every matrix of a batch: the base's alignment and the stride's.
int batch_alignment(const void* p, long long stride, size_t element_bytes) {
  const int base = alignment_of(p);
  if (stride == 0) return base;
  return std::min(base, alignment_of(reinterpret_cast<const void*>(uintptr_t(stride) * element_bytes)));
}

// The element types of one GEMM: A and B hold `operands`, C holds `output` (each CUDA_R_32F or CUDA_R_16BF).
struct ElementTypes {
  cudaDataType_t operands, output;
};

size_t element_bytes(cudaDataType_t type) { return type == CUDA_R_32F ? sizeof(float) : sizeof(__nv_bfloat16); }

// What the cache key records of the types and the math: the GemmMath for fp32 operands (it picks the compute
// type), and for bf16 operands, which always accumulate in plain fp32, the output type.
int types_key(const ElementTypes& types, GemmMath math) {
  if (types.operands == CUDA_R_32F) return int(math);
  return types.output == CUDA_R_16BF ? -1 : -2;
}

// RAII holders for the cuBLASLt descriptors. fp32 operands multiply in the BlasLt's GemmMath; bf16
// operands always accumulate in plain fp32.
struct MatmulDesc {
  cublasLtMatmulDesc_t desc = nullptr;
  MatmulDesc(GemmMath math, cudaDataType_t operands) {
    cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
    if (operands == CUDA_R_32F && math == GemmMath::tf32) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
    if (operands == CUDA_R_32F && math == GemmMath::bf16) compute = CUBLAS_COMPUTE_32F_FAST_16BF;
    MUSE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, compute, CUDA_R_32F));
  }
  ~MatmulDesc() { cublasLtMatmulDescDestroy(desc); }
};
struct Layout {
  cublasLtMatrixLayout_t layout = nullptr;
  Layout(cudaDataType_t storage, uint64_t rows, uint64_t cols, int64_t ld, int batch = 1, long long stride = 0) {
    MUSE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, storage, rows, cols, ld));
    if (batch > 1) {
      const int32_t count = batch;
      const int64_t offset = stride;
      MUSE_CUBLAS_CHECK(
          cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
      MUSE_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &offset,
                                                         sizeof(offset)));
    }
  }
  ~Layout() { cublasLtMatrixLayoutDestroy(layout); }
};
struct Preference {
  cublasLtMatmulPreference_t pref = nullptr;
  Preference() { MUSE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref)); }
  ~Preference() { cublasLtMatmulPreferenceDestroy(pref); }
};

// Row-major C = alpha·op(A)·op(B) + beta·C (+ bias[N] broadcast over rows when bias is non-null), with
// M, N, K > 0. Returns false (and does nothing) only when a bias was asked for and cuBLASLt has no
// algorithm with the BIAS epilogue for this problem; throws when it has none without one.
//
// Row-major C[M×N] is column-major Cᵀ[N×M] with the same stride, so the call is Cᵀ = op(B)ᵀ·op(A)ᵀ:
// cuBLASLt's "A" is our B and its "B" is our A, each with its own transpose flag. The bias of the BIAS
// epilogue runs along cuBLASLt's m = N dimension, i.e. one value per column of our row-major C.
// A and B hold types.operands elements, C types.output ones; the bias is fp32. With batch.count > 1 the
// call runs that many GEMMs of the same shape at strided addresses (no bias then). With C_in, beta scales
// C_in instead of C (same layout; cuBLASLt's C, with our C as its D).
bool matmul(BlasLt& blas, const ElementTypes& types, bool trans_a, bool trans_b, int M, int N, int K, float alpha,
            const void* A, int lda, const void* B, int ldb, float beta, void* C, int ldc, const float* bias,
            cudaStream_t stream, const Batch& batch = Batch{}, const void* C_in = nullptr) {
  if (!C_in) C_in = C;
  MatmulDesc op(blas.math(), types.operands);
  const cublasOperation_t op_lt_a = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt A = our B
  const cublasOperation_t op_lt_b = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt B = our A
  MUSE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_lt_a, sizeof(op_lt_a)));
  MUSE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_lt_b, sizeof(op_lt_b)));
  if (bias) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    MUSE_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    const void* bias_ptr = bias;
    MUSE_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(op.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof(bias_ptr)));
  }
  // Column-major shapes as stored (before the op): our B is [K×N] (or [N×K] when transposed) row-major,
  // i.e. column-major [N×K] (or [K×N]).
  Layout lt_a(types.operands, trans_b ? K : N, trans_b ? N : K, ldb, batch.count, batch.stride_b);
  Layout lt_b(types.operands, trans_a ? M : K, trans_a ? K : M, lda, batch.count, batch.stride_a);
  Layout lt_c(types.output, N, M, ldc, batch.count, batch.stride_c);

  const int align_a = batch_alignment(A, batch.stride_a, element_bytes(types.operands));
  const int align_b = batch_alignment(B, batch.stride_b, element_bytes(types.operands));
  const int align_c = std::min(batch_alignment(C, batch.stride_c, element_bytes(types.output)),
                               batch_alignment(C_in, batch.stride_c, element_bytes(types.output)));
  const int align_bias = bias ? alignment_of(bias) : 0;
  const int math_key = types_key(types, blas.math());
  // A shared (stride 0) operand changes the problem cuBLASLt sees, so the key records which are shared.
  const int shared = (batch.stride_a == 0 ? 1 : 0) | (batch.stride_b == 0 ? 2 : 0) | (batch.stride_c == 0 ? 4 : 0);
  const BlasLt::Key key{M, N, K, lda, ldb, ldc, int(trans_a), int(trans_b), bias ? 1 : 0,
                        align_a, align_b, align_c, align_bias, math_key, batch.count, shared};
  cublasLtMatmulAlgo_t algo{};
  bool available = false;
  if (!blas.lookup(key, &algo, &available)) {
    Preference pref;
    const uint64_t workspace = BlasLt::kWorkspaceBytes;
    MUSE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                           &workspace, sizeof(workspace)));
    // cuBLASLt's A is our B and vice versa; C and D are the same buffer.
    const uint32_t lt_align_a = uint32_t(align_b), lt_align_b = uint32_t(align_a), lt_align_c = uint32_t(align_c);
    MUSE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                           &lt_align_a, sizeof(lt_align_a)));
    MUSE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                           &lt_align_b, sizeof(lt_align_b)));
    MUSE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                           &lt_align_c, sizeof(lt_align_c)));
    MUSE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                           &lt_align_c, sizeof(lt_align_c)));
    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(blas.handle(), op.desc, lt_a.layout, lt_b.layout,
                                                                 lt_c.layout, lt_c.layout, pref.pref, 1, &result,
                                                                 &returned);
    // NOT_SUPPORTED (or zero results) means "no algorithm for this configuration", not a failure.
    if (status != CUBLAS_STATUS_NOT_SUPPORTED) MUSE_CUBLAS_CHECK(status);
    available = status == CUBLAS_STATUS_SUCCESS && returned > 0 && result.state == CUBLAS_STATUS_SUCCESS;
    if (available) algo = result.algo;
    blas.remember(key, algo, available);
  }
  if (!available) {
    if (bias) return false;
    auto name = [](cudaDataType_t type) { return type == CUDA_R_32F ? std::string("fp32") : std::string("bf16"); };
    throw std::runtime_error("cuBLASLt has no algorithm for a " + std::to_string(M) + "x" + std::to_string(N) + "x" +
                             std::to_string(K) + " GEMM of " + name(types.operands) + " operands into " +
                             name(types.output));
  }
  // cuBLASLt's A = our B, B = our A; its C = C_in, its D = our C.
  MUSE_CUBLAS_CHECK(cublasLtMatmul(blas.handle(), op.desc, &alpha, B, lt_a.layout, A, lt_b.layout, &beta, C_in,
                                   lt_c.layout, C, lt_c.layout, &algo, blas.workspace(), BlasLt::kWorkspaceBytes,
                                   stream));
  return true;
}

// gemm() into an fp32 C for operands of either type, empty sizes included (K = 0 only scales C by beta).
void gemm_into_fp32(BlasLt& blas, cudaDataType_t operands, bool trans_a, bool trans_b, int M, int N, int K,
                    float alpha, const void* A, int lda, const void* B, int ldb, float beta, float* C, int ldc,
                    cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (beta == 1.f) return;
    scale_matrix_kernel<<<grid_for(long(M) * N, 256), 256, 0, stream>>>(C, M, N, ldc, beta);
    MUSE_CUDA_CHECK(cudaGetLastError());
    return;
  }
  matmul(blas, {operands, CUDA_R_32F}, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, nullptr,
         stream);
}

}  // namespace

GemmMath gemm_math_from_string(const std::string& name) {
  if (name == "fp32") return GemmMath::fp32;
  if (name == "tf32") return GemmMath::tf32;
  if (name == "bf16") return GemmMath::bf16;
  throw std::invalid_argument("--gpu-math " + name + ": expected tf32, bf16 or fp32");
}

bool fp32_products() { return BlasLt::current().math() == GemmMath::fp32; }

void gemm(BlasLt& blas, bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc, cudaStream_t stream) {
  gemm_into_fp32(blas, CUDA_R_32F, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, stream);
}

void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const __nv_bfloat16* A, int lda,
          const __nv_bfloat16* B, int ldb, float beta, float* C, int ldc, cudaStream_t stream) {
  gemm_into_fp32(BlasLt::current(), CUDA_R_16BF, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
                 stream);
}

void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
          int ldb, float beta, float* C, int ldc, cudaStream_t stream) {
  gemm(BlasLt::current(), trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, stream);
}

namespace {

// gemm_strided_batched for fp32 or bf16 operands into an fp32 C.
template <class T>
void batched_into_fp32(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const T* A, int lda,
                       long long stride_a, const T* B, int ldb, long long stride_b, float beta, float* C, int ldc,
                       long long stride_c, int batch, cudaStream_t stream) {
  constexpr cudaDataType_t kOperands = sizeof(T) == 4 ? CUDA_R_32F : CUDA_R_16BF;
  if (M <= 0 || N <= 0 || batch <= 0) return;
  if (K <= 0 || batch == 1) {
    for (int i = 0; i < batch; ++i)
      gemm(trans_a, trans_b, M, N, K, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, beta, C + i * stride_c, ldc,
           stream);
    return;
  }
  matmul(BlasLt::current(), {kOperands, CUDA_R_32F}, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
         nullptr, stream, Batch{batch, stride_a, stride_b, stride_c});
}

}  // namespace

void gemm_strided_batched(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                          long long stride_a, const float* B, int ldb, long long stride_b, float beta, float* C,
                          int ldc, long long stride_c, int batch, cudaStream_t stream) {
  batched_into_fp32(trans_a, trans_b, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc, stride_c,
                    batch, stream);
}

void gemm_strided_batched(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const __nv_bfloat16* A,
                          int lda, long long stride_a, const __nv_bfloat16* B, int ldb, long long stride_b, float beta,
                          float* C, int ldc, long long stride_c, int batch, cudaStream_t stream) {
  batched_into_fp32(trans_a, trans_b, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc, stride_c,
                    batch, stream);
}

void gemm_bf16(bool trans_a, bool trans_b, int M, int N, int K, const __nv_bfloat16* A, int lda,
               const __nv_bfloat16* B, int ldb, __nv_bfloat16* C, int ldc, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    MUSE_CUDA_CHECK(cudaMemset2DAsync(C, size_t(ldc) * sizeof(__nv_bfloat16), 0, size_t(N) * sizeof(__nv_bfloat16),
                                      size_t(M), stream));
    return;
  }
  matmul(BlasLt::current(), {CUDA_R_16BF, CUDA_R_16BF}, trans_a, trans_b, M, N, K, 1.f, A, lda, B, ldb, 0.f, C, ldc,
         nullptr, stream);
}

namespace {

// The partials live in the GEMM workspace: it is free between the GEMMs of the same stream.
template <class T>
void sum_columns_into(float* db, const T* dy, int rows, int cols, cudaStream_t stream) {
  column_reduce<1>({db}, RowTerm<T>{dy, cols}, rows, cols, static_cast<float*>(BlasLt::current().workspace()),
                   BlasLt::kWorkspaceBytes / sizeof(float), stream);
}

}  // namespace

void column_sum_accumulate(float* db, const float* dy, int rows, int cols, cudaStream_t stream) {
  sum_columns_into(db, dy, rows, cols, stream);
}

void column_sum_accumulate(float* db, const __nv_bfloat16* dy, int rows, int cols, cudaStream_t stream) {
  sum_columns_into(db, dy, rows, cols, stream);
}

namespace {

// linear_forward for fp32 or bf16 operands (x, W) into an fp32 y.
template <class T>
void linear_forward_into_fp32(float* y, const T* x, const T* W, const float* b, int rows, int in, int out,
                              const float* residual, cudaStream_t stream) {
  constexpr cudaDataType_t kOperands = sizeof(T) == 4 ? CUDA_R_32F : CUDA_R_16BF;
  if (rows <= 0 || out <= 0) return;
  BlasLt& blas = BlasLt::current();
  const float beta = residual ? 1.f : 0.f;
  if (in > 0) {
    if (!b) {
      matmul(blas, {kOperands, CUDA_R_32F}, false, true, rows, out, in, 1.f, x, in, W, in, beta, y, out, nullptr,
             stream, Batch{}, residual);
      return;
    }
    // The BIAS epilogue only for a 16-byte aligned bias: cuBLASLt's alignment preferences do not cover the
    // bias pointer, and kernels assuming 16 bytes have been reported to fault on a less aligned one.
    if (alignment_of(b) >= 16 && matmul(blas, {kOperands, CUDA_R_32F}, false, true, rows, out, in, 1.f, x, in, W, in,
                                        beta, y, out, b, stream, Batch{}, residual))
      return;
  }
  // y = b + residual: the result when in = 0, else what the GEMM adds to.
  broadcast_rows_kernel<<<grid_for(long(rows) * out, 256), 256, 0, stream>>>(y, b, residual, rows, out);
  MUSE_CUDA_CHECK(cudaGetLastError());
  if (in > 0)
    matmul(blas, {kOperands, CUDA_R_32F}, false, true, rows, out, in, 1.f, x, in, W, in, 1.f, y, out, nullptr, stream);
}

}  // namespace

void linear_forward(float* y, const float* x, const float* W, const float* b, int rows, int in, int out,
                    cudaStream_t stream, const float* residual) {
  linear_forward_into_fp32(y, x, W, b, rows, in, out, residual, stream);
}

void linear_forward(float* y, const __nv_bfloat16* x, const __nv_bfloat16* W, const float* b, int rows, int in,
                    int out, cudaStream_t stream, const float* residual) {
  linear_forward_into_fp32(y, x, W, b, rows, in, out, residual, stream);
}

void to_bf16(__nv_bfloat16* out, const float* x, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 8 == 0)
    to_bf16_kernel<true><<<grid_for(long(n / 4 + 1), 256), 256, 0, stream>>>(out, x, n);
  else
    to_bf16_kernel<false><<<grid_for(long(n), 256), 256, 0, stream>>>(out, x, n);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void to_bf16_columns(__nv_bfloat16* out, int ld, const float* x, int rows, int cols, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  const bool vectors = cols % 4 == 0 && ld % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(out) % 8 == 0;
  const dim3 grid = row_grid(rows, vectors ? cols / 4 : cols, kColumnThreads);
  if (vectors)
    to_bf16_columns_kernel<true><<<grid, kColumnThreads, 0, stream>>>(out, ld, x, rows, cols);
  else
    to_bf16_columns_kernel<false><<<grid, kColumnThreads, 0, stream>>>(out, ld, x, rows, cols);
  MUSE_CUDA_CHECK(cudaGetLastError());
}

void linear_backward(float* dx, float* dW, float* db, const float* dy, const float* x, const float* W, int rows,
                     int in, int out, cudaStream_t stream) {
  BlasLt& blas = BlasLt::current();
  if (dx) gemm(blas, false, false, rows, in, out, 1.f, dy, out, W, in, 1.f, dx, in, stream);  // dx += dy·W
  if (dW) gemm(blas, true, false, out, in, rows, 1.f, dy, out, x, in, 1.f, dW, in, stream);   // dW += dyᵀ·x
  if (db) column_sum_accumulate(db, dy, rows, out, stream);
}

}  // namespace muse::cuda
