#include "ops/linear_attn.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace muse {

namespace {

// φ(x) = ELU(x·s) + 1 with s = 1/√d_h: x·s + 1 above zero, e^{x·s} below (continuous, always > 0).
template <typename T>
inline T feature(T x, T scale) {
  const T u = x * scale;
  return u > T(0) ? u + T(1) : std::exp(u);
}

// dφ/dx = s·ELU'(x·s), with ELU'(u) = e^u for u < 0.
template <typename T>
inline T feature_grad(T x, T scale) {
  const T u = x * scale;
  return u > T(0) ? scale : scale * std::exp(u);
}

// Gated key features φ̃(k) = μ·φ(k) and query features φ(q) of one head.
template <typename T>
inline void head_features(T* gated_phi_k, T* phi_q, const T* k, const T* q, T gate, int dh, T scale) {
  for (int r = 0; r < dh; ++r) {
    gated_phi_k[r] = gate * feature(k[r], scale);
    phi_q[r] = feature(q[r], scale);
  }
}

// One token of one head: S += φ̃(k) vᵀ, z += φ̃(k), out = Sᵀφ(q) / max(zᵀφ(q), floor). Returns zᵀφ(q)
// before the clamp. Shared by the forward scan and the decode step so both do the same arithmetic.
template <typename T>
T scan_step(T* out, T* S, T* z, const T* q, const T* k, const T* v, T gate, int dh, T scale, T* gated_phi_k,
            T* phi_q) {
  head_features(gated_phi_k, phi_q, k, q, gate, dh, scale);
  for (int c = 0; c < dh; ++c) out[c] = T(0);
  T zeta = 0;
  for (int r = 0; r < dh; ++r) {
    T* Sr = S + (long)r * dh;
    const T fk = gated_phi_k[r], fq = phi_q[r];
    for (int c = 0; c < dh; ++c) {
      Sr[c] += fk * v[c];
      out[c] += fq * Sr[c];
    }
    z[r] += fk;
    zeta += z[r] * fq;
  }
  const T inv_denominator = T(1) / std::max(zeta, T(kLinearAttnDenominatorFloor));
  for (int c = 0; c < dh; ++c) out[c] *= inv_denominator;
  return zeta;
}

}  // namespace

template <typename T>
void linear_attn_forward(T* o, T* zeta, T* final_S, T* final_z, const T* q, const T* k, const T* v, const T* mu,
                         int B, int N, int D, int H) {
  const int dh = D / H;
  const T scale = T(1) / std::sqrt(T(dh));
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      std::vector<T> S((size_t)dh * dh, T(0)), z(dh, T(0)), gated_phi_k(dh), phi_q(dh);
      for (int i = 0; i < N; ++i) {
        const long row = (long)b * N + i;
        const long at = row * D + (long)h * dh;
        const T gate = mu ? mu[row * H + h] : T(1);
        zeta[row * H + h] =
            scan_step(o + at, S.data(), z.data(), q + at, k + at, v + at, gate, dh, scale, gated_phi_k.data(),
                      phi_q.data());
      }
      const long state = (long)b * H + h;
      if (final_S)
        for (size_t e = 0; e < S.size(); ++e) final_S[state * dh * dh + (long)e] = S[e];
      if (final_z)
        for (int r = 0; r < dh; ++r) final_z[state * dh + r] = z[r];
    }
}

template <typename T>
void linear_attn_backward(T* dq, T* dk, T* dv, T* dmu, const T* d_o, const T* zeta, const T* q, const T* k,
                          const T* v, const T* mu, int B, int N, int D, int H) {
  if (!mu) dmu = nullptr;
  if (!dq && !dk && !dv && !dmu) return;
  const int dh = D / H;
  const T scale = T(1) / std::sqrt(T(dh));
  const T denominator_floor = T(kLinearAttnDenominatorFloor);
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      std::vector<T> S((size_t)dh * dh, T(0)), z(dh, T(0)), gated_phi_k(dh), phi_q(dh), numerator(dh);
      // dζ_i: the gradient reaching the (unclamped) denominator, needed again by the reverse pass.
      std::vector<T> dzeta(N);

      // Forward in time, replaying S_i and z_i. With a_i = S_iᵀφ(q_i) and n_i = max(ζ_i, 1e-6):
      //   d(a_i) = do_i/n_i,   dn_i = −do_i·a_i/n_i²,   dζ_i = dn_i if ζ_i > 1e-6 else 0 (clamp side),
      //   dφ(q_i) = S_i·d(a_i) + dζ_i·z_i.
      for (int i = 0; i < N; ++i) {
        const long row = (long)b * N + i;
        const long at = row * D + (long)h * dh;
        const T gate = mu ? mu[row * H + h] : T(1);
        head_features(gated_phi_k.data(), phi_q.data(), k + at, q + at, gate, dh, scale);
        for (int c = 0; c < dh; ++c) numerator[c] = T(0);
        for (int r = 0; r < dh; ++r) {
          T* Sr = S.data() + (long)r * dh;
          for (int c = 0; c < dh; ++c) {
            Sr[c] += gated_phi_k[r] * v[at + c];
            numerator[c] += phi_q[r] * Sr[c];
          }
          z[r] += gated_phi_k[r];
        }
        const T z_dot_q = zeta[row * H + h];
        const T n = std::max(z_dot_q, denominator_floor);
        const T* do_i = d_o + at;
        T do_dot_numerator = 0;
        for (int c = 0; c < dh; ++c) do_dot_numerator += do_i[c] * numerator[c];
        dzeta[i] = z_dot_q > denominator_floor ? -do_dot_numerator / (n * n) : T(0);
        if (dq) {
          for (int r = 0; r < dh; ++r) {
            const T* Sr = S.data() + (long)r * dh;
            T s_dot_do = 0;
            for (int c = 0; c < dh; ++c) s_dot_do += Sr[c] * do_i[c];
            const T dphi_q = s_dot_do / n + dzeta[i] * z[r];
            dq[at + r] += dphi_q * feature_grad(q[at + r], scale);
          }
        }
      }
      if (!dk && !dv && !dmu) continue;

      // Reverse in time, carrying the adjoint states:
      //   dS_i = dS_{i+1} + φ(q_i)·(do_i/n_i)ᵀ,   dz_i = dz_{i+1} + dζ_i·φ(q_i),
      //   dφ̃(k_i) = dS_i·v_i + dz_i,   dv_i = dS_iᵀ·φ̃(k_i),   dφ(k_i) = μ_i·dφ̃(k_i),   dμ_i = φ(k_i)·dφ̃(k_i).
      std::vector<T> dS((size_t)dh * dh, T(0)), dz(dh, T(0)), dv_i(dh);
      for (int i = N - 1; i >= 0; --i) {
        const long row = (long)b * N + i;
        const long at = row * D + (long)h * dh;
        const T gate = mu ? mu[row * H + h] : T(1);
        head_features(gated_phi_k.data(), phi_q.data(), k + at, q + at, gate, dh, scale);
        const T inv_n = T(1) / std::max(zeta[row * H + h], denominator_floor);
        const T* do_i = d_o + at;
        for (int c = 0; c < dh; ++c) dv_i[c] = T(0);
        T dgate = 0;
        for (int r = 0; r < dh; ++r) {
          T* dSr = dS.data() + (long)r * dh;
          const T fq = phi_q[r] * inv_n, fk = gated_phi_k[r];
          T dgated_phi_k = 0;
          for (int c = 0; c < dh; ++c) {
            dSr[c] += fq * do_i[c];
            dgated_phi_k += dSr[c] * v[at + c];
            dv_i[c] += fk * dSr[c];
          }
          dz[r] += dzeta[i] * phi_q[r];
          dgated_phi_k += dz[r];
          if (dk) dk[at + r] += gate * dgated_phi_k * feature_grad(k[at + r], scale);
          dgate += feature(k[at + r], scale) * dgated_phi_k;
        }
        if (dv)
          for (int c = 0; c < dh; ++c) dv[at + c] += dv_i[c];
        if (dmu) dmu[row * H + h] += dgate;
      }
    }
}

template <typename T>
void linear_attn_decode_step(T* o, T* S, T* z, const T* q, const T* k, const T* v, const T* mu, int D, int H) {
  const int dh = D / H;
  const T scale = T(1) / std::sqrt(T(dh));
  std::vector<T> gated_phi_k(dh), phi_q(dh);
  for (int h = 0; h < H; ++h) {
    const long at = (long)h * dh;
    scan_step(o + at, S + at * dh, z + at, q + at, k + at, v + at, mu ? mu[h] : T(1), dh, scale,
              gated_phi_k.data(), phi_q.data());
  }
}

template void linear_attn_forward<float>(float*, float*, float*, float*, const float*, const float*, const float*,
                                         const float*, int, int, int, int);
template void linear_attn_forward<double>(double*, double*, double*, double*, const double*, const double*,
                                          const double*, const double*, int, int, int, int);
template void linear_attn_backward<float>(float*, float*, float*, float*, const float*, const float*, const float*,
                                          const float*, const float*, const float*, int, int, int, int);
template void linear_attn_backward<double>(double*, double*, double*, double*, const double*, const double*,
                                           const double*, const double*, const double*, const double*, int, int,
                                           int, int);
template void linear_attn_decode_step<float>(float*, float*, float*, const float*, const float*, const float*,
                                             const float*, int, int);
template void linear_attn_decode_step<double>(double*, double*, double*, const double*, const double*,
                                              const double*, const double*, int, int);

}  // namespace muse
