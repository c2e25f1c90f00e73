// One optimizer step entirely on the GPU (SPEC §3, §6): micro-batches of forward, loss and backward on
// cuda::Model, the global grad norm, fused clipping and AdamW (train/optimizer.cuh) — queued without a host
// synchronisation; the loss and the norm are read once, after the step. Used by the trainer and by
// `muse bench --mode train --device cuda`, so both time the same step.
#pragma once
#include <functional>
#include <memory>

#include "model/config.h"
#include "model/cuda_model.h"
#include "train/batches.h"
#include "train/optimizer.cuh"
#include "train/optimizer.h"

namespace muse::cuda {

class Training {
 public:
  // Parameters start as host_params (a Model<float>'s after init() or a checkpoint load).
  Training(const ModelConfig& config, const float* host_params, const AdamWConfig& adam);
  ~Training();
  Training(const Training&) = delete;
  Training& operator=(const Training&) = delete;

  Model& model() { return model_; }

  struct StepResult {
    double loss = 0;       // mean over the micro-batches of their mean losses
    double grad_norm = 0;  // before clipping; not finite → the weights were left unchanged
  };
  // grad_accum micro-batches from next_batch(), each weighted 1/grad_accum, then clip to max_norm
  // (0: off) and AdamW at lr.
  StepResult step(const std::function<Batch()>& next_batch, int grad_accum, double lr, double max_norm,
                  double label_smoothing);

  // Parameters and optimizer state to and from the host (checkpoints, resumes, CPU-side diagnostics).
  void download(float* host_params, muse::AdamW* host_optimizer) const;
  void upload(const float* host_params, const muse::AdamW& host_optimizer);
  void download_grads(float* host) const { model_.download_grads(host); }

 private:
  Model model_;
  AdamW adam_;
  double* norm_ = nullptr;      // device: ‖g‖ of the last step
  double* partials_ = nullptr;  // device: grad_norm's per-block sums
};

}  // namespace muse::cuda
