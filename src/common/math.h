// Scalar functions shared by the ops, with their derivatives. Templated on the float type so the CPU
// ops run in float (speed) and double (gradient checks) from one source.
#pragma once
#include <cmath>

// MUSE_HD marks the helpers below callable from CUDA device code too (nvcc only; host behaviour unchanged).
#ifdef __CUDACC__
#define MUSE_HD __host__ __device__
#else
#define MUSE_HD
#endif

namespace muse {

template <typename T> MUSE_HD inline T sigmoid(T x) {
  // Branch on the sign so exp never overflows.
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  T e = std::exp(x);
  return e / (T(1) + e);
}

// softplus(x) = log(1 + e^x), computed without overflow; its derivative is sigmoid(x).
template <typename T> MUSE_HD inline T softplus(T x) {
  return x > T(0) ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

// GELU with the exact erf form: x·Φ(x).
template <typename T> MUSE_HD inline T gelu(T x) {
  return T(0.5) * x * (T(1) + std::erf(x / std::sqrt(T(2))));
}
template <typename T> MUSE_HD inline T gelu_grad(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x / std::sqrt(T(2))));
  const T pdf = std::exp(T(-0.5) * x * x) / std::sqrt(T(2) * T(M_PI));
  return cdf + x * pdf;
}

// cap_C(x) = C·tanh(x/C): a smooth clamp to (−C, C).
template <typename T> MUSE_HD inline T cap(T x, T c) { return c * std::tanh(x / c); }
template <typename T> MUSE_HD inline T cap_grad(T x, T c) {
  const T t = std::tanh(x / c);
  return T(1) - t * t;
}

}  // namespace muse
