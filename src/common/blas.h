// Row-major GEMM over OpenBLAS for float and double:
//   C[M×N] = alpha · op(A)[M×K] · op(B)[K×N] + beta · C,  op(X) = Xᵀ when trans_X.
// lda/ldb/ldc are the row strides of A, B and C as stored.
#pragma once

namespace muse {

template <typename T>
void gemm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, int lda, const T* B,
          int ldb, T beta, T* C, int ldc);

}  // namespace muse
