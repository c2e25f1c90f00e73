// CUDA softmax cross-entropy over a padded vocabulary (SPEC §3): the same contract as ops/xent.h, except
// that the forward's result stays on the device so the training step never waits for the host:
//
//   xent_forward writes row_loss[rows], row_lse[rows] (as the CPU op) and result[2] = {mean_loss, count}
//   (fp32; count is exact up to 2^24 rows), where mean_loss = Σ kept row losses / count (summed in double,
//   in a fixed order) and 0 when count = 0.
//   xent_rows (the training head, a chunk of rows at a time) reads the count from such a pair (result[1],
//   from xent_count) instead of a host int, and writes the gradient over the logits.
//
// One block per row; fp32 statistics (online max/sum-exp per thread, fixed-order block combination).
// A row whose target is neither ignore_index nor in [0, V) gets row_loss = NaN (the CPU op's behaviour
// is undefined there), so the mean turns NaN and the trainer's non-finite check stops the run.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace muse::cuda {

void xent_forward(float* row_loss, float* row_lse, float* result, const float* logits, const int32_t* targets,
                  int rows, int V, int Vp, float smoothing, int32_t ignore_index = -1, cudaStream_t stream = 0);

// The training head's pass over one chunk of rows (logits [rows, Vp], fp32 or bf16): row_loss and row_lse as
// xent_forward (fp32 statistics either way), and with `result` (the device pair from xent_count: result[1] is
// the whole batch's number of counted targets) each row is then overwritten, in its own type, by the gradient
// of the batch's mean loss: (softmax − smoothed one-hot)/count for v < V and 0 in the padded columns and in
// ignored rows. One kernel reads each row once (into shared memory when it fits, else twice) and writes the
// gradient once. Without `result` the logits are only read.
void xent_rows(float* row_loss, float* row_lse, float* logits, const int32_t* targets, int rows, int V, int Vp,
               float smoothing, const float* result, int32_t ignore_index = -1, cudaStream_t stream = 0);
void xent_rows(float* row_loss, float* row_lse, __nv_bfloat16* logits, const int32_t* targets, int rows, int V,
               int Vp, float smoothing, const float* result, int32_t ignore_index = -1, cudaStream_t stream = 0);

// result = {mean of the kept rows' row_loss, count} over `rows` rows (fixed-order double sums).
void xent_mean(float* result, const float* row_loss, const int32_t* targets, int rows, int32_t ignore_index = -1,
               cudaStream_t stream = 0);

// result = {0, count of targets ≠ ignore_index}: the count xent_rows' gradient needs before any loss exists.
void xent_count(float* result, const int32_t* targets, int rows, int32_t ignore_index = -1, cudaStream_t stream = 0);

}  // namespace muse::cuda
