#include "ops/htt.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/blas.h"

namespace muse {

namespace {

int ceil_div(int a, int b) { return (a + b - 1) / b; }

int ceil_sqrt(int n) {
  int k = int(std::sqrt(double(n)));
  while (long(k) * k < n) ++k;
  while (k > 1 && long(k - 1) * (k - 1) >= n) --k;
  return k;
}

// Below this many multiply-adds a parallel region costs more than it saves (and on a busy machine a
// descheduled thread stalls the whole region), so small calls run serially.
constexpr long kParallelWork = 1L << 16;

// Leading digits i that carry at least one real token.
int used_leading_digits(const HttShape& s) { return ceil_div(s.V, s.v2); }

// Entries of width digit p that survive the crop to D.
int cropped_length(const HttShape& s, int p) { return std::clamp(s.D - p * s.d2, 0, s.d2); }

// c_s = cos(θ_s)/√r.
template <typename T>
std::vector<T> phase_gains(const T* theta, int r) {
  std::vector<T> c(r);
  for (int s = 0; s < r; ++s) c[s] = std::cos(theta[s]) / std::sqrt(T(r));
  return c;
}

// The cores are small (v1·r rows of d1), so the normalisation and its backward run serially.
template <typename T>
void normalize_rows(T* hat, T* norm, const T* x, int rows, int width) {
  for (int row = 0; row < rows; ++row) {
    const T* xr = x + long(row) * width;
    T sq = 0;
    for (int k = 0; k < width; ++k) sq += xr[k] * xr[k];
    const T n = std::max(std::sqrt(sq), T(kHttNormFloor));
    norm[row] = n;
    for (int k = 0; k < width; ++k) hat[long(row) * width + k] = xr[k] / n;
  }
}

// Backward of x̂ = x / max(‖x‖, floor): the projection (g − x̂⟨x̂, g⟩)/‖x‖ above the floor, g/floor below it.
template <typename T>
void normalize_rows_backward(T* dx, const T* dhat, const T* hat, const T* norm, int rows, int width) {
  for (int row = 0; row < rows; ++row) {
    const T* g = dhat + long(row) * width;
    const T* h = hat + long(row) * width;
    T* d = dx + long(row) * width;
    const T n = norm[row];
    T dot = 0;
    if (n > T(kHttNormFloor))
      for (int k = 0; k < width; ++k) dot += h[k] * g[k];
    for (int k = 0; k < width; ++k) d[k] += (g[k] - h[k] * dot) / n;
  }
}

// E[v] into row [D], through tile [d1·d2], the outer-product sum before the crop to D.
template <typename T>
void embedding_row(T* row, T* tile, int v, const T* A_hat, const T* B_hat, const T* c, const HttShape& s) {
  const int i = v / s.v2, u = v % s.v2;
  std::fill(tile, tile + long(s.d1) * s.d2, T(0));
  for (int rank = 0; rank < s.r; ++rank) {
    const T* a = A_hat + (long(i) * s.r + rank) * s.d1;
    const T* b = B_hat + (long(u) * s.r + rank) * s.d2;
    for (int p = 0; p < s.d1; ++p) {
      const T ca = c[rank] * a[p];
      T* t = tile + p * s.d2;
      for (int q = 0; q < s.d2; ++q) t[q] += ca * b[q];
    }
  }
  std::copy(tile, tile + s.D, row);
}

}  // namespace

HttShape htt_shape(int V, int D, int r) {
  HttShape s{};
  s.V = V;
  s.Vp = padded_vocab(V);
  s.D = D;
  s.r = r;
  s.v1 = ceil_sqrt(V);
  s.v2 = ceil_div(V, s.v1);
  s.d1 = ceil_sqrt(D);
  s.d2 = ceil_div(D, s.d1);
  return s;
}

long htt_parameter_count(const HttShape& s) {
  return long(s.v1) * s.r * s.d1 + long(s.v2) * s.r * s.d2 + s.r;
}

template <typename T>
void htt_normalize_cores(T* A_hat, T* A_norm, T* B_hat, T* B_norm, const T* A, const T* B, const HttShape& s) {
  normalize_rows(A_hat, A_norm, A, s.v1 * s.r, s.d1);
  normalize_rows(B_hat, B_norm, B, s.v2 * s.r, s.d2);
}

template <typename T>
void htt_materialize_forward(T* E, T* A_hat, T* A_norm, T* B_hat, T* B_norm, const T* A, const T* B,
                             const T* theta, const HttShape& s) {
  htt_normalize_cores(A_hat, A_norm, B_hat, B_norm, A, B, s);
  const std::vector<T> c = phase_gains(theta, s.r);
  const bool parallel = long(s.V) * s.D * s.r >= kParallelWork;
#pragma omp parallel if (parallel)
  {
    std::vector<T> tile(size_t(s.d1) * s.d2);
#pragma omp for schedule(static)
    for (int v = 0; v < s.V; ++v) embedding_row(E + long(v) * s.D, tile.data(), v, A_hat, B_hat, c.data(), s);
  }
  std::fill(E + long(s.V) * s.D, E + long(s.Vp) * s.D, T(0));
}

// Each thread owns whole output rows (a digit i for dÂ, a digit u for dB̂) and sums over the other digit in
// index order, so the gradients do not depend on the thread count (BLAS GEMMs do: OpenBLAS results change
// with its thread count).
template <typename T>
void htt_materialize_backward(T* dA, T* dB, T* dtheta, const T* dE, const T* A_hat, const T* A_norm,
                              const T* B_hat, const T* B_norm, const T* theta, const HttShape& s) {
  const std::vector<T> c = phase_gains(theta, s.r);
  const int digits = used_leading_digits(s);
  const bool parallel = long(s.V) * s.D * s.r >= kParallelWork;
  if (dA || dtheta) {
    // W[i,s,p] = Σ_{u,q} dE[i·v2+u, p·d2+q]·B̂[u,s,q];  dÂ = c_s·W,  dc_s = Σ_{i,p} Â·W.
    std::vector<T> W(long(s.v1) * s.r * s.d1, T(0)), dc_by_digit(long(digits) * s.r);
#pragma omp parallel for schedule(static) if (parallel)
    for (int i = 0; i < digits; ++i) {
      T* w = W.data() + long(i) * s.r * s.d1;
      for (int u = 0; u < s.v2 && long(i) * s.v2 + u < s.V; ++u) {
        const T* g = dE + (long(i) * s.v2 + u) * s.D;
        for (int rank = 0; rank < s.r; ++rank) {
          const T* b = B_hat + (long(u) * s.r + rank) * s.d2;
          for (int p = 0; p < s.d1; ++p) {
            const T* gp = g + p * s.d2;
            const int len = cropped_length(s, p);
            T dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int q = 0; q < len; ++q) dot += gp[q] * b[q];
            w[rank * s.d1 + p] += dot;
          }
        }
      }
      for (int rank = 0; rank < s.r; ++rank) {
        const T* a = A_hat + (long(i) * s.r + rank) * s.d1;
        T dc = 0;
        for (int p = 0; p < s.d1; ++p) dc += a[p] * w[rank * s.d1 + p];
        dc_by_digit[long(i) * s.r + rank] = dc;
      }
    }
    if (dA) {
      for (int i = 0; i < digits; ++i)
        for (int rank = 0; rank < s.r; ++rank)
          for (int p = 0; p < s.d1; ++p) W[(long(i) * s.r + rank) * s.d1 + p] *= c[rank];
      normalize_rows_backward(dA, W.data(), A_hat, A_norm, s.v1 * s.r, s.d1);
    }
    if (dtheta) {
      for (int rank = 0; rank < s.r; ++rank) {
        T dc = 0;
        for (int i = 0; i < digits; ++i) dc += dc_by_digit[long(i) * s.r + rank];
        dtheta[rank] += -dc * std::sin(theta[rank]) / std::sqrt(T(s.r));
      }
    }
  }
  if (dB) {
    // dB̂[u,s,q] = Σ_{i,p} c_s·Â[i,s,p]·dE[i·v2+u, p·d2+q].
    std::vector<T> dB_hat(long(s.v2) * s.r * s.d2, T(0));
#pragma omp parallel for schedule(static) if (parallel)
    for (int u = 0; u < s.v2; ++u) {
      T* acc = dB_hat.data() + long(u) * s.r * s.d2;
      for (int i = 0; i < digits && long(i) * s.v2 + u < s.V; ++i) {
        const T* g = dE + (long(i) * s.v2 + u) * s.D;
        for (int rank = 0; rank < s.r; ++rank) {
          const T* a = A_hat + (long(i) * s.r + rank) * s.d1;
          T* out = acc + rank * s.d2;
          for (int p = 0; p < s.d1; ++p) {
            const T ca = c[rank] * a[p];
            const T* gp = g + p * s.d2;
            const int len = cropped_length(s, p);
            for (int q = 0; q < len; ++q) out[q] += ca * gp[q];
          }
        }
      }
    }
    normalize_rows_backward(dB, dB_hat.data(), B_hat, B_norm, s.v2 * s.r, s.d2);
  }
}

template <typename T>
void htt_embedding_rows(T* x, const int32_t* ids, int n, const T* A_hat, const T* B_hat, const T* theta,
                        const HttShape& s) {
  const std::vector<T> c = phase_gains(theta, s.r);
#pragma omp parallel if (long(n) * s.D * s.r >= kParallelWork)
  {
    std::vector<T> tile(size_t(s.d1) * s.d2);
#pragma omp for schedule(static)
    for (int t = 0; t < n; ++t) embedding_row(x + long(t) * s.D, tile.data(), ids[t], A_hat, B_hat, c.data(), s);
  }
}

template <typename T>
void embedding_lookup_forward(T* x, const T* E, const int32_t* ids, int n, int D) {
#pragma omp parallel for schedule(static) if (long(n) * D >= kParallelWork)
  for (int t = 0; t < n; ++t) std::copy(E + long(ids[t]) * D, E + long(ids[t]) * D + D, x + long(t) * D);
}

template <typename T>
void embedding_lookup_backward(T* dE, const T* dx, const int32_t* ids, int n, int D) {
  // Threads own disjoint column blocks and walk the tokens in order, so repeated ids are summed in token
  // order: no atomics, and the result does not depend on the thread count.
  constexpr int kColumns = 64;
  const int blocks = ceil_div(D, kColumns);
#pragma omp parallel for schedule(static) if (long(n) * D >= kParallelWork)
  for (int b = 0; b < blocks; ++b) {
    const int j0 = b * kColumns, j1 = std::min(D, j0 + kColumns);
    for (int t = 0; t < n; ++t) {
      T* dst = dE + long(ids[t]) * D;
      const T* src = dx + long(t) * D;
      for (int j = j0; j < j1; ++j) dst[j] += src[j];
    }
  }
}

template <typename T>
void htt_factored_head_forward(T* logits, const T* x, const T* A_hat, const T* B_hat, const T* theta, int rows,
                               const HttShape& s) {
  const int digits = used_leading_digits(s);
  const std::vector<T> c = phase_gains(theta, s.r);
  std::vector<T> X(long(s.d1) * s.d2), XB(long(s.d1) * s.v2 * s.r), Z(long(s.r) * s.d1 * s.v2),
      full(long(digits) * s.v2);
  for (int row = 0; row < rows; ++row) {
    std::fill(X.begin(), X.end(), T(0));
    std::copy(x + long(row) * s.D, x + long(row + 1) * s.D, X.begin());
    // XB[p, (u,s)] = Σ_q X[p,q]·B̂[u,s,q]: B̂ read as a [(v2·r), d2] matrix.
    gemm<T>(false, true, s.d1, s.v2 * s.r, s.d2, T(1), X.data(), s.d2, B_hat, s.d2, T(0), XB.data(), s.v2 * s.r);
    for (int rank = 0; rank < s.r; ++rank)
      for (int p = 0; p < s.d1; ++p)
        for (int u = 0; u < s.v2; ++u)
          Z[(long(rank) * s.d1 + p) * s.v2 + u] = c[rank] * XB[(long(p) * s.v2 + u) * s.r + rank];
    gemm<T>(false, false, digits, s.v2, s.r * s.d1, T(1), A_hat, s.r * s.d1, Z.data(), s.v2, T(0), full.data(),
            s.v2);
    T* out = logits + long(row) * s.Vp;
    std::copy(full.begin(), full.begin() + s.V, out);
    std::fill(out + s.V, out + s.Vp, T(0));
  }
}

template void htt_normalize_cores<float>(float*, float*, float*, float*, const float*, const float*,
                                         const HttShape&);
template void htt_normalize_cores<double>(double*, double*, double*, double*, const double*, const double*,
                                          const HttShape&);
template void htt_materialize_forward<float>(float*, float*, float*, float*, float*, const float*, const float*,
                                             const float*, const HttShape&);
template void htt_materialize_forward<double>(double*, double*, double*, double*, double*, const double*,
                                              const double*, const double*, const HttShape&);
template void htt_materialize_backward<float>(float*, float*, float*, const float*, const float*, const float*,
                                              const float*, const float*, const float*, const HttShape&);
template void htt_materialize_backward<double>(double*, double*, double*, const double*, const double*,
                                               const double*, const double*, const double*, const double*,
                                               const HttShape&);
template void htt_embedding_rows<float>(float*, const int32_t*, int, const float*, const float*, const float*,
                                        const HttShape&);
template void htt_embedding_rows<double>(double*, const int32_t*, int, const double*, const double*, const double*,
                                         const HttShape&);
template void embedding_lookup_forward<float>(float*, const float*, const int32_t*, int, int);
template void embedding_lookup_forward<double>(double*, const double*, const int32_t*, int, int);
template void embedding_lookup_backward<float>(float*, const float*, const int32_t*, int, int);
template void embedding_lookup_backward<double>(double*, const double*, const int32_t*, int, int);
template void htt_factored_head_forward<float>(float*, const float*, const float*, const float*, const float*, int,
                                               const HttShape&);
template void htt_factored_head_forward<double>(double*, const double*, const double*, const double*,
                                                const double*, int, const HttShape&);

}  // namespace muse
