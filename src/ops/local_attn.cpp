#include "ops/local_attn.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/math.h"
#include "ops/poincare.h"

namespace muse {

namespace {

void validate(const LocalAttnConfig& cfg) {
  if (cfg.B < 0 || cfg.N < 0 || cfg.H < 1 || cfg.D < 1 || cfg.D % cfg.H != 0)
    throw std::invalid_argument("local_attn: D (" + std::to_string(cfg.D) + ") must be a positive multiple of H (" +
                                std::to_string(cfg.H) + ")");
  if (cfg.window < 1) throw std::invalid_argument("local_attn: window must be at least 1");
}

template <typename T> T dot_product(const T* x, const T* y, int n) {
  T s = 0;
  for (int e = 0; e < n; ++e) s += x[e] * y[e];
  return s;
}

// The pieces of the score of one (b, h) slice that do not depend on the pair: head offset, strides,
// temperature, alibi slope and the TangentNorm of every query and key of the slice.
template <typename T> struct HeadSlice {
  long base;  // offset of (b, position 0, head h) in a [B, N, D] array
  int D, H, dh;
  T sqrt_c, temperature, slope;
  const T* log_mu;  // log_mu + b·N·H + h (stride H), or null
  std::vector<TangentNorm<T>> q_norm, k_norm;

  HeadSlice(int b, int h, const T* q, const T* k, T c, const T* beta, const T* log_mu_all, const LocalAttnConfig& cfg)
      : base((long)b * cfg.N * cfg.D + (long)h * (cfg.D / cfg.H)),
        D(cfg.D),
        H(cfg.H),
        dh(cfg.D / cfg.H),
        sqrt_c(std::sqrt(c)),
        temperature(softplus(beta[h])),
        slope(cfg.alibi ? T(local_attn_alibi_slope(h, cfg.H)) : T(0)),
        log_mu(log_mu_all ? log_mu_all + (long)b * cfg.N * cfg.H + h : nullptr),
        q_norm(cfg.N),
        k_norm(cfg.N) {
    for (int t = 0; t < cfg.N; ++t) {
      q_norm[t] = tangent_norm(q + row(t), dh, sqrt_c);
      k_norm[t] = tangent_norm(k + row(t), dh, sqrt_c);
    }
  }

  long row(int t) const { return base + (long)t * D; }

  // s_ij from ρ = √c·d_c.
  T score(int i, int j, T rho) const {
    T s = -temperature * rho / sqrt_c - slope * T(i - j);
    if (log_mu) s += log_mu[(long)j * H];
    return s;
  }
};

}  // namespace

double local_attn_alibi_slope(int h, int H) { return std::exp2(-8.0 * (h + 1) / H); }

template <typename T>
void local_attn_forward(T* o, T* lse, const T* q, const T* k, const T* v, T c, const T* beta, const T* log_mu,
                        const LocalAttnConfig& cfg) {
  validate(cfg);
  const int H = cfg.H, N = cfg.N;
  #pragma omp parallel for schedule(dynamic)
  for (int bh = 0; bh < cfg.B * H; ++bh) {
    const int b = bh / H, h = bh % H;
    const HeadSlice<T> hs(b, h, q, k, c, beta, log_mu, cfg);
    const int dh = hs.dh;
    std::vector<T> scores(cfg.window);
    for (int i = 0; i < N; ++i) {
      const int j0 = local_attn_window_start(i, cfg);
      const T* qi = q + hs.row(i);
      T max_score = -std::numeric_limits<T>::infinity();
      for (int j = j0; j <= i; ++j) {
        const T rho = scaled_distance(hs.q_norm[i], hs.k_norm[j], dot_product(qi, k + hs.row(j), dh));
        scores[j - j0] = hs.score(i, j, rho);
        max_score = std::max(max_score, scores[j - j0]);
      }
      T* oi = o + hs.row(i);
      std::fill(oi, oi + dh, T(0));
      T sum = 0;
      for (int j = j0; j <= i; ++j) {
        const T p = std::exp(scores[j - j0] - max_score);
        sum += p;
        const T* vj = v + hs.row(j);
        for (int e = 0; e < dh; ++e) oi[e] += p * vj[e];
      }
      for (int e = 0; e < dh; ++e) oi[e] /= sum;
      lse[((long)b * N + i) * H + h] = max_score + std::log(sum);
    }
  }
}

template <typename T>
void local_attn_backward(T* dq, T* dk, T* dv, T* dc, T* dbeta, T* dlog_mu, const T* d_o, const T* o, const T* lse,
                         const T* q, const T* k, const T* v, T c, const T* beta, const T* log_mu,
                         const LocalAttnConfig& cfg) {
  validate(cfg);
  const int H = cfg.H, N = cfg.N;
  const T sqrt_c = std::sqrt(c);
  std::vector<T> dc_part(cfg.B * H, T(0)), dbeta_part(cfg.B * H, T(0));
  #pragma omp parallel for schedule(dynamic)
  for (int bh = 0; bh < cfg.B * H; ++bh) {
    const int b = bh / H, h = bh % H;
    const HeadSlice<T> hs(b, h, q, k, c, beta, log_mu, cfg);
    const int dh = hs.dh;
    const T dtemperature = sigmoid(beta[h]);  // softplus′
    T* dmu = (dlog_mu && log_mu) ? dlog_mu + (long)b * N * H + h : nullptr;
    for (int i = 0; i < N; ++i) {
      const int j0 = local_attn_window_start(i, cfg);
      const T* qi = q + hs.row(i);
      const T* gi = d_o + hs.row(i);
      const T lse_i = lse[((long)b * N + i) * H + h];
      // softmax backward: ∂L/∂s_ij = p_ij·(dO_i·v_j − dO_i·o_i)
      const T go = dot_product(gi, o + hs.row(i), dh);
      T dq_self = 0;  // coefficient of q_i in dq_i; the k_j terms go straight into dq_i
      for (int j = j0; j <= i; ++j) {
        const T* kj = k + hs.row(j);
        const T* vj = v + hs.row(j);
        ScaledDistanceGrad<T> grad;
        const T rho = scaled_distance(hs.q_norm[i], hs.k_norm[j], dot_product(qi, kj, dh), &grad);
        const T p = std::exp(hs.score(i, j, rho) - lse_i);
        if (dv) {
          T* dvj = dv + hs.row(j);
          for (int e = 0; e < dh; ++e) dvj[e] += p * gi[e];
        }
        const T ds = p * (dot_product(gi, vj, dh) - go);
        if (dmu) dmu[(long)j * H] += ds;
        // s = −softplus(β)·ρ/√c: ∂s/∂β = −σ(β)·ρ/√c, ∂s/∂ρ = −softplus(β)/√c and
        // ∂s/∂c = −softplus(β)·(∂ρ/∂√c − ρ/√c)/(2c) (ops/poincare.cpp).
        dbeta_part[bh] -= ds * dtemperature * rho / sqrt_c;
        dc_part[bh] -= ds * hs.temperature * (grad.sqrt_c - rho / sqrt_c) / (T(2) * c);
        const T g = -ds * hs.temperature / sqrt_c;
        if (dq) {
          dq_self += g * grad.norm_q / hs.q_norm[i].norm;
          T* dqi = dq + hs.row(i);
          const T cross = g * grad.dot;
          for (int e = 0; e < dh; ++e) dqi[e] += cross * kj[e];
        }
        if (dk) {
          T* dkj = dk + hs.row(j);
          const T self = g * grad.norm_k / hs.k_norm[j].norm, cross = g * grad.dot;
          for (int e = 0; e < dh; ++e) dkj[e] += self * kj[e] + cross * qi[e];
        }
      }
      if (dq) {
        T* dqi = dq + hs.row(i);
        for (int e = 0; e < dh; ++e) dqi[e] += dq_self * qi[e];
      }
    }
  }
  for (int bh = 0; bh < cfg.B * H; ++bh) {
    if (dc) *dc += dc_part[bh];
    if (dbeta) dbeta[bh % H] += dbeta_part[bh];
  }
}

// ---- recurrent decode ---------------------------------------------------------------------------------

template <typename T>
void local_attn_decode_reset(LocalAttnDecodeState<T>& state, const LocalAttnConfig& cfg, bool gated) {
  validate(cfg);
  state.count = 0;
  state.start = 0;
  state.keys.assign((size_t)cfg.window * cfg.D, T(0));
  state.values.assign((size_t)cfg.window * cfg.D, T(0));
  state.key_norms.assign((size_t)cfg.window * cfg.H, TangentNorm<T>{});
  state.log_mu.assign(gated ? (size_t)cfg.window * cfg.H : 0, T(0));
}

template <typename T>
void local_attn_decode_push(LocalAttnDecodeState<T>& state, const T* k, const T* v, const T* log_mu, T c,
                            int position, const LocalAttnConfig& cfg) {
  const int W = cfg.window, D = cfg.D, H = cfg.H, dh = D / H;
  if (!cfg.sliding && position % W == 0) state.count = state.start = 0;
  int slot;
  if (state.count == W) {
    slot = state.start;
    state.start = (state.start + 1) % W;
  } else {
    slot = (state.start + state.count) % W;
    ++state.count;
  }
  std::copy(k, k + D, state.keys.begin() + (long)slot * D);
  std::copy(v, v + D, state.values.begin() + (long)slot * D);
  const T sqrt_c = std::sqrt(c);
  for (int h = 0; h < H; ++h) state.key_norms[(long)slot * H + h] = tangent_norm(k + h * dh, dh, sqrt_c);
  if (!state.log_mu.empty()) std::copy(log_mu, log_mu + H, state.log_mu.begin() + (long)slot * H);
}

template <typename T>
void local_attn_decode_prefill(LocalAttnDecodeState<T>& state, const T* k, const T* v, const T* log_mu, T c, int N,
                               const LocalAttnConfig& cfg) {
  for (int t = std::max(0, N - cfg.window); t < N; ++t)
    local_attn_decode_push(state, k + (long)t * cfg.D, v + (long)t * cfg.D, log_mu ? log_mu + (long)t * cfg.H : nullptr,
                           c, t, cfg);
}

template <typename T>
void local_attn_decode_step(T* o, const LocalAttnDecodeState<T>& state, const T* q, T c, const T* beta,
                            const LocalAttnConfig& cfg) {
  const int D = cfg.D, H = cfg.H, dh = D / H, W = cfg.window, n = state.count;
  const T sqrt_c = std::sqrt(c);
  std::vector<T> scores(n);
  for (int h = 0; h < H; ++h) {
    const T* qh = q + h * dh;
    const TangentNorm<T> q_norm = tangent_norm(qh, dh, sqrt_c);
    const T temperature = softplus(beta[h]);
    const T slope = cfg.alibi ? T(local_attn_alibi_slope(h, H)) : T(0);
    // Key m (0 = oldest) sits n − 1 − m positions before the query; visiting the keys oldest first keeps
    // the forward's summation order.
    T max_score = -std::numeric_limits<T>::infinity();
    for (int m = 0; m < n; ++m) {
      const int slot = (state.start + m) % W;
      const T* kh = state.keys.data() + (long)slot * D + h * dh;
      const T rho = scaled_distance(q_norm, state.key_norms[(long)slot * H + h], dot_product(qh, kh, dh));
      T s = -temperature * rho / sqrt_c - slope * T(n - 1 - m);
      if (!state.log_mu.empty()) s += state.log_mu[(long)slot * H + h];
      scores[m] = s;
      max_score = std::max(max_score, s);
    }
    T* oh = o + h * dh;
    std::fill(oh, oh + dh, T(0));
    T sum = 0;
    for (int m = 0; m < n; ++m) {
      const T p = std::exp(scores[m] - max_score);
      sum += p;
      const T* vh = state.values.data() + (long)((state.start + m) % W) * D + h * dh;
      for (int e = 0; e < dh; ++e) oh[e] += p * vh[e];
    }
    for (int e = 0; e < dh; ++e) oh[e] /= sum;
  }
}

#define MUSE_LOCAL_ATTN_DECODE_INSTANTIATE(T)                                                                   \
  template void local_attn_decode_reset<T>(LocalAttnDecodeState<T>&, const LocalAttnConfig&, bool);             \
  template void local_attn_decode_push<T>(LocalAttnDecodeState<T>&, const T*, const T*, const T*, T, int,      \
                                          const LocalAttnConfig&);                                             \
  template void local_attn_decode_prefill<T>(LocalAttnDecodeState<T>&, const T*, const T*, const T*, T, int,   \
                                             const LocalAttnConfig&);                                          \
  template void local_attn_decode_step<T>(T*, const LocalAttnDecodeState<T>&, const T*, T, const T*,           \
                                          const LocalAttnConfig&);
MUSE_LOCAL_ATTN_DECODE_INSTANTIATE(float)
MUSE_LOCAL_ATTN_DECODE_INSTANTIATE(double)
#undef MUSE_LOCAL_ATTN_DECODE_INSTANTIATE

template void local_attn_forward<float>(float*, float*, const float*, const float*, const float*, float,
                                        const float*, const float*, const LocalAttnConfig&);
template void local_attn_forward<double>(double*, double*, const double*, const double*, const double*, double,
                                         const double*, const double*, const LocalAttnConfig&);
template void local_attn_backward<float>(float*, float*, float*, float*, float*, float*, const float*,
                                         const float*, const float*, const float*, const float*, const float*,
                                         float, const float*, const float*, const LocalAttnConfig&);
template void local_attn_backward<double>(double*, double*, double*, double*, double*, double*, const double*,
                                          const double*, const double*, const double*, const double*,
                                          const double*, double, const double*, const double*,
                                          const LocalAttnConfig&);

}  // namespace muse
