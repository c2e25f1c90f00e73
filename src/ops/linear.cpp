#include "ops/linear.h"

#include "common/blas.h"

namespace muse {

template <typename T>
void linear_forward(T* y, const T* x, const T* W, const T* b, int rows, int in, int out) {
  if (b) {
    for (int r = 0; r < rows; ++r)
      for (int o = 0; o < out; ++o) y[(long)r * out + o] = b[o];
  }
  gemm<T>(false, true, rows, out, in, T(1), x, in, W, in, b ? T(1) : T(0), y, out);
}

template <typename T>
void linear_backward(T* dx, T* dW, T* db, const T* dy, const T* x, const T* W, int rows, int in, int out) {
  if (dx) gemm<T>(false, false, rows, in, out, T(1), dy, out, W, in, T(1), dx, in);
  if (dW) gemm<T>(true, false, out, in, rows, T(1), dy, out, x, in, T(1), dW, in);
  if (db) {
    for (int r = 0; r < rows; ++r)
      for (int o = 0; o < out; ++o) db[o] += dy[(long)r * out + o];
  }
}

template void linear_forward<float>(float*, const float*, const float*, const float*, int, int, int);
template void linear_forward<double>(double*, const double*, const double*, const double*, int, int, int);
template void linear_backward<float>(float*, float*, float*, const float*, const float*, const float*, int,
                                     int, int);
template void linear_backward<double>(double*, double*, double*, const double*, const double*,
                                      const double*, int, int, int);

}  // namespace muse
