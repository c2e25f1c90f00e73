#include "common/blas.h"

#include <cblas.h>

#include <algorithm>

namespace muse {

// A one-row product C = alpha·a·op(B) + beta·C is a matrix-vector product with op(B)ᵀ. OpenBLAS's GEMM
// packs all of B before multiplying, which for one row costs more than the product itself (recurrent
// decode runs every projection with one row per stream), so one-row products go to GEMV.
// (C's row stride ldc is irrelevant for one row; a transposed one-row A is read with stride lda.)
template <>
void gemm<float>(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                 const float* B, int ldb, float beta, float* C, int ldc) {
  if (M == 0 || N == 0) return;
  if (M == 1) {
    if (beta == float(0)) std::fill(C, C + N, float(0));  // C may be uninitialised: never let 0·NaN through
    cblas_sgemv(CblasRowMajor, trans_b ? CblasNoTrans : CblasTrans, trans_b ? N : K, trans_b ? K : N, alpha, B, ldb,
                A, trans_a ? lda : 1, beta, C, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N,
              K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int M, int N, int K, double alpha, const double* A, int lda,
                  const double* B, int ldb, double beta, double* C, int ldc) {
  if (M == 0 || N == 0) return;
  if (M == 1) {
    if (beta == double(0)) std::fill(C, C + N, double(0));  // C may be uninitialised: never let 0·NaN through
    cblas_dgemv(CblasRowMajor, trans_b ? CblasNoTrans : CblasTrans, trans_b ? N : K, trans_b ? K : N, alpha, B, ldb,
                A, trans_a ? lda : 1, beta, C, 1);
    return;
  }
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N,
              K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace muse
