// Small helpers shared by the op tests: random tensors, weighted-sum losses, causality checks.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/rng.h"

namespace muse::test {

// n values drawn N(mean, std²).
template <typename T = double>
std::vector<T> random_normal(size_t n, Rng& rng, double std = 1.0, double mean = 0.0) {
  std::vector<T> v(n);
  for (T& x : v) x = T(mean + std * rng.normal());
  return v;
}

// n values uniform in [lo, hi).
template <typename T = double>
std::vector<T> random_uniform(size_t n, Rng& rng, double lo, double hi) {
  std::vector<T> v(n);
  for (T& x : v) x = T(rng.uniform(lo, hi));
  return v;
}

// n token ids uniform in [0, V).
inline std::vector<int32_t> random_ids(size_t n, int V, Rng& rng) {
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = int32_t(rng.below(V));
  return ids;
}

// Σ w_i·y_i: the scalar loss whose gradient with respect to y is w, used to drive backward passes.
inline double weighted_sum(const std::vector<double>& y, const std::vector<double>& w) {
  double s = 0;
  for (size_t i = 0; i < y.size(); ++i) s += y[i] * w[i];
  return s;
}

template <typename T>
std::vector<T> convert(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// Causality of a sequence op on [B, N, in_width] → [B, N, out_width]: perturbing position j of every
// batch row must leave outputs at positions < j bit-identical, and must change some output at ≥ j
// (so the check cannot pass on an op that ignores its input).
template <typename T>
void expect_causal(const std::function<std::vector<T>(const std::vector<T>&)>& op, const std::vector<T>& input,
                   int B, int N, int in_width, int out_width, const std::string& what) {
  const std::vector<T> base = op(input);
  ASSERT_EQ(base.size(), size_t(B) * N * out_width) << what;
  for (int j = 0; j < N; ++j) {
    std::vector<T> x = input;
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < in_width; ++i) x[((size_t)b * N + j) * in_width + i] += T(0.5 + 0.1 * i);
    const std::vector<T> y = op(x);
    bool changed_later = false;
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < N; ++t)
        for (int o = 0; o < out_width; ++o) {
          const size_t k = ((size_t)b * N + t) * out_width + o;
          if (t < j) {
            ASSERT_EQ(y[k], base[k]) << what << ": output at t=" << t << " changed when position " << j
                                     << " was perturbed (batch " << b << ", channel " << o << ")";
          } else if (y[k] != base[k]) {
            changed_later = true;
          }
        }
    EXPECT_TRUE(changed_later) << what << ": perturbing position " << j << " changed nothing";
  }
}

}  // namespace muse::test
