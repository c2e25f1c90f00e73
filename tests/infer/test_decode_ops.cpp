// The single-token decode ops against the rows of their parallel forwards: windowed hyperbolic attention
// against its ring buffer, the BK step, causal attention against a KV cache, and HTT embedding rows.
#include <gtest/gtest.h>

#include <cmath>

#include "ops/bk.h"
#include "ops/causal_attn.h"
#include "ops/htt.h"
#include "ops/local_attn.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

void expect_rows_near(const double* got, const double* want, int n, double tol, const std::string& what) {
  for (int i = 0; i < n; ++i)
    ASSERT_NEAR(got[i], want[i], tol * std::max(1.0, std::abs(want[i]))) << what << " [" << i << "]";
}

}  // namespace

TEST(decode_ops, local_attn_step_matches_every_forward_row) {
  const int N = 23, H = 3, D = 12, W = 5;
  Rng rng(1);
  // Norms up to ~10 per head, as trained models reach: the cached TangentNorm must serve them exactly.
  const auto q = random_normal(size_t(N) * D, rng, 3.0), k = random_normal(size_t(N) * D, rng, 3.0),
             v = random_normal(size_t(N) * D, rng), log_mu = random_uniform(size_t(N) * H, rng, -1.5, -0.05),
             beta = random_normal(H, rng, 0.5);
  const double c = 0.7;
  for (bool sliding : {true, false})
    for (bool alibi : {true, false})
      for (bool gated : {true, false}) {
        SCOPED_TRACE(std::string(sliding ? "sliding" : "block") + (alibi ? " alibi" : "") + (gated ? " gated" : ""));
        LocalAttnConfig cfg{1, N, H, D, W, sliding, alibi};
        const double* mu = gated ? log_mu.data() : nullptr;
        std::vector<double> o(size_t(N) * D), lse(size_t(N) * H);
        local_attn_forward<double>(o.data(), lse.data(), q.data(), k.data(), v.data(), c, beta.data(), mu, cfg);
        // From an empty buffer, and handed over from a prefill of P positions.
        for (int P : {0, W - 1, W, W + 1, 2 * W + 3}) {
          LocalAttnDecodeState<double> state;
          local_attn_decode_reset(state, cfg, gated);
          local_attn_decode_prefill(state, k.data(), v.data(), mu, c, P, cfg);
          for (int t = P; t < N; ++t) {
            local_attn_decode_push(state, &k[size_t(t) * D], &v[size_t(t) * D],
                                   gated ? &log_mu[size_t(t) * H] : nullptr, c, t, cfg);
            EXPECT_LE(state.count, W);
            std::vector<double> ot(D);
            local_attn_decode_step(ot.data(), state, &q[size_t(t) * D], c, beta.data(), cfg);
            expect_rows_near(ot.data(), &o[size_t(t) * D], D, 1e-12,
                             "prefill " + std::to_string(P) + ", row " + std::to_string(t));
          }
        }
      }
}

TEST(decode_ops, bk_step_matches_the_causal_layer_forward) {
  const int N = 17, D = 6;
  Rng rng(2);
  const auto u = random_normal(size_t(N) * D, rng), w_v = random_normal(D, rng, 0.5),
             w_J = random_normal(2 * D, rng, 0.5);
  const double b_v = 0.2, b_J = -0.1, eps_p = -1.0, E0 = 0.3;
  const BkParams<double> params{w_v.data(), &b_v, w_J.data(), &b_J, &eps_p, &E0, 1.0};
  for (bool hopping : {true, false}) {
    SCOPED_TRACE(hopping ? "hopping" : "pointwise");
    std::vector<double> g(size_t(N) * 2), F(size_t(N) * 3), sv(N), sJ(N), sJ2(N);
    bk_layer_forward<double>(g.data(), F.data(), {sv.data(), sJ.data(), sJ2.data()}, u.data(), params, hopping, 1, N,
                             D);
    for (int P : {0, 1, 5}) {
      double g_prev[2] = {0, 0}, prev_half = 0;
      if (P > 0) bk_decode_prefill<double>(g_prev, &prev_half, u.data(), g.data(), params, hopping, P, D);
      for (int t = P; t < N; ++t) {
        double gt[2], Ft[3];
        bk_decode_step<double>(gt, Ft, g_prev, hopping ? &prev_half : nullptr, &u[size_t(t) * D], params, hopping, 1,
                               D);
        expect_rows_near(gt, &g[size_t(t) * 2], 2, 1e-13, "g at " + std::to_string(t));
        expect_rows_near(Ft, &F[size_t(t) * 3], 3, 1e-13, "F at " + std::to_string(t));
      }
    }
  }
}

TEST(decode_ops, causal_attn_step_against_the_kv_cache_matches_the_forward) {
  const int N = 11, H = 2, D = 8;
  Rng rng(3);
  const auto q = random_normal(size_t(N) * D, rng), k = random_normal(size_t(N) * D, rng),
             v = random_normal(size_t(N) * D, rng);
  for (bool alibi : {true, false}) {
    std::vector<double> o(size_t(N) * D), lse(size_t(N) * H);
    causal_attn_forward<double>(o.data(), lse.data(), q.data(), k.data(), v.data(), 1, N, H, D, alibi);
    for (int t = 0; t < N; ++t) {
      std::vector<double> ot(D);
      causal_attn_decode_step<double>(ot.data(), &q[size_t(t) * D], k.data(), v.data(), t + 1, H, D, alibi);
      expect_rows_near(ot.data(), &o[size_t(t) * D], D, 1e-13, "row " + std::to_string(t));
    }
  }
}

TEST(decode_ops, htt_embedding_rows_equal_the_materialised_rows_bit_for_bit) {
  const HttShape s = htt_shape(301, 20, 4);
  Rng rng(4);
  const auto A = random_normal(size_t(s.v1) * s.r * s.d1, rng), B = random_normal(size_t(s.v2) * s.r * s.d2, rng),
             theta = random_uniform(s.r, rng, -0.7, 0.7);
  std::vector<double> E(size_t(s.Vp) * s.D), A_hat(A.size()), A_norm(size_t(s.v1) * s.r), B_hat(B.size()),
      B_norm(size_t(s.v2) * s.r);
  htt_materialize_forward<double>(E.data(), A_hat.data(), A_norm.data(), B_hat.data(), B_norm.data(), A.data(),
                                  B.data(), theta.data(), s);
  std::vector<int32_t> ids(s.V);
  for (int v = 0; v < s.V; ++v) ids[v] = s.V - 1 - v;
  std::vector<double> x(size_t(s.V) * s.D);
  htt_embedding_rows<double>(x.data(), ids.data(), s.V, A_hat.data(), B_hat.data(), theta.data(), s);
  for (int t = 0; t < s.V; ++t)
    for (int i = 0; i < s.D; ++i) ASSERT_EQ(x[size_t(t) * s.D + i], E[size_t(ids[t]) * s.D + i]) << "token " << ids[t];
}

}  // namespace muse::test
