#include <gtest/gtest.h>

#include <cmath>

#include "ops/causal_attn.h"
#include "support/gradcheck.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

// Dense reference: full N×N score matrix with an explicit causal mask.
std::vector<double> naive_attention(const std::vector<double>& q, const std::vector<double>& k,
                                    const std::vector<double>& v, int B, int N, int H, int D, bool alibi) {
  const int dh = D / H;
  std::vector<double> o(q.size(), 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < N; ++i) {
        std::vector<double> w(N, 0.0);
        double total = 0;
        for (int j = 0; j < N; ++j) {
          if (j > i) continue;
          double s = 0;
          for (int d = 0; d < dh; ++d) s += q[(b * N + i) * D + h * dh + d] * k[(b * N + j) * D + h * dh + d];
          s /= std::sqrt(double(dh));
          if (alibi) s -= std::pow(2.0, -8.0 * (h + 1) / H) * (i - j);
          w[j] = std::exp(s);
          total += w[j];
        }
        for (int j = 0; j <= i; ++j)
          for (int d = 0; d < dh; ++d) o[(b * N + i) * D + h * dh + d] += w[j] / total * v[(b * N + j) * D + h * dh + d];
      }
  return o;
}

}  // namespace

TEST(causal_attn_forward, matches_dense_reference) {
  Rng rng(11);
  const int B = 2, N = 9, H = 3, D = 12;
  for (bool alibi : {false, true}) {
    auto q = random_normal(B * N * D, rng), k = random_normal(B * N * D, rng), v = random_normal(B * N * D, rng);
    std::vector<double> o(q.size()), lse(B * H * N);
    causal_attn_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), B, N, H, D, alibi);
    auto ref = naive_attention(q, k, v, B, N, H, D, alibi);
    for (size_t i = 0; i < o.size(); ++i) EXPECT_NEAR(o[i], ref[i], 1e-12);
  }
}

TEST(causal_attn_grad, q_k_v) {
  Rng rng(12);
  const int B = 2, N = 7, H = 2, D = 6;
  auto q = random_normal(B * N * D, rng), k = random_normal(B * N * D, rng), v = random_normal(B * N * D, rng);
  auto w = random_normal(B * N * D, rng);
  for (bool alibi : {false, true}) {
    auto loss = [&] {
      std::vector<double> o(q.size()), lse(B * H * N);
      causal_attn_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), B, N, H, D, alibi);
      return weighted_sum(o, w);
    };
    std::vector<double> o(q.size()), lse(B * H * N), dq(q.size()), dk(k.size()), dv(v.size());
    causal_attn_forward(o.data(), lse.data(), q.data(), k.data(), v.data(), B, N, H, D, alibi);
    causal_attn_backward(dq.data(), dk.data(), dv.data(), w.data(), q.data(), k.data(), v.data(), o.data(), lse.data(),
                         B, N, H, D, alibi);
    expect_gradients_match(loss, {{"q", &q, &dq}, {"k", &k, &dk}, {"v", &v, &dv}});
  }
}

TEST(causal_attn_causal, future_never_reaches_the_past) {
  Rng rng(13);
  const int B = 2, N = 8, H = 2, D = 4;
  auto base = random_normal<float>(B * N * D, rng);
  // The same input drives q, k and v, so every path from position j is perturbed.
  auto op = [&](const std::vector<float>& x) {
    std::vector<float> o(x.size()), lse(B * H * N);
    causal_attn_forward(o.data(), lse.data(), x.data(), x.data(), x.data(), B, N, H, D, true);
    return o;
  };
  expect_causal<float>(op, base, B, N, D, D, "causal_attn");
}

}  // namespace muse::test
