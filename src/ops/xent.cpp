#include "ops/xent.h"

#include <algorithm>
#include <cmath>

namespace muse {

namespace {

// Below this many logits a parallel region costs more than it saves, so small calls run serially.
constexpr long kParallelWork = 1L << 16;

// Σ_v exp(z_v − shift) in double. Four interleaved partial sums break the add-latency chain (the loop is
// bound by it otherwise, since the exp calls keep it from vectorising); their order is fixed, so the result
// is deterministic.
template <typename T>
double sum_exp_shifted(const T* z, int n, T shift) {
  double partial[4] = {0, 0, 0, 0};
  int v = 0;
  for (; v + 4 <= n; v += 4)
    for (int k = 0; k < 4; ++k) partial[k] += double(std::exp(z[v + k] - shift));
  for (; v < n; ++v) partial[0] += double(std::exp(z[v] - shift));
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

}  // namespace

template <typename T>
XentResult xent_forward(T* row_loss, T* row_lse, const T* logits, const int32_t* targets, int rows, int V, int Vp,
                        T smoothing, int32_t ignore_index) {
#pragma omp parallel for schedule(static) if (long(rows) * V >= kParallelWork)
  for (int r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) {
      row_loss[r] = T(0);
      row_lse[r] = T(0);
      continue;
    }
    const T* z = logits + long(r) * Vp;
    // simd reductions have a fixed (compile-time) order, so results stay deterministic. Sums over up to ~50k
    // columns run in double so the float path loses nothing to accumulation.
    T zmax = z[0];
#pragma omp simd reduction(max : zmax)
    for (int v = 1; v < V; ++v) zmax = std::max(zmax, z[v]);
    const double lse = double(zmax) + std::log(sum_exp_shifted(z, V, zmax));
    double loss = lse - double(z[targets[r]]);
    if (smoothing != T(0)) {
      double sum_z = 0;
#pragma omp simd reduction(+ : sum_z)
      for (int v = 0; v < V; ++v) sum_z += double(z[v]);
      loss = (1.0 - double(smoothing)) * loss + double(smoothing) * (lse - sum_z / V);
    }
    row_loss[r] = T(loss);
    row_lse[r] = T(lse);
  }
  XentResult result{0.0, 0};
  double total = 0;
  for (int r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) continue;
    total += double(row_loss[r]);
    ++result.count;
  }
  if (result.count > 0) result.mean_loss = total / result.count;
  return result;
}

template <typename T>
void xent_backward(T* dlogits, T dloss, const T* logits, const T* row_lse, const int32_t* targets, int rows, int V,
                   int Vp, T smoothing, int count, int32_t ignore_index) {
  if (count == 0) return;
  const T scale = dloss / T(count);
  const T uniform = smoothing / T(V);
#pragma omp parallel for schedule(static) if (long(rows) * V >= kParallelWork)
  for (int r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) continue;
    const T* z = logits + long(r) * Vp;
    T* dz = dlogits + long(r) * Vp;
    const T lse = row_lse[r];
    for (int v = 0; v < V; ++v) dz[v] += scale * (std::exp(z[v] - lse) - uniform);
    dz[targets[r]] -= scale * (T(1) - smoothing);
  }
}

template XentResult xent_forward<float>(float*, float*, const float*, const int32_t*, int, int, int, float,
                                        int32_t);
template XentResult xent_forward<double>(double*, double*, const double*, const int32_t*, int, int, int, double,
                                         int32_t);
template void xent_backward<float>(float*, float, const float*, const float*, const int32_t*, int, int, int, float,
                                   int, int32_t);
template void xent_backward<double>(double*, double, const double*, const double*, const int32_t*, int, int, int,
                                    double, int, int32_t);

}  // namespace muse
