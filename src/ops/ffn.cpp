#include "ops/ffn.h"

#include <vector>

#include "common/math.h"
#include "ops/linear.h"

namespace muse {

template <typename T>
void lowrank_ffn_forward(T* y, const LowRankFfnSaved<T>& saved, const T* x, const LowRankFfnParams<T>& params,
                         int rows, int D, int rank) {
  const int F = ffn_hidden(D);
  const T limit = T(kFfnCap);
  linear_forward<T>(saved.low1, x, params.V1, nullptr, rows, D, rank);
  linear_forward<T>(saved.pre, saved.low1, params.U1, params.b1, rows, rank, F);
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* pre = saved.pre + (long)r * F;
    T* hidden = saved.hidden + (long)r * F;
    for (int i = 0; i < F; ++i) hidden[i] = cap(gelu(pre[i]), limit);
  }
  linear_forward<T>(saved.low2, saved.hidden, params.V2, nullptr, rows, F, rank);
  linear_forward<T>(y, saved.low2, params.U2, params.b2, rows, rank, D);
}

template <typename T>
void lowrank_ffn_backward(T* dx, const LowRankFfnGrads<T>& grads, const T* dy, const LowRankFfnSaved<T>& saved,
                          const T* x, const LowRankFfnParams<T>& params, int rows, int D, int rank) {
  const int F = ffn_hidden(D);
  const T limit = T(kFfnCap);
  // linear_backward accumulates, so the intermediate gradients start at zero.
  std::vector<T> dlow2((size_t)rows * rank), dpre((size_t)rows * F), dlow1((size_t)rows * rank);
  linear_backward<T>(dlow2.data(), grads.U2, grads.b2, dy, saved.low2, params.U2, rows, rank, D);
  linear_backward<T>(dpre.data(), grads.V2, nullptr, dlow2.data(), saved.hidden, params.V2, rows, F, rank);
  // dpre holds ∂L/∂hidden here; chain through the cap (1 − tanh², tanh = hidden/10) and the GELU.
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* pre = saved.pre + (long)r * F;
    const T* hidden = saved.hidden + (long)r * F;
    T* d = dpre.data() + (long)r * F;
    for (int i = 0; i < F; ++i) {
      const T t = hidden[i] / limit;
      d[i] *= (T(1) - t * t) * gelu_grad(pre[i]);
    }
  }
  linear_backward<T>(dlow1.data(), grads.U1, grads.b1, dpre.data(), saved.low1, params.U1, rows, rank, F);
  linear_backward<T>(dx, grads.V1, nullptr, dlow1.data(), x, params.V1, rows, D, rank);
}

template <typename T>
void dense_mlp_forward(T* y, const DenseMlpSaved<T>& saved, const T* x, const DenseMlpParams<T>& params, int rows,
                       int D) {
  const int F = ffn_hidden(D);
  linear_forward<T>(saved.pre, x, params.W1, params.b1, rows, D, F);
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* pre = saved.pre + (long)r * F;
    T* hidden = saved.hidden + (long)r * F;
    for (int i = 0; i < F; ++i) hidden[i] = gelu(pre[i]);
  }
  linear_forward<T>(y, saved.hidden, params.W2, params.b2, rows, F, D);
}

template <typename T>
void dense_mlp_backward(T* dx, const DenseMlpGrads<T>& grads, const T* dy, const DenseMlpSaved<T>& saved,
                        const T* x, const DenseMlpParams<T>& params, int rows, int D) {
  const int F = ffn_hidden(D);
  std::vector<T> dpre((size_t)rows * F);
  linear_backward<T>(dpre.data(), grads.W2, grads.b2, dy, saved.hidden, params.W2, rows, F, D);
#pragma omp parallel for schedule(static)
  for (int r = 0; r < rows; ++r) {
    const T* pre = saved.pre + (long)r * F;
    T* d = dpre.data() + (long)r * F;
    for (int i = 0; i < F; ++i) d[i] *= gelu_grad(pre[i]);
  }
  linear_backward<T>(dx, grads.W1, grads.b1, dpre.data(), x, params.W1, rows, D, F);
}

#define MUSE_INSTANTIATE_FFN(T)                                                                               \
  template void lowrank_ffn_forward<T>(T*, const LowRankFfnSaved<T>&, const T*, const LowRankFfnParams<T>&, int, \
                                       int, int);                                                             \
  template void lowrank_ffn_backward<T>(T*, const LowRankFfnGrads<T>&, const T*, const LowRankFfnSaved<T>&,      \
                                        const T*, const LowRankFfnParams<T>&, int, int, int);                 \
  template void dense_mlp_forward<T>(T*, const DenseMlpSaved<T>&, const T*, const DenseMlpParams<T>&, int, int); \
  template void dense_mlp_backward<T>(T*, const DenseMlpGrads<T>&, const T*, const DenseMlpSaved<T>&, const T*,  \
                                      const DenseMlpParams<T>&, int, int);
MUSE_INSTANTIATE_FFN(float)
MUSE_INSTANTIATE_FFN(double)
#undef MUSE_INSTANTIATE_FFN

}  // namespace muse
