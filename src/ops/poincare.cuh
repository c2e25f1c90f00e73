// The device side of ops/poincare.h: PairMath, the elementary functions its log-domain distance takes in the
// GPU attention kernels (ops/local_attn.cu for training, infer/cuda_decode_kernels.cu for decode).
#pragma once

namespace muse {

// The per-pair elementary functions (the log-domain distance, its gradient's weights, the softmax's
// probabilities) as the special function unit's approximations: one instruction each instead of a branching
// sequence of fifteen to twenty-five, in the loops that run once per (query, key) pair. Relative error about
// 2⁻²¹ (absolute about 2⁻²¹ for log near 1): a score moves by about 1e-6, well inside the tests' 1e-4.
// Division is __fdividef (about 2 ulp, no IEEE special-case path; the divisors here are norms, roots and
// κ, all in [1e-12, 1e30]).
// log1p(x) is taken as log(1 + x): its arguments here lie in (0, 3), where the absolute error stays below
// 1e-7. expm1, in ln sinh of small gaps, stays exact.
struct PairMath {
  __device__ static float log(float x) { return __logf(x); }
  __device__ static float exp(float x) { return __expf(x); }
  __device__ static float log1p(float x) { return __logf(1.f + x); }
  __device__ static float div(float x, float y) { return __fdividef(x, y); }
};

}  // namespace muse
