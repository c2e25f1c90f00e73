// CUDA softmax cross-entropy over a padded vocabulary (SPEC §3): the same contract as ops/xent.h, except
// that the forward's result stays on the device so the training step never waits for the host:
//
//   xent_forward writes row_loss[rows], row_lse[rows] (as the CPU op) and result[2] = {mean_loss, count}
//   (fp32; count is exact up to 2^24 rows), where mean_loss = Σ kept row losses / count (summed in double,
//   in a fixed order) and 0 when count = 0.
//   xent_backward_in_place reads count from that same device pair (result[1]) instead of a host int, and
//   writes the gradient over the logits.
//
// One block per row; fp32 statistics (online max/sum-exp per thread, fixed-order block combination).
// A row whose target is neither ignore_index nor in [0, V) gets row_loss = NaN (the CPU op's behaviour
// is undefined there), so the mean turns NaN and the trainer's non-finite check stops the run.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace muse::cuda {

void xent_forward(float* row_loss, float* row_lse, float* result, const float* logits, const int32_t* targets,
                  int rows, int V, int Vp, float smoothing, int32_t ignore_index = -1, cudaStream_t stream = 0);

// dloss·∂loss/∂logits (dloss: the upstream gradient of mean_loss; result: the forward's device pair, of which
// only the count is read), written over the logits it comes from (logits_in_dlogits_out [rows, Vp]): every
// element is overwritten, with 0 in the padded columns, in ignored rows and everywhere when count = 0. The training
// step needs the logits only until their gradient exists, so the head keeps one [rows, Vp] buffer, not two.
void xent_backward_in_place(float* logits_in_dlogits_out, float dloss, const float* row_lse, const int32_t* targets,
                            int rows, int V, int Vp, float smoothing, const float* result, int32_t ignore_index = -1,
                            cudaStream_t stream = 0);

}  // namespace muse::cuda
