#include "ops/causal_attn.h"

#include <cmath>
#include <limits>
#include <vector>

#include "ops/local_attn.h"

namespace muse {

template <typename T>
void causal_attn_forward(T* o, T* lse, const T* q, const T* k, const T* v, int B, int N, int H, int D, bool alibi) {
  const int dh = D / H;
  const T scale = T(1) / std::sqrt(T(dh));
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const T slope = alibi ? T(local_attn_alibi_slope(h, H)) : T(0);
      std::vector<T> s(N);
      for (int i = 0; i < N; ++i) {
        const T* qi = q + ((long)b * N + i) * D + h * dh;
        T max = -std::numeric_limits<T>::infinity();
        for (int j = 0; j <= i; ++j) {
          const T* kj = k + ((long)b * N + j) * D + h * dh;
          T dot = 0;
          for (int d = 0; d < dh; ++d) dot += qi[d] * kj[d];
          s[j] = dot * scale - slope * T(i - j);
          if (s[j] > max) max = s[j];
        }
        T sum = 0;
        for (int j = 0; j <= i; ++j) sum += std::exp(s[j] - max);
        T* oi = o + ((long)b * N + i) * D + h * dh;
        for (int d = 0; d < dh; ++d) oi[d] = 0;
        for (int j = 0; j <= i; ++j) {
          const T p = std::exp(s[j] - max) / sum;
          const T* vj = v + ((long)b * N + j) * D + h * dh;
          for (int d = 0; d < dh; ++d) oi[d] += p * vj[d];
        }
        lse[((long)b * H + h) * N + i] = max + std::log(sum);
      }
    }
}

template <typename T>
void causal_attn_backward(T* dq, T* dk, T* dv, const T* do_, const T* q, const T* k, const T* v, const T* o,
                          const T* lse, int B, int N, int H, int D, bool alibi) {
  const int dh = D / H;
  const T scale = T(1) / std::sqrt(T(dh));
  // Each (b, h) owns disjoint slices of dq, dk and dv, so the parallel loop needs no reduction.
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const T slope = alibi ? T(local_attn_alibi_slope(h, H)) : T(0);
      for (int i = 0; i < N; ++i) {
        const long row = (long)b * N + i;
        const T* qi = q + row * D + h * dh;
        const T* doi = do_ + row * D + h * dh;
        const T* oi = o + row * D + h * dh;
        const T l = lse[((long)b * H + h) * N + i];
        // ds_ij = p_ij·(do_i·v_j − do_i·o_i)
        T do_dot_o = 0;
        for (int d = 0; d < dh; ++d) do_dot_o += doi[d] * oi[d];
        for (int j = 0; j <= i; ++j) {
          const T* kj = k + ((long)b * N + j) * D + h * dh;
          const T* vj = v + ((long)b * N + j) * D + h * dh;
          T dot = 0, do_dot_v = 0;
          for (int d = 0; d < dh; ++d) {
            dot += qi[d] * kj[d];
            do_dot_v += doi[d] * vj[d];
          }
          const T p = std::exp(dot * scale - slope * T(i - j) - l);
          const T ds = p * (do_dot_v - do_dot_o) * scale;
          if (dv) {
            T* dvj = dv + ((long)b * N + j) * D + h * dh;
            for (int d = 0; d < dh; ++d) dvj[d] += p * doi[d];
          }
          if (dq) {
            T* dqi = dq + row * D + h * dh;
            for (int d = 0; d < dh; ++d) dqi[d] += ds * kj[d];
          }
          if (dk) {
            T* dkj = dk + ((long)b * N + j) * D + h * dh;
            for (int d = 0; d < dh; ++d) dkj[d] += ds * qi[d];
          }
        }
      }
    }
}

template <typename T>
void causal_attn_decode_step(T* o, const T* q, const T* keys, const T* values, int n, int H, int D, bool alibi) {
  const int dh = D / H;
  const T scale = T(1) / std::sqrt(T(dh));
  std::vector<T> s(n);
  for (int h = 0; h < H; ++h) {
    const T slope = alibi ? T(local_attn_alibi_slope(h, H)) : T(0);
    const T* qh = q + h * dh;
    T max = -std::numeric_limits<T>::infinity();
    for (int j = 0; j < n; ++j) {
      const T* kj = keys + (long)j * D + h * dh;
      T dot = 0;
      for (int d = 0; d < dh; ++d) dot += qh[d] * kj[d];
      s[j] = dot * scale - slope * T(n - 1 - j);
      if (s[j] > max) max = s[j];
    }
    T sum = 0;
    for (int j = 0; j < n; ++j) sum += std::exp(s[j] - max);
    T* oh = o + h * dh;
    for (int d = 0; d < dh; ++d) oh[d] = 0;
    for (int j = 0; j < n; ++j) {
      const T p = std::exp(s[j] - max) / sum;
      const T* vj = values + (long)j * D + h * dh;
      for (int d = 0; d < dh; ++d) oh[d] += p * vj[d];
    }
  }
}

template void causal_attn_forward<float>(float*, float*, const float*, const float*, const float*, int, int, int, int,
                                         bool);
template void causal_attn_forward<double>(double*, double*, const double*, const double*, const double*, int, int, int,
                                          int, bool);
template void causal_attn_backward<float>(float*, float*, float*, const float*, const float*, const float*,
                                          const float*, const float*, const float*, int, int, int, int, bool);
template void causal_attn_backward<double>(double*, double*, double*, const double*, const double*, const double*,
                                           const double*, const double*, const double*, int, int, int, int, bool);
template void causal_attn_decode_step<float>(float*, const float*, const float*, const float*, int, int, int, bool);
template void causal_attn_decode_step<double>(double*, const double*, const double*, const double*, int, int, int,
                                              bool);

}  // namespace muse
