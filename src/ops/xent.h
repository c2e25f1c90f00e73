// Softmax cross-entropy over a padded vocabulary (SPEC §3), with label smoothing and an ignore index.
//
// logits [rows, Vp]: only columns v < V are real; columns V..Vp−1 (padding of the tied head, §2.1) never
// enter the softmax and get no gradient. targets [rows] (int32): a row whose target equals ignore_index is
// skipped; every other target must lie in [0, V).
//
//   lse = log Σ_{v<V} exp(z_v)      (computed with the row maximum subtracted)
//   row loss = (1−ε)·(−log p_y) + ε·mean_{v<V}(−log p_v) = lse − (1−ε)·z_y − ε·mean_{v<V} z_v
//   loss = Σ_{kept rows} row loss / count,   count = number of kept rows
//   ∂loss/∂z_v = (p_v − (1−ε)·[v=y] − ε/V) / count   for v < V in kept rows
//
// With count = 0 (every row ignored) the loss is defined as 0 and the backward adds nothing.
#pragma once
#include <cstdint>

namespace muse {

struct XentResult {
  double mean_loss;  // Σ row losses / count (0 when count is 0); summed in double, in row order
  int count;         // rows whose target is not ignore_index
};

// Writes row_loss[rows] (nats; 0 for ignored rows — the eval path sums these for total nats) and saves
// row_lse[rows] for the backward (0 for ignored rows).
template <typename T>
XentResult xent_forward(T* row_loss, T* row_lse, const T* logits, const int32_t* targets, int rows, int V, int Vp,
                        T smoothing, int32_t ignore_index = -1);

// dlogits += dloss·∂loss/∂logits, where dloss is the upstream gradient of mean_loss and count comes from
// the forward. Padded columns and ignored rows are left untouched (their gradient is zero).
template <typename T>
void xent_backward(T* dlogits, T dloss, const T* logits, const T* row_lse, const int32_t* targets, int rows, int V,
                   int Vp, T smoothing, int count, int32_t ignore_index = -1);

}  // namespace muse
