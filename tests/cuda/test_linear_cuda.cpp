#include "ops/linear.cuh"

#include <cuda_bf16.h>

#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/blas.h"
#include "cuda/gpu_support.h"
#include "ops/linear.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

// fp32 GEMMs on both sides (OpenBLAS on the CPU, cuBLASLt with CUBLAS_COMPUTE_32F — no TF32 — on the GPU);
// they differ only in summation order. A dot product of K O(1) terms carries a rounding error of order
// eps·√K·|partial sums| ≈ 1e-6 of the largest entries for K ≤ 512, so every comparison allows
// kRel·max|cpu| absolute plus kRel relative, kRel = 1e-5 (10× margin; an indexing bug gives O(1) errors).
// TF32 would miss this by ~100× (its 10-bit mantissa gives ~1e-3 relative errors), so the test also
// proves TF32 is off.
constexpr double kRel = 1e-5;

void expect_close_scaled(const std::vector<float>& gpu, const std::vector<float>& cpu, const std::string& what) {
  expect_close_to_reference(gpu, cpu, kRel * max_abs(cpu), kRel, what);
}

std::vector<float> nan_vector(size_t n) { return std::vector<float>(n, std::nanf("")); }

// Forward (with and without bias) and backward (every gradient, accumulated onto non-zero values). With
// offset = 1 every device pointer is shifted by one float (4-byte alignment), which cuBLASLt must be told
// about (the default algorithm choice assumes 256-byte alignment).
void check_linear(int rows, int in, int out, int offset) {
  SCOPED_TRACE("rows " + std::to_string(rows) + ", in " + std::to_string(in) + ", out " + std::to_string(out) +
               ", offset " + std::to_string(offset));
  Rng rng(rows * 7919 + in * 131 + out + offset);
  const size_t nx = size_t(rows) * in, nw = size_t(out) * in, ny = size_t(rows) * out;
  auto x = random_normal<float>(nx, rng), W = random_normal<float>(nw, rng, 1.0 / std::sqrt(in));
  auto b = random_normal<float>(out, rng), dy = random_normal<float>(ny, rng);
  auto dx0 = random_normal<float>(nx, rng, 0.5), dW0 = random_normal<float>(nw, rng, 0.5),
       db0 = random_normal<float>(out, rng, 0.5);  // non-zero: checks accumulation

  // Device copies at the requested offset inside a larger allocation.
  auto shifted = [&](const std::vector<float>& host) {
    std::vector<float> padded(host.size() + offset, 0.f);
    std::copy(host.begin(), host.end(), padded.begin() + offset);
    return padded;
  };
  auto unshift = [&](const std::vector<float>& dev) { return std::vector<float>(dev.begin() + offset, dev.end()); };

  // The residual: none, its own buffer, or y itself (which then accumulates).
  const auto residual = random_normal<float>(ny, rng);
  enum class Residual { none, apart, in_place };
  for (bool with_bias : {true, false})
    for (Residual mode : {Residual::none, Residual::apart, Residual::in_place}) {
      SCOPED_TRACE(std::string(with_bias ? "with bias" : "without bias") + ", residual " +
                   (mode == Residual::none ? "none" : mode == Residual::apart ? "apart" : "in place"));
      std::vector<float> y(ny);
      linear_forward(y.data(), x.data(), W.data(), with_bias ? b.data() : nullptr, rows, in, out);
      if (mode != Residual::none)
        for (size_t i = 0; i < ny; ++i) y[i] += residual[i];
      DeviceBuffer<float> gx(shifted(x)), gW(shifted(W)), gb(shifted(b)), gr(shifted(residual));
      DeviceBuffer<float> gy(shifted(mode == Residual::in_place ? residual : nan_vector(ny)));
      const float* r = mode == Residual::none ? nullptr : mode == Residual::apart ? gr.get() : gy.get();
      cuda::linear_forward(gy.get() + offset, gx.get() + offset, gW.get() + offset,
                           with_bias ? gb.get() + offset : nullptr, rows, in, out, 0, r ? r + offset : nullptr);
      expect_close_scaled(unshift(gy.download()), y, "y");
    }

  std::vector<float> dx = dx0, dW = dW0, db = db0;
  linear_backward(dx.data(), dW.data(), db.data(), dy.data(), x.data(), W.data(), rows, in, out);
  DeviceBuffer<float> gx(shifted(x)), gW(shifted(W)), gdy(shifted(dy)), gdx(shifted(dx0)), gdW(shifted(dW0)),
      gdb(shifted(db0));
  cuda::linear_backward(gdx.get() + offset, gdW.get() + offset, gdb.get() + offset, gdy.get() + offset,
                        gx.get() + offset, gW.get() + offset, rows, in, out);
  expect_close_scaled(unshift(gdx.download()), dx, "dx");
  expect_close_scaled(unshift(gdW.download()), dW, "dW");
  expect_close_scaled(unshift(gdb.download()), db, "db");

  // Null gradients are skipped: only db requested.
  DeviceBuffer<float> gdb_only(shifted(db0));
  cuda::linear_backward(nullptr, nullptr, gdb_only.get() + offset, gdy.get() + offset, gx.get() + offset,
                        gW.get() + offset, rows, in, out);
  expect_close_scaled(unshift(gdb_only.download()), db, "db alone");
}

}  // namespace

TEST(linear_cuda, forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (int rows : {1, 37, 256})
    for (auto [in, out] : {std::pair{10, 37}, std::pair{64, 64}, std::pair{512, 10}, std::pair{37, 512}})
      check_linear(rows, in, out, 0);
}

TEST(linear_cuda, misaligned_pointers_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (auto [rows, in, out] : {std::tuple{37, 64, 64}, std::tuple{256, 512, 37}, std::tuple{1, 10, 10}})
    check_linear(rows, in, out, 1);
}

// The head shape of the tied HTT embedding: logits [rows, Vp] = h·Eᵀ with Vp = 50304, and its backward.
TEST(linear_cuda, vocabulary_head_matches_cpu) {
  MUSE_REQUIRE_GPU();
  check_linear(37, 64, 50304, 0);
}

// The general GEMM: all transpose combinations, row strides wider than the matrices, alpha/beta, K = 0.
TEST(linear_cuda, gemm_matches_cpu) {
  MUSE_REQUIRE_GPU();
  for (auto [M, N, K] : {std::tuple{1, 37, 10}, std::tuple{37, 10, 64}, std::tuple{64, 33, 257}, std::tuple{5, 7, 0}})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        SCOPED_TRACE("M " + std::to_string(M) + " N " + std::to_string(N) + " K " + std::to_string(K) + " ta " +
                     std::to_string(ta) + " tb " + std::to_string(tb));
        Rng rng(M * 1000 + N * 10 + K + ta * 2 + tb);
        const int a_rows = ta ? K : M, a_cols = ta ? M : K, b_rows = tb ? N : K, b_cols = tb ? K : N;
        const int lda = a_cols + 3, ldb = b_cols + 1, ldc = N + 5;
        auto A = random_normal<float>(size_t(std::max(a_rows, 1)) * lda, rng);
        auto B = random_normal<float>(size_t(std::max(b_rows, 1)) * ldb, rng);
        auto C = random_normal<float>(size_t(M) * ldc, rng);
        std::vector<float> C_cpu = C;
        const float alpha = 0.75f, beta = -0.5f;
        gemm<float>(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C_cpu.data(), ldc);
        if (K == 0)  // OpenBLAS may skip K = 0 entirely; the contract is C = beta·C
          for (int m = 0; m < M; ++m)
            for (int n = 0; n < N; ++n) C_cpu[size_t(m) * ldc + n] = beta * C[size_t(m) * ldc + n];
        DeviceBuffer<float> gA(A), gB(B), gC(C);
        cuda::gemm(ta, tb, M, N, K, alpha, gA.get(), lda, gB.get(), ldb, beta, gC.get(), ldc);
        // The padding columns of C (n ≥ N) must be left as they were (the CPU side leaves them too).
        expect_close_scaled(gC.download(), C_cpu, "C");
      }
}

// Strided batches: each GEMM of the batch against the CPU GEMM on its own matrices, with a shared (stride 0)
// A or B, strides wider than the matrices, and a stride that breaks 16-byte alignment.
TEST(linear_cuda, strided_batched_gemm_matches_cpu) {
  MUSE_REQUIRE_GPU();
  const int M = 37, N = 24, K = 65, batch = 3;
  for (auto [ta, tb] : {std::pair{false, true}, std::pair{true, false}})
    for (auto [share_a, share_b, pad] :
         {std::tuple{true, false, 0}, std::tuple{false, true, 1}, std::tuple{false, false, 64}}) {
      SCOPED_TRACE("ta " + std::to_string(ta) + " tb " + std::to_string(tb) + " shared A " + std::to_string(share_a) +
                   " shared B " + std::to_string(share_b) + " pad " + std::to_string(pad));
      Rng rng(17 + ta + 2 * share_a + 4 * pad);
      const int lda = ta ? M : K, ldb = tb ? K : N, ldc = N;
      const long long size_a = (long long)(ta ? K : M) * lda, size_b = (long long)(tb ? N : K) * ldb;
      const long long stride_a = share_a ? 0 : size_a + pad, stride_b = share_b ? 0 : size_b + pad;
      const long long stride_c = (long long)M * ldc + pad;
      auto A = random_normal<float>(size_t(stride_a * (batch - 1) + size_a), rng);
      auto B = random_normal<float>(size_t(stride_b * (batch - 1) + size_b), rng);
      auto C = random_normal<float>(size_t(stride_c * batch), rng);
      std::vector<float> C_cpu = C;
      const float alpha = 1.25f, beta = 0.5f;
      for (int i = 0; i < batch; ++i)
        gemm<float>(ta, tb, M, N, K, alpha, A.data() + i * stride_a, lda, B.data() + i * stride_b, ldb, beta,
                    C_cpu.data() + i * stride_c, ldc);
      DeviceBuffer<float> gA(A), gB(B), gC(C);
      cuda::gemm_strided_batched(ta, tb, M, N, K, alpha, gA.get(), lda, stride_a, gB.get(), ldb, stride_b, beta,
                                 gC.get(), ldc, stride_c, batch);
      expect_close_scaled(gC.download(), C_cpu, "C");
    }
}

// Host values rounded to bf16 (to nearest), as bf16 and as the fp32 numbers they stand for.
struct Bf16Values {
  std::vector<__nv_bfloat16> bf16;
  std::vector<float> widened;
};
Bf16Values round_to_bf16(const std::vector<float>& x) {
  Bf16Values r;
  for (float v : x) {
    r.bf16.push_back(__float2bfloat16(v));
    r.widened.push_back(__bfloat162float(r.bf16.back()));
  }
  return r;
}

// bf16 operands into an fp32 C (the training head's GEMMs in bf16 math): a product of two bf16 values is
// exact in fp32, so against the CPU GEMM of the same values widened to fp32 only the summation order
// differs, and kRel holds. The head's three shapes (logits x·Eᵀ, du = dlogits·E, dE = dlogitsᵀ·x), each
// written (beta = 0 over NaN) and accumulated (beta = 1), and K = 0.
TEST(linear_cuda, bf16_operand_gemm_matches_cpu_on_the_same_values) {
  MUSE_REQUIRE_GPU();
  const int rows = 37, D = 64, Vp = 384;
  for (auto [ta, tb, M, N, K] : {std::tuple{false, true, rows, Vp, D}, std::tuple{false, false, rows, D, Vp},
                                 std::tuple{true, false, Vp, D, rows}, std::tuple{true, false, Vp, D, 0}})
    for (float beta : {0.f, 1.f}) {
      SCOPED_TRACE("ta " + std::to_string(ta) + " tb " + std::to_string(tb) + " M " + std::to_string(M) + " N " +
                   std::to_string(N) + " K " + std::to_string(K) + " beta " + std::to_string(beta));
      Rng rng(M + N + K + ta + int(beta));
      const int lda = ta ? M : K, ldb = tb ? K : N;
      const Bf16Values A = round_to_bf16(random_normal<float>(size_t(std::max(ta ? K : M, 1)) * std::max(lda, 1), rng));
      const Bf16Values B = round_to_bf16(random_normal<float>(size_t(std::max(tb ? N : K, 1)) * std::max(ldb, 1), rng));
      const std::vector<float> C = beta == 0.f ? nan_vector(size_t(M) * N) : random_normal<float>(size_t(M) * N, rng);
      std::vector<float> C_cpu = beta == 0.f ? std::vector<float>(C.size(), 0.f) : C;
      gemm<float>(ta, tb, M, N, K, 1.f, A.widened.data(), lda, B.widened.data(), ldb, beta, C_cpu.data(), N);
      DeviceBuffer<__nv_bfloat16> gA(A.bf16), gB(B.bf16);
      DeviceBuffer<float> gC(C);
      cuda::gemm(ta, tb, M, N, K, 1.f, gA.get(), lda, gB.get(), ldb, beta, gC.get(), N);
      expect_close_scaled(gC.download(), C_cpu, "C");
    }
}

// The model's bf16 operands: to_bf16 and to_bf16_columns round to nearest like the host's
// __float2bfloat16_rn, bit for bit, at sizes and offsets that take the vector paths and those that do not
// (n mod 4 ≠ 0, pointers off 16 bytes, a column count not a multiple of 4), and leave the other columns alone.
TEST(linear_cuda, bf16_copies_round_to_nearest) {
  MUSE_REQUIRE_GPU();
  auto bits = [](const std::vector<__nv_bfloat16>& v) {
    std::vector<unsigned short> out(v.size());
    std::memcpy(out.data(), v.data(), v.size() * sizeof(unsigned short));
    return out;
  };
  for (size_t n : {size_t(1), size_t(7), size_t(4096), size_t(70001)})
    for (int offset : {0, 1}) {
      SCOPED_TRACE("to_bf16 n " + std::to_string(n) + " offset " + std::to_string(offset));
      Rng rng(n + offset);
      const auto x = random_normal<float>(n + offset, rng, 100.0);
      std::vector<__nv_bfloat16> expected(n);
      for (size_t i = 0; i < n; ++i) expected[i] = __float2bfloat16_rn(x[i + offset]);
      DeviceBuffer<float> gx(x);
      DeviceBuffer<__nv_bfloat16> gy(n + offset);
      cuda::to_bf16(gy.get() + offset, gx.get() + offset, n);
      const auto got = gy.download();
      EXPECT_EQ(bits(std::vector<__nv_bfloat16>(got.begin() + offset, got.end())), bits(expected));
    }
  for (auto [rows, cols, ld] : {std::tuple{37, 64, 192}, std::tuple{5, 10, 13}, std::tuple{70000, 8, 8}}) {
    SCOPED_TRACE("to_bf16_columns rows " + std::to_string(rows) + " cols " + std::to_string(cols) + " ld " +
                 std::to_string(ld));
    Rng rng(rows + cols + ld);
    const auto x = random_normal<float>(size_t(rows) * cols, rng, 100.0);
    const __nv_bfloat16 marker = __float2bfloat16_rn(-7.f);
    std::vector<__nv_bfloat16> expected(size_t(rows) * ld, marker);
    const int first = ld - cols;  // the block sits in the last columns
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c)
        expected[size_t(r) * ld + first + c] = __float2bfloat16_rn(x[size_t(r) * cols + c]);
    DeviceBuffer<float> gx(x);
    DeviceBuffer<__nv_bfloat16> gy(std::vector<__nv_bfloat16>(expected.size(), marker));
    cuda::to_bf16_columns(gy.get() + first, ld, gx.get(), rows, cols);
    EXPECT_EQ(bits(gy.download()), bits(expected));
  }
}

// bf16 operands into fp32 results through the layer entry points: linear_forward (bias and residual, the
// FFN's and the output projection's form) and the strided batch (q, k, v from one u). A product of two bf16
// values is exact in fp32, so against the CPU on the widened values only the summation order differs.
TEST(linear_cuda, bf16_operand_layers_match_cpu_on_the_same_values) {
  MUSE_REQUIRE_GPU();
  const int rows = 37, in = 64, out = 48, batch = 3;
  Rng rng(23);
  const Bf16Values x = round_to_bf16(random_normal<float>(size_t(rows) * in, rng));
  const Bf16Values W = round_to_bf16(random_normal<float>(size_t(batch) * out * in, rng, 0.125));
  const auto b = random_normal<float>(out, rng), residual = random_normal<float>(size_t(rows) * out, rng);
  DeviceBuffer<__nv_bfloat16> gx(x.bf16), gW(W.bf16);
  DeviceBuffer<float> gb(b), gr(residual);
  for (bool with_bias : {true, false}) {
    SCOPED_TRACE(with_bias ? "linear_forward with bias" : "linear_forward without bias");
    std::vector<float> y(size_t(rows) * out);
    linear_forward(y.data(), x.widened.data(), W.widened.data(), with_bias ? b.data() : nullptr, rows, in, out);
    for (size_t i = 0; i < y.size(); ++i) y[i] += residual[i];
    DeviceBuffer<float> gy(nan_vector(y.size()));
    cuda::linear_forward(gy.get(), gx.get(), gW.get(), with_bias ? gb.get() : nullptr, rows, in, out, 0, gr.get());
    expect_close_scaled(gy.download(), y, "y");
  }
  std::vector<float> C_cpu(size_t(batch) * rows * out);
  for (int i = 0; i < batch; ++i)
    gemm<float>(false, true, rows, out, in, 1.f, x.widened.data(), in, W.widened.data() + size_t(i) * out * in, in, 0.f,
                C_cpu.data() + size_t(i) * rows * out, out);
  DeviceBuffer<float> gC(nan_vector(C_cpu.size()));
  cuda::gemm_strided_batched(false, true, rows, out, in, 1.f, gx.get(), in, 0, gW.get(), in, (long long)out * in, 0.f,
                             gC.get(), out, (long long)rows * out, batch);
  expect_close_scaled(gC.download(), C_cpu, "batched C");
}

// GemmMath::bf16 on fp32 storage (CUBLAS_COMPUTE_32F_FAST_16BF): the inputs are rounded to bf16 (≤ 2^-9
// relative each), so a product is off by ~1.6e-3 of itself (rms) and a sum of K N(0,1) products by
// ~1.6e-3·√K, against entries up to ~4·√K: the worst of a few thousand entries is within ~2e-3 of max|C|,
// and the test allows 1e-2 of it (5× margin; a layout or transpose bug gives O(1) errors). The math is
// restored afterwards (the BlasLt is shared by the process).
TEST(linear_cuda, bf16_math_gemm_matches_cpu_to_bf16_rounding) {
  MUSE_REQUIRE_GPU();
  cuda::BlasLt& blas = cuda::BlasLt::current();
  struct RestoreMath {
    cuda::BlasLt& blas;
    cuda::GemmMath saved;
    ~RestoreMath() { blas.set_math(saved); }
  } restore{blas, blas.math()};
  blas.set_math(cuda::GemmMath::bf16);
  for (auto [M, N, K] : {std::tuple{37, 96, 64}, std::tuple{64, 40, 128}})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        SCOPED_TRACE("M " + std::to_string(M) + " N " + std::to_string(N) + " K " + std::to_string(K) + " ta " +
                     std::to_string(ta) + " tb " + std::to_string(tb));
        Rng rng(M * 7 + N + K + 2 * ta + tb);
        const int lda = ta ? M : K, ldb = tb ? K : N;
        const auto A = random_normal<float>(size_t(ta ? K : M) * lda, rng);
        const auto B = random_normal<float>(size_t(tb ? N : K) * ldb, rng);
        const auto C = random_normal<float>(size_t(M) * N, rng);
        std::vector<float> C_cpu = C;
        gemm<float>(ta, tb, M, N, K, 1.f, A.data(), lda, B.data(), ldb, 0.5f, C_cpu.data(), N);
        DeviceBuffer<float> gA(A), gB(B), gC(C);
        cuda::gemm(ta, tb, M, N, K, 1.f, gA.get(), lda, gB.get(), ldb, 0.5f, gC.get(), N);
        expect_close_to_reference(gC.download(), C_cpu, 1e-2 * max_abs(C_cpu), 0.0, "C");
      }
}

}  // namespace muse::test
