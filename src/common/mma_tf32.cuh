#pragma once
// fp32-accurate matrix products on the tensor cores: 3xTF32 with mma.sync m16n8k8 (sm_80 and later).
// Each operand x is split as x = hi + lo (split_tf32 below); hi·hi + hi·lo + lo·hi keeps about as many
// bits as an fp32 FMA chain (the dropped lo·lo is ~2⁻²⁰ of the product), so kernels that the CPU
// reference checks at fp32 tolerances can use the tensor cores at three instructions a step. Under the
// tf32 and bf16 GEMM maths the same kernels take one TF32 pass (the kExact = false helpers below).
//
// Fragments of one warp, g = lane / 4, t = lane % 4 (PTX ISA, mma.m16n8k8 with .tf32):
//   A 16 × 8, row-major:  a0 (g, t)   a1 (g + 8, t)   a2 (g, t + 4)   a3 (g + 8, t + 4)
//   B  8 × 8, column:     b0 (t, g)   b1 (t + 4, g)
//   C 16 × 8:             c0 (g, 2t)  c1 (g, 2t + 1)  c2 (g + 8, 2t)  c3 (g + 8, 2t + 1)
// The summed index k only has to agree between A and B, so a caller may read k = t, t + 4 as the
// adjacent elements 2t, 2t + 1 of its storage (one 8-byte load) in both operands.

#include <cstdint>
#include <type_traits>

namespace muse::cuda {

struct Tf32A {
  uint32_t hi[4], lo[4];
};
struct Tf32B {
  uint32_t hi[2], lo[2];
};

// hi keeps the top 10 mantissa bits (truncation: one instruction, where cvt.rna.tf32.f32 is a sequence
// of about eight on sm_90); lo = x − hi is exact in fp32 and the tensor core reads its top 10 bits, so the
// split carries about 21 bits of x.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = __float_as_uint(x) & 0xffffe000u;
  lo = __float_as_uint(x - __uint_as_float(hi));
}

__device__ __forceinline__ Tf32A tf32_a(float a0, float a1, float a2, float a3) {
  Tf32A f;
  split_tf32(a0, f.hi[0], f.lo[0]);
  split_tf32(a1, f.hi[1], f.lo[1]);
  split_tf32(a2, f.hi[2], f.lo[2]);
  split_tf32(a3, f.hi[3], f.lo[3]);
  return f;
}

__device__ __forceinline__ Tf32B tf32_b(float b0, float b1) {
  Tf32B f;
  split_tf32(b0, f.hi[0], f.lo[0]);
  split_tf32(b1, f.hi[1], f.lo[1]);
  return f;
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a·b to about fp32 accuracy; the small terms first.
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const Tf32A& a, const Tf32B& b) {
  mma_tf32(d, a.lo, b.hi);
  mma_tf32(d, a.hi, b.lo);
  mma_tf32(d, a.hi, b.hi);
}

// A kernel that serves both the fp32 math (kExact: the 3xTF32 split above) and the GEMMs' tf32/bf16 math
// (one TF32 product a step, each operand rounded to its nearest TF32 value, ties away from zero; lo unused).
__device__ __forceinline__ uint32_t round_tf32(float x) { return (__float_as_uint(x) + 0x1000u) & 0xffffe000u; }

template <bool kExact>
__device__ __forceinline__ Tf32A to_tf32_a(float a0, float a1, float a2, float a3) {
  if constexpr (kExact) return tf32_a(a0, a1, a2, a3);
  Tf32A f;
  f.hi[0] = round_tf32(a0), f.hi[1] = round_tf32(a1), f.hi[2] = round_tf32(a2), f.hi[3] = round_tf32(a3);
  return f;
}

template <bool kExact>
__device__ __forceinline__ Tf32B to_tf32_b(float b0, float b1) {
  if constexpr (kExact) return tf32_b(b0, b1);
  Tf32B f;
  f.hi[0] = round_tf32(b0), f.hi[1] = round_tf32(b1);
  return f;
}

template <bool kExact>
__device__ __forceinline__ void mma_tf32_product(float (&d)[4], const Tf32A& a, const Tf32B& b) {
  if constexpr (kExact)
    mma_3xtf32(d, a, b);
  else
    mma_tf32(d, a.hi, b.hi);
}

// The A fragment of rows r0 (fragment rows g) and r1 (g + 8) of a row-major tile whose summed index k = t,
// t + 4 is stored as the adjacent columns c, c + 1 (c = the slice's first column + 2t): one 8-byte load a row.
// Split for 3xTF32 (kExact) or rounded for one pass, as to_tf32_a; likewise tf32_b_adjacent.
template <bool kExact = true>
__device__ __forceinline__ Tf32A tf32_a_adjacent(const float* tile, int stride, int r0, int r1, int c) {
  const float2 top = *reinterpret_cast<const float2*>(tile + r0 * stride + c);
  const float2 bottom = *reinterpret_cast<const float2*>(tile + r1 * stride + c);
  return to_tf32_a<kExact>(top.x, bottom.x, top.y, bottom.y);
}

// The B fragment of row n (fragment column g) of a tile stored [n][k], k = t, t + 4 as columns c, c + 1.
template <bool kExact = true>
__device__ __forceinline__ Tf32B tf32_b_adjacent(const float* tile, int stride, int n, int c) {
  const float2 x = *reinterpret_cast<const float2*>(tile + n * stride + c);
  return to_tf32_b<kExact>(x.x, x.y);
}

// acc += Σ_{k_begin ≤ κ < k_end} Lt[κ][m0 + m]·R[κ][n0 + n] over one warp's 16 × 8·kNT block (m < 16,
// n < 8·kNT), both operands stored with the summed index outermost (row κ of ld floats); 3xTF32 when kExact,
// else one TF32 pass. The bounds are multiples of 8; an ld ≡ 8 (mod 32) makes the scalar fragment loads
// conflict free. Accumulator element e of n-tile nt is (m0 + g + 8·(e / 2), n0 + 8·nt + 2t + e % 2).
template <bool kExact, int kNT>
__device__ __forceinline__ void mma_tf32_kmajor(float (&acc)[kNT][4], const float* Lt, const float* R, int ld, int m0,
                                                int n0, int k_begin, int k_end) {
  const int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
  for (int k0 = k_begin; k0 < k_end; k0 += 8) {
    const float* a = Lt + (k0 + t) * ld + m0 + g;
    const Tf32A fa = to_tf32_a<kExact>(a[0], a[8], a[4 * ld], a[4 * ld + 8]);
    const float* b = R + (k0 + t) * ld + n0 + g;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
      mma_tf32_product<kExact>(acc[nt], fa, to_tf32_b<kExact>(b[8 * nt], b[4 * ld + 8 * nt]));
  }
}

// Host side: calls launch(std::true_type) when exact, else launch(std::false_type), so that a launcher picks
// the kExact instance of its kernel from a run-time choice.
template <class Launch>
void with_exactness(bool exact, Launch&& launch) {
  if (exact)
    launch(std::true_type{});
  else
    launch(std::false_type{});
}

}  // namespace muse::cuda
