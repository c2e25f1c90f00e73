// Linear layer (GEMM + bias). Weights use the [out, in] row-major layout.
//
// Conventions shared by every op in src/ops (see docs/ARCHITECTURE.md):
//   * plain row-major arrays, sizes passed explicitly, templated on float and double;
//   * *_forward writes its outputs (and whatever it saves for the backward);
//   * *_backward ACCUMULATES (+=) into every gradient it is given; a null gradient pointer skips it.
#pragma once

namespace muse {

// y[rows, out] = x[rows, in] · Wᵀ + b      (b may be null)
template <typename T>
void linear_forward(T* y, const T* x, const T* W, const T* b, int rows, int in, int out);

// dx += dy·W,  dW += dyᵀ·x,  db += Σ_rows dy
template <typename T>
void linear_backward(T* dx, T* dW, T* db, const T* dy, const T* x, const T* W, int rows, int in, int out);

}  // namespace muse
