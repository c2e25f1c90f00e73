#include "ops/ssm.h"

#include <algorithm>
#include <cmath>

#include "common/math.h"
#include "ops/linear.h"

namespace muse {

namespace {

// λ = σ(ℓ) and 1 − λ = σ(−ℓ): the second form keeps its digits when λ is close to 1 (1 − λ = 1e-3 at init).
template <typename T>
void decay_factors(std::vector<T>& lambda, std::vector<T>& one_minus_lambda, const T* ell, int R) {
  lambda.resize(R);
  one_minus_lambda.resize(R);
  for (int r = 0; r < R; ++r) {
    lambda[r] = sigmoid(ell[r]);
    one_minus_lambda[r] = sigmoid(-ell[r]);
  }
}

template <typename T>
T mlp_r_hidden_pre(T delta, const SsmParams<T>& p, int k) {
  return p.r_w1[k] * delta + p.r_b1[k];
}

template <typename T>
T mlp_r(T delta, const SsmParams<T>& p) {
  T s = p.r_b2[0];
  for (int k = 0; k < kSsmRankHidden; ++k) s += p.r_w2[k] * gelu(mlp_r_hidden_pre(delta, p, k));
  return s;
}

template <typename T>
T green_factor(const T* F_row, const SsmParams<T>& p) {
  return sigmoid(p.w_pi[0] * F_row[0] + p.w_pi[1] * F_row[1] + p.w_pi[2] * F_row[2] + p.b_pi[0]);
}

// Slope of the mask's soft step; ∂m_r/∂ω = m_r(1 − m_r)·kMaskSlope·(R − r_min).
constexpr double kMaskSlope = 4.0;

template <typename T>
T mask_value(T omega, int r, int R) {
  return sigmoid(T(kMaskSlope) * (T(kSsmRankMin) + omega * T(R - kSsmRankMin) - T(r) - T(0.5)));
}

// y_t += (w₀⊙u_{t−2} + w₁⊙u_{t−1}) + w₂⊙u_t. The decode step adds the same expression with zero rows for
// missing history, which is exactly the skipped terms here.
template <typename T>
void add_causal_conv(T* y, const T* u, const T* taps, int B, int N, int D) {
  const T* w0 = taps;
  const T* w1 = taps + D;
  const T* w2 = taps + 2 * D;
#pragma omp parallel for schedule(static)
  for (long row = 0; row < (long)B * N; ++row) {
    const int t = int(row % N);
    const T* ut = u + row * D;
    T* yt = y + row * D;
    if (t >= 2) {
      for (int d = 0; d < D; ++d) yt[d] += (w0[d] * ut[d - 2 * D] + w1[d] * ut[d - D]) + w2[d] * ut[d];
    } else if (t == 1) {
      for (int d = 0; d < D; ++d) yt[d] += w1[d] * ut[d - D] + w2[d] * ut[d];
    } else {
      for (int d = 0; d < D; ++d) yt[d] += w2[d] * ut[d];
    }
  }
}

// Gate χ, mask m and the projections W_U u, W_V u of `rows` tokens: shared by the forward and the decode
// step so both compute the same numbers. mask may be null (mask off).
template <typename T>
void token_features(T* hidden, T* chi, T* mask, T* proj_u, T* proj_v, const T* u, const T* delta, const T* F,
                    const SsmParams<T>& p, const SsmConfig& cfg, int rows) {
  const int D = cfg.D, H = cfg.gate_hidden(), R = cfg.R;
  linear_forward(hidden, u, p.W1, p.b1, rows, D, H);
#pragma omp parallel for schedule(static)
  for (long i = 0; i < (long)rows * H; ++i) hidden[i] = hidden[i] > T(0) ? hidden[i] : T(0);
  linear_forward(chi, hidden, p.W2, p.b2, rows, H, R);
#pragma omp parallel for schedule(static)
  for (long i = 0; i < (long)rows * R; ++i) chi[i] = sigmoid(chi[i]);
  if (mask) ssm_rank_mask_forward(mask, delta, F, p, rows, R);
  linear_forward(proj_u, u, p.WU, static_cast<const T*>(nullptr), rows, D, R);
  linear_forward(proj_v, u, p.WV, static_cast<const T*>(nullptr), rows, D, R);
}

// χ⊙m, or χ when the mask is off.
template <typename T>
T channel_gate(const T* chi, const T* mask, long i) {
  return mask ? chi[i] * mask[i] : chi[i];
}

}  // namespace

// ---- pieces ------------------------------------------------------------------------------------------

template <typename T>
void ssm_conv_forward(T* y, const T* u, const T* taps, int B, int N, int D) {
  for (long i = 0; i < (long)B * N * D; ++i) y[i] = T(0);
  add_causal_conv(y, u, taps, B, N, D);
}

template <typename T>
void ssm_conv_backward(T* du, T* dtaps, const T* dy, const T* u, const T* taps, int B, int N, int D) {
  if (du) {
    const T* w0 = taps;
    const T* w1 = taps + D;
    const T* w2 = taps + 2 * D;
#pragma omp parallel for schedule(static)
    for (long row = 0; row < (long)B * N; ++row) {
      const int t = int(row % N);
      const T* dyt = dy + row * D;
      T* dut = du + row * D;
      for (int d = 0; d < D; ++d) {
        T s = w2[d] * dyt[d];
        if (t + 1 < N) s += w1[d] * dyt[d + D];
        if (t + 2 < N) s += w0[d] * dyt[d + 2 * D];
        dut[d] += s;
      }
    }
  }
  if (dtaps) {
    // Each block of channels is owned by one thread and sums its rows in order: deterministic.
    constexpr int kBlock = 64;
    const int blocks = (D + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < blocks; ++blk) {
      const int d0 = blk * kBlock, d1 = std::min(D, d0 + kBlock);
      T acc[3][kBlock] = {};
      for (long row = 0; row < (long)B * N; ++row) {
        const int t = int(row % N);
        const T* dyt = dy + row * D;
        const T* ut = u + row * D;
        for (int d = d0; d < d1; ++d) acc[2][d - d0] += dyt[d] * ut[d];
        if (t >= 1)
          for (int d = d0; d < d1; ++d) acc[1][d - d0] += dyt[d] * ut[d - D];
        if (t >= 2)
          for (int d = d0; d < d1; ++d) acc[0][d - d0] += dyt[d] * ut[d - 2 * D];
      }
      for (int k = 0; k < 3; ++k)
        for (int d = d0; d < d1; ++d) dtaps[k * D + d] += acc[k][d - d0];
    }
  }
}

template <typename T>
void ssm_scan_forward(T* S, const T* p, const T* ell, int B, int N, int R) {
  std::vector<T> lambda, one_minus_lambda;
  if (ell) decay_factors(lambda, one_minus_lambda, ell, R);
#pragma omp parallel for schedule(static)
  for (int b = 0; b < B; ++b) {
    const T* pb = p + (long)b * N * R;
    T* Sb = S + (long)b * N * R;
    for (int t = 0; t < N; ++t) {
      const T* pt = pb + (long)t * R;
      T* St = Sb + (long)t * R;
      if (t == 0) {
        for (int r = 0; r < R; ++r) St[r] = ell ? one_minus_lambda[r] * pt[r] : pt[r];
      } else if (ell) {
        for (int r = 0; r < R; ++r) St[r] = lambda[r] * St[r - R] + one_minus_lambda[r] * pt[r];
      } else {
        for (int r = 0; r < R; ++r) St[r] = St[r - R] + pt[r];
      }
    }
  }
}

template <typename T>
void ssm_scan_backward(T* dp, T* dell, const T* dS, const T* S, const T* p, const T* ell, int B, int N, int R) {
  std::vector<T> lambda, one_minus_lambda;
  if (ell) decay_factors(lambda, one_minus_lambda, ell, R);
  const bool want_dlambda = ell && dell;
  // Σ_t G_t⊙(S_{t−1} − p_t) per batch, combined below in batch order.
  std::vector<T> dlambda_part(want_dlambda ? (size_t)B * R : 0, T(0));
#pragma omp parallel for schedule(static)
  for (int b = 0; b < B; ++b) {
    const long base = (long)b * N * R;
    std::vector<T> G(R, T(0));
    for (int t = N - 1; t >= 0; --t) {
      const long o = base + (long)t * R;
      for (int r = 0; r < R; ++r) G[r] = dS[o + r] + (ell ? lambda[r] * G[r] : G[r]);
      if (dp) {
        if (ell) {
          for (int r = 0; r < R; ++r) dp[o + r] += one_minus_lambda[r] * G[r];
        } else {
          for (int r = 0; r < R; ++r) dp[o + r] += G[r];
        }
      }
      if (want_dlambda) {
        T* part = dlambda_part.data() + (long)b * R;
        for (int r = 0; r < R; ++r) part[r] += G[r] * ((t > 0 ? S[o - R + r] : T(0)) - p[o + r]);
      }
    }
  }
  if (want_dlambda) {
    for (int r = 0; r < R; ++r) {
      T sum = 0;
      for (int b = 0; b < B; ++b) sum += dlambda_part[(long)b * R + r];
      dell[r] += sum * lambda[r] * one_minus_lambda[r];
    }
  }
}

template <typename T>
void ssm_rank_mask_forward(T* m, const T* delta, const T* F, const SsmParams<T>& params, int rows, int R) {
#pragma omp parallel for schedule(static)
  for (int i = 0; i < rows; ++i) {
    const T omega = sigmoid(mlp_r(delta[i], params)) * green_factor(F + (long)i * 3, params);
    for (int r = 0; r < R; ++r) m[(long)i * R + r] = mask_value(omega, r, R);
  }
}

template <typename T>
void ssm_rank_mask_backward(T* ddelta, T* dF, const SsmGrads<T>& g, const T* dm, const T* m, const T* delta,
                            const T* F, const SsmParams<T>& params, int rows, int R) {
  constexpr int K = kSsmRankHidden;
  // Per row: ∂L/∂s (s = MLP_r output), ∂L/∂z (z = w_π·F + b_π), GELU(h_k) and r_w2[k]·GELU'(h_k), so the
  // parameter sums below can run serially (a fixed order) without recomputing the GELUs.
  std::vector<T> ds(rows), dz(rows), act((long)rows * K), act_slope((long)rows * K);
#pragma omp parallel for schedule(static)
  for (int i = 0; i < rows; ++i) {
    T* act_i = act.data() + (long)i * K;
    T* slope_i = act_slope.data() + (long)i * K;
    T s = params.r_b2[0];
    for (int k = 0; k < K; ++k) {
      const T h = mlp_r_hidden_pre(delta[i], params, k);
      act_i[k] = gelu(h);
      slope_i[k] = params.r_w2[k] * gelu_grad(h);
      s += params.r_w2[k] * act_i[k];
    }
    const T a = sigmoid(s);
    const T* F_i = F + (long)i * 3;
    const T pi = green_factor(F_i, params);
    T domega = 0;
    for (int r = 0; r < R; ++r) {
      const T mr = m[(long)i * R + r];
      domega += dm[(long)i * R + r] * mr * (T(1) - mr);
    }
    domega *= T(kMaskSlope) * T(R - kSsmRankMin);
    ds[i] = domega * pi * a * (T(1) - a);
    dz[i] = domega * a * pi * (T(1) - pi);
    if (ddelta) {
      T dd = 0;
      for (int k = 0; k < K; ++k) dd += slope_i[k] * params.r_w1[k];
      ddelta[i] += ds[i] * dd;
    }
    if (dF)
      for (int c = 0; c < 3; ++c) dF[(long)i * 3 + c] += dz[i] * params.w_pi[c];
  }
  for (int i = 0; i < rows; ++i) {
    const T* act_i = act.data() + (long)i * K;
    const T* slope_i = act_slope.data() + (long)i * K;
    for (int k = 0; k < K; ++k) {
      const T dh = ds[i] * slope_i[k];
      if (g.r_w2) g.r_w2[k] += ds[i] * act_i[k];
      if (g.r_w1) g.r_w1[k] += dh * delta[i];
      if (g.r_b1) g.r_b1[k] += dh;
    }
    if (g.r_b2) g.r_b2[0] += ds[i];
    if (g.w_pi)
      for (int c = 0; c < 3; ++c) g.w_pi[c] += dz[i] * F[(long)i * 3 + c];
    if (g.b_pi) g.b_pi[0] += dz[i];
  }
}

// ---- the whole op ------------------------------------------------------------------------------------

template <typename T>
void ssm_forward(T* y, SsmSaved<T>& saved, const T* u, const T* delta, const T* F, const SsmParams<T>& p,
                 const SsmConfig& cfg) {
  const int rows = cfg.B * cfg.N, R = cfg.R;
  const long rR = (long)rows * R;
  saved.hidden.resize((long)rows * cfg.gate_hidden());
  saved.chi.resize(rR);
  saved.mask.resize(cfg.mask_on() ? rR : 0);
  saved.proj_u.resize(rR);
  saved.proj_v.resize(rR);
  saved.state.resize(rR);
  T* mask = cfg.mask_on() ? saved.mask.data() : nullptr;
  token_features(saved.hidden.data(), saved.chi.data(), mask, saved.proj_u.data(), saved.proj_v.data(), u, delta,
                 F, p, cfg, rows);

  std::vector<T> scan_in(rR), readout(rR);
#pragma omp parallel for schedule(static)
  for (long i = 0; i < rR; ++i) scan_in[i] = saved.proj_u[i] * channel_gate(saved.chi.data(), mask, i);
  ssm_scan_forward(saved.state.data(), scan_in.data(), cfg.decay ? p.ell : nullptr, cfg.B, cfg.N, R);
#pragma omp parallel for schedule(static)
  for (long i = 0; i < rR; ++i)
    readout[i] = saved.state[i] * (saved.proj_v[i] * channel_gate(saved.chi.data(), mask, i));
  linear_forward(y, readout.data(), p.WO, p.bO, rows, R, cfg.D);
  add_causal_conv(y, u, p.conv, cfg.B, cfg.N, cfg.D);
}

template <typename T>
void ssm_backward(T* du, T* ddelta, T* dF, const SsmGrads<T>& g, const T* dy, const T* u, const T* delta,
                  const T* F, const SsmParams<T>& p, const SsmSaved<T>& saved, const SsmConfig& cfg) {
  const int rows = cfg.B * cfg.N, D = cfg.D, H = cfg.gate_hidden(), R = cfg.R;
  const long rR = (long)rows * R;
  const T* chi = saved.chi.data();
  const T* mask = cfg.mask_on() ? saved.mask.data() : nullptr;
  const T* S = saved.state.data();

  // Recompute p, q and the readout S⊙q.
  std::vector<T> scan_in(rR), q(rR), readout(rR);
#pragma omp parallel for schedule(static)
  for (long i = 0; i < rR; ++i) {
    const T gate = channel_gate(chi, mask, i);
    scan_in[i] = saved.proj_u[i] * gate;
    q[i] = saved.proj_v[i] * gate;
    readout[i] = S[i] * q[i];
  }

  ssm_conv_backward(du, g.conv, dy, u, p.conv, cfg.B, cfg.N, D);
  std::vector<T> dreadout(rR, T(0));
  linear_backward(dreadout.data(), g.WO, g.bO, dy, readout.data(), p.WO, rows, R, D);

  // readout = S⊙q: dS = dreadout⊙q (into the readout buffer, no longer needed), dq = dreadout⊙S.
  std::vector<T>& dS = readout;
#pragma omp parallel for schedule(static)
  for (long i = 0; i < rR; ++i) dS[i] = dreadout[i] * q[i];
  std::vector<T> dscan_in(rR, T(0));
  ssm_scan_backward(dscan_in.data(), cfg.decay ? g.ell : nullptr, dS.data(), S, scan_in.data(),
                    cfg.decay ? p.ell : nullptr, cfg.B, cfg.N, R);

  // p = (W_U u)⊙χ⊙m, q = (W_V u)⊙χ⊙m. Reuse buffers: dproj_u → scan_in, dproj_v → q, dgate_pre → dS,
  // dm → dreadout (each element of dq = dreadout⊙S is read before it is overwritten).
  std::vector<T>& dproj_u = scan_in;
  std::vector<T>& dproj_v = q;
  std::vector<T>& dgate_pre = dS;  // ∂L/∂(W₂·hidden + b₂)
  std::vector<T>& dm = dreadout;
#pragma omp parallel for schedule(static)
  for (long i = 0; i < rR; ++i) {
    const T gate = channel_gate(chi, mask, i);
    const T dq = dreadout[i] * S[i];
    const T dgate = dscan_in[i] * saved.proj_u[i] + dq * saved.proj_v[i];
    dproj_u[i] = dscan_in[i] * gate;
    dproj_v[i] = dq * gate;
    dgate_pre[i] = (mask ? dgate * mask[i] : dgate) * chi[i] * (T(1) - chi[i]);
    dm[i] = dgate * chi[i];
  }
  linear_backward(du, g.WU, static_cast<T*>(nullptr), dproj_u.data(), u, p.WU, rows, D, R);
  linear_backward(du, g.WV, static_cast<T*>(nullptr), dproj_v.data(), u, p.WV, rows, D, R);

  std::vector<T> dhidden((long)rows * H, T(0));
  linear_backward(dhidden.data(), g.W2, g.b2, dgate_pre.data(), saved.hidden.data(), p.W2, rows, H, R);
  // ReLU: hidden > 0 exactly where its pre-activation is.
#pragma omp parallel for schedule(static)
  for (long i = 0; i < (long)rows * H; ++i)
    if (!(saved.hidden[i] > T(0))) dhidden[i] = T(0);
  linear_backward(du, g.W1, g.b1, dhidden.data(), u, p.W1, rows, D, H);

  if (mask) ssm_rank_mask_backward(ddelta, dF, g, dm.data(), mask, delta, F, p, rows, R);
}

// ---- init and diagnostics ----------------------------------------------------------------------------

template <typename T>
void ssm_init_decay_logits(T* ell, int R) {
  const double lo = std::log(1e-3), hi = std::log(1e-1);
  for (int r = 0; r < R; ++r) {
    const double one_minus_lambda = std::exp(R > 1 ? lo + (hi - lo) * r / (R - 1) : lo);
    ell[r] = T(std::log1p(-one_minus_lambda) - std::log(one_minus_lambda));  // logit(λ)
  }
}

template <typename T>
double ssm_effective_rank(const SsmSaved<T>& saved, const SsmConfig& cfg) {
  if (!cfg.mask_on()) return cfg.R;
  const long rows = (long)cfg.B * cfg.N;
  double sum = 0;
  for (long i = 0; i < rows * cfg.R; ++i) sum += saved.mask[i];
  return sum / double(rows);
}

// ---- recurrent decode --------------------------------------------------------------------------------

template <typename T>
void ssm_decode_reset(SsmDecodeState<T>& state, int B, int D, int R) {
  state.S.assign((long)B * R, T(0));
  state.conv_tail.assign((long)B * 2 * D, T(0));
}

template <typename T>
void ssm_decode_prefill(SsmDecodeState<T>& state, const T* u, const SsmSaved<T>& saved, const SsmConfig& cfg) {
  const int B = cfg.B, N = cfg.N, D = cfg.D, R = cfg.R;
  ssm_decode_reset(state, B, D, R);
  for (int b = 0; b < B; ++b) {
    const long last = (long)b * N + N - 1;
    for (int r = 0; r < R; ++r) state.S[(long)b * R + r] = saved.state[last * R + r];
    T* tail = state.conv_tail.data() + (long)b * 2 * D;
    for (int d = 0; d < D; ++d) {
      if (N >= 2) tail[d] = u[(last - 1) * D + d];
      tail[D + d] = u[last * D + d];
    }
  }
}

template <typename T>
void ssm_decode_step(T* y, SsmDecodeState<T>& state, const T* u, const T* delta, const T* F,
                     const SsmParams<T>& p, const SsmConfig& cfg) {
  const int B = cfg.B, D = cfg.D, R = cfg.R;
  std::vector<T> hidden((long)B * cfg.gate_hidden()), chi((long)B * R), mask(cfg.mask_on() ? (long)B * R : 0),
      proj_u((long)B * R), proj_v((long)B * R), readout((long)B * R);
  T* mask_ptr = cfg.mask_on() ? mask.data() : nullptr;
  token_features(hidden.data(), chi.data(), mask_ptr, proj_u.data(), proj_v.data(), u, delta, F, p, cfg, B);
  std::vector<T> lambda, one_minus_lambda;
  if (cfg.decay) decay_factors(lambda, one_minus_lambda, p.ell, R);
  for (long i = 0; i < (long)B * R; ++i) {
    const int r = int(i % R);
    const T gate = channel_gate(chi.data(), mask_ptr, i);
    const T scan_in = proj_u[i] * gate;
    T& S = state.S[i];
    S = cfg.decay ? lambda[r] * S + one_minus_lambda[r] * scan_in : S + scan_in;
    readout[i] = S * (proj_v[i] * gate);
  }
  linear_forward(y, readout.data(), p.WO, p.bO, B, R, D);
  const T* w0 = p.conv;
  const T* w1 = p.conv + D;
  const T* w2 = p.conv + 2 * D;
  for (int b = 0; b < B; ++b) {
    T* tail = state.conv_tail.data() + (long)b * 2 * D;
    const T* ub = u + (long)b * D;
    T* yb = y + (long)b * D;
    for (int d = 0; d < D; ++d) {
      yb[d] += (w0[d] * tail[d] + w1[d] * tail[D + d]) + w2[d] * ub[d];
      tail[d] = tail[D + d];
      tail[D + d] = ub[d];
    }
  }
}

#define MUSE_SSM_INSTANTIATE(T)                                                                               \
  template void ssm_forward<T>(T*, SsmSaved<T>&, const T*, const T*, const T*, const SsmParams<T>&,            \
                               const SsmConfig&);                                                             \
  template void ssm_backward<T>(T*, T*, T*, const SsmGrads<T>&, const T*, const T*, const T*, const T*,        \
                                const SsmParams<T>&, const SsmSaved<T>&, const SsmConfig&);                   \
  template void ssm_conv_forward<T>(T*, const T*, const T*, int, int, int);                                  \
  template void ssm_conv_backward<T>(T*, T*, const T*, const T*, const T*, int, int, int);                   \
  template void ssm_scan_forward<T>(T*, const T*, const T*, int, int, int);                                  \
  template void ssm_scan_backward<T>(T*, T*, const T*, const T*, const T*, const T*, int, int, int);         \
  template void ssm_rank_mask_forward<T>(T*, const T*, const T*, const SsmParams<T>&, int, int);             \
  template void ssm_rank_mask_backward<T>(T*, T*, const SsmGrads<T>&, const T*, const T*, const T*,          \
                                          const T*, const SsmParams<T>&, int, int);                          \
  template void ssm_init_decay_logits<T>(T*, int);                                                           \
  template double ssm_effective_rank<T>(const SsmSaved<T>&, const SsmConfig&);                               \
  template void ssm_decode_reset<T>(SsmDecodeState<T>&, int, int, int);                                      \
  template void ssm_decode_prefill<T>(SsmDecodeState<T>&, const T*, const SsmSaved<T>&, const SsmConfig&);   \
  template void ssm_decode_step<T>(T*, SsmDecodeState<T>&, const T*, const T*, const T*, const SsmParams<T>&, \
                                   const SsmConfig&);

MUSE_SSM_INSTANTIATE(float)
MUSE_SSM_INSTANTIATE(double)
#undef MUSE_SSM_INSTANTIATE

}  // namespace muse
