// Random parameters of the low-rank FFN (ops/ffn.h), shared by its CPU and GPU tests. The scales spread the
// GELU inputs over roughly ±15, which puts part of the hidden units well into the cap (cap10 differs from
// the identity by > 5 % beyond 4) without saturating it.
#pragma once
#include <cmath>
#include <vector>

#include "common/rng.h"
#include "ops/ffn.h"
#include "support/test_util.h"

namespace muse::test {

template <typename T>
struct RandomLowRankFfn {
  int D, rank, F;
  std::vector<T> V1, U1, b1, V2, U2, b2;

  RandomLowRankFfn(int D_, int rank_, Rng& rng) : D(D_), rank(rank_), F(ffn_hidden(D_)) {
    V1 = random_normal<T>(size_t(rank) * D, rng, 1.0 / std::sqrt(double(D)));
    U1 = random_normal<T>(size_t(F) * rank, rng, 2.5 / std::sqrt(double(rank)));
    b1 = random_normal<T>(F, rng, 0.5);
    V2 = random_normal<T>(size_t(rank) * F, rng, 1.0 / std::sqrt(double(F)));
    U2 = random_normal<T>(size_t(D) * rank, rng, 1.0 / std::sqrt(double(rank)));
    b2 = random_normal<T>(D, rng, 0.5);
  }
  LowRankFfnParams<T> params() const { return {V1.data(), U1.data(), b1.data(), V2.data(), U2.data(), b2.data()}; }
};

}  // namespace muse::test
