// AdamW with decoupled weight decay (SPEC §3), global grad-norm clipping and the learning-rate
// schedule (linear warmup, then cosine to a final fraction of the peak).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "model/params.h"

namespace muse {

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

// One contiguous parameter range of the flat parameter vector and whether weight decay applies to it.
struct ParamRange {
  size_t offset;
  size_t size;
  bool decay;
};

// One range per tensor of the table, with its weight-decay flag.
std::vector<ParamRange> param_ranges(const ParamTable& table);

class AdamW {
 public:
  AdamW(std::vector<ParamRange> ranges, size_t total, AdamWConfig config);
  // One range per tensor of the table, with its weight-decay flag.
  AdamW(const ParamTable& table, AdamWConfig config);

  // One update of params from grads at learning rate lr (the step counter advances first, so the first
  // call uses bias corrections for t = 1).
  void step(float* params, const float* grads, double lr);

  int64_t steps_taken() const { return t_; }
  const float* first_moment_data() const { return m_.data(); }
  const float* second_moment_data() const { return v_.data(); }
  float* first_moment_data() { return m_.data(); }
  float* second_moment_data() { return v_.data(); }
  void set_steps_taken(int64_t t) { t_ = t; }
  const AdamWConfig& config() const { return config_; }

 private:
  std::vector<ParamRange> ranges_;
  AdamWConfig config_;
  std::vector<float> m_, v_;
  int64_t t_ = 0;
};

// Global L2 norm of grads[0, n) accumulated in double in index order (thread-count independent). When
// it exceeds max_norm > 0, grads are scaled by max_norm / norm. Returns the norm before clipping.
double clip_grad_norm(float* grads, size_t n, double max_norm);

struct LrSchedule {
  double peak = 1e-3;
  int64_t warmup_steps = 100;
  int64_t total_steps = 1000;
  double final_fraction = 0.1;

  // Learning rate for 0-based step s: peak·(s+1)/warmup during warmup, then a cosine from peak down to
  // final_fraction·peak at the last step.
  double at(int64_t step) const;
};

// The schedule's length for a time budget, once `done` steps have taken `elapsed_s` seconds: the steps
// done, plus the rest of the budget at the steady step time, measured after the first `settle` steps (which
// took `settle_s` of those seconds: one-time costs such as the GPU's graph capture, which would otherwise
// make the schedule end long before the budget). At least done + 1.
int64_t steps_for_budget(double budget_s, int64_t done, double elapsed_s, int64_t settle, double settle_s);

}  // namespace muse
