#include "train/optimizer.h"

#include <algorithm>
#include <cmath>

namespace muse {

AdamW::AdamW(std::vector<ParamRange> ranges, size_t total, AdamWConfig config)
    : ranges_(std::move(ranges)), config_(config), m_(total, 0.f), v_(total, 0.f) {}

std::vector<ParamRange> param_ranges(const ParamTable& table) {
  std::vector<ParamRange> ranges;
  for (const ParamInfo& p : table.entries()) ranges.push_back({p.offset, p.size, p.decay});
  return ranges;
}

AdamW::AdamW(const ParamTable& table, AdamWConfig config) : AdamW(param_ranges(table), table.total(), config) {}

void AdamW::step(float* params, const float* grads, double lr) {
  ++t_;
  const double b1 = config_.beta1, b2 = config_.beta2;
  const double correction1 = 1.0 - std::pow(b1, double(t_));
  const double correction2 = 1.0 - std::pow(b2, double(t_));
  for (const ParamRange& r : ranges_) {
    const float decay = r.decay ? float(1.0 - lr * config_.weight_decay) : 1.f;
    float* p = params + r.offset;
    const float* g = grads + r.offset;
    float* m = m_.data() + r.offset;
    float* v = v_.data() + r.offset;
    const long n = long(r.size);
#pragma omp parallel for schedule(static) if (n > 16384)
    for (long i = 0; i < n; ++i) {
      m[i] = float(b1 * m[i] + (1 - b1) * g[i]);
      v[i] = float(b2 * v[i] + (1 - b2) * double(g[i]) * g[i]);
      const double mhat = m[i] / correction1, vhat = v[i] / correction2;
      p[i] = float(p[i] * decay - lr * mhat / (std::sqrt(vhat) + config_.eps));
    }
  }
}

double clip_grad_norm(float* grads, size_t n, double max_norm) {
  double sq = 0;
  for (size_t i = 0; i < n; ++i) sq += double(grads[i]) * grads[i];
  const double norm = std::sqrt(sq);
  if (max_norm > 0 && norm > max_norm) {
    const float scale = float(max_norm / norm);
    for (size_t i = 0; i < n; ++i) grads[i] *= scale;
  }
  return norm;
}

double LrSchedule::at(int64_t step) const {
  if (step < warmup_steps) return peak * double(step + 1) / double(warmup_steps);
  const int64_t decay_steps = total_steps - warmup_steps;
  if (decay_steps <= 1) return peak;
  const double progress = std::min(1.0, double(step - warmup_steps) / double(decay_steps - 1));
  return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + std::cos(M_PI * progress)));
}

int64_t steps_for_budget(double budget_s, int64_t done, double elapsed_s, int64_t settle, double settle_s) {
  const double steady = done > settle ? (elapsed_s - settle_s) / double(done - settle) : 0;
  const double per_step = steady > 0 ? steady : elapsed_s / double(std::max<int64_t>(done, 1));
  if (!(per_step > 0)) return done + 1;
  const double more = std::floor((budget_s - elapsed_s) / per_step);
  return done + std::max<int64_t>(1, more > 0 ? int64_t(more) : 0);
}

}  // namespace muse
