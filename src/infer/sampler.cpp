#include "infer/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace muse {

void validate(const SamplingOptions& o) {
  auto fail = [](const std::string& flag, const std::string& what) {
    throw std::invalid_argument("--" + flag + " " + what);
  };
  if (!(o.temperature >= 0) || !std::isfinite(o.temperature)) fail("temperature", "must be a finite number ≥ 0");
  if (o.top_k < 0) fail("top-k", "must be ≥ 0 (0 turns it off)");
  if (!(o.top_p > 0 && o.top_p <= 1)) fail("top-p", "must be in (0, 1] (1 turns it off)");
  if (!(o.min_p >= 0 && o.min_p <= 1)) fail("min-p", "must be in [0, 1] (0 turns it off)");
  if (!(o.repetition_penalty > 0) || !std::isfinite(o.repetition_penalty))
    fail("repetition-penalty", "must be a finite number > 0 (1 turns it off)");
  if (!std::isfinite(o.presence_penalty)) fail("presence-penalty", "must be finite");
  if (!std::isfinite(o.frequency_penalty)) fail("frequency-penalty", "must be finite");
}

Sampler::Sampler(const SamplingOptions& options, int vocab_size)
    : options_(options),
      V_(vocab_size),
      rng_(options.seed),
      context_count_(vocab_size, 0),
      generated_count_(vocab_size, 0),
      logits_(vocab_size),
      probs_(vocab_size) {
  validate(options_);
  if (vocab_size < 1) throw std::invalid_argument("sampler: the vocabulary is empty");
}

void Sampler::add_context(const int32_t* ids, int n) {
  for (int i = 0; i < n; ++i)
    if (ids[i] >= 0 && ids[i] < V_) ++context_count_[ids[i]];
}

void Sampler::begin_completion() { std::fill(generated_count_.begin(), generated_count_.end(), 0); }

void Sampler::add_generated(int32_t id) {
  if (id < 0 || id >= V_) return;
  ++context_count_[id];
  ++generated_count_[id];
}

void Sampler::clear() {
  std::fill(context_count_.begin(), context_count_.end(), 0);
  begin_completion();
}

void Sampler::penalised(const float* logits) {
  const double r = options_.repetition_penalty;
  for (int v = 0; v < V_; ++v) {
    double l = logits[v];
    if (context_count_[v] > 0 && r != 1.0) l = l > 0 ? l / r : l * r;
    if (generated_count_[v] > 0) l -= options_.presence_penalty + options_.frequency_penalty * generated_count_[v];
    logits_[v] = l;
  }
}

// From logits_ to probs_: temperature, softmax, top-k, top-p, min-p, renormalisation.
void Sampler::filter() {
  const double inv_t = 1.0 / options_.temperature;
  double max = -std::numeric_limits<double>::infinity();
  for (int v = 0; v < V_; ++v) max = std::max(max, logits_[v] * inv_t);
  double total = 0;
  for (int v = 0; v < V_; ++v) total += probs_[v] = std::exp(logits_[v] * inv_t - max);
  for (int v = 0; v < V_; ++v) probs_[v] /= total;

  const bool top_k = options_.top_k > 0 && options_.top_k < V_;
  const bool top_p = options_.top_p < 1.0;
  if (top_k || top_p) {
    auto more_probable = [&](int32_t a, int32_t b) {
      return probs_[a] > probs_[b] || (probs_[a] == probs_[b] && a < b);
    };
    order_.resize(V_);
    for (int v = 0; v < V_; ++v) order_[v] = v;
    // `sorted` leading entries of order_ are in decreasing probability; everything after them is less probable.
    int kept = V_;
    if (top_k) {
      kept = options_.top_k;
      std::nth_element(order_.begin(), order_.begin() + (kept - 1), order_.end(), more_probable);
      std::sort(order_.begin(), order_.begin() + kept, more_probable);
    }
    if (top_p) {
      // Sort only as much of the head as the cumulative sum needs: widen the sorted prefix until it
      // reaches p (a full sort of a 50K vocabulary per token costs more than the decode step).
      const double mass = top_k ? [&] {
        double m = 0;
        for (int i = 0; i < kept; ++i) m += probs_[order_[i]];
        return m;
      }() : 1.0;
      int sorted = top_k ? kept : 0;
      int cut = -1;
      for (int width = std::min(kept, 64); cut < 0; width = std::min(kept, width * 8)) {
        if (sorted < width) {
          std::partial_sort(order_.begin(), order_.begin() + width, order_.begin() + kept, more_probable);
          sorted = width;
        }
        double cumulative = 0;
        for (int i = 0; i < sorted; ++i) {
          cumulative += probs_[order_[i]] / mass;
          if (cumulative >= options_.top_p) {
            cut = i + 1;
            break;
          }
        }
        if (cut < 0 && sorted == kept) cut = kept;  // rounding left the sum a hair below p
      }
      kept = cut;
    }
    std::vector<char> keep(V_, 0);
    for (int i = 0; i < kept; ++i) keep[order_[i]] = 1;
    for (int v = 0; v < V_; ++v)
      if (!keep[v]) probs_[v] = 0;
  }
  if (options_.min_p > 0) {
    const double threshold = options_.min_p * *std::max_element(probs_.begin(), probs_.end());
    for (int v = 0; v < V_; ++v)
      if (probs_[v] < threshold) probs_[v] = 0;
  }
  total = 0;
  for (int v = 0; v < V_; ++v) total += probs_[v];
  for (int v = 0; v < V_; ++v) probs_[v] /= total;
}

std::vector<double> Sampler::probabilities(const float* logits) {
  penalised(logits);
  if (options_.temperature == 0) {
    std::vector<double> one_hot(V_, 0.0);
    one_hot[std::max_element(logits_.begin(), logits_.end()) - logits_.begin()] = 1.0;
    return one_hot;
  }
  filter();
  return probs_;
}

int32_t Sampler::sample(const float* logits) {
  penalised(logits);
  // max_element returns the first maximum: ties go to the lowest id.
  if (options_.temperature == 0) return int32_t(std::max_element(logits_.begin(), logits_.end()) - logits_.begin());
  filter();
  double u = rng_.uniform();
  int32_t last = 0;
  for (int v = 0; v < V_; ++v) {
    if (probs_[v] == 0) continue;
    last = v;
    u -= probs_[v];
    if (u < 0) return v;
  }
  return last;  // u landed in the rounding slack of the sum: the last kept token
}

StopStrings::StopStrings(std::vector<std::string> stops) : stops_(std::move(stops)) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
}

std::string StopStrings::push(const std::string& bytes) {
  if (stopped_) return "";
  pending_ += bytes;
  size_t first = std::string::npos;
  for (const std::string& s : stops_) first = std::min(first, pending_.find(s));
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = pending_.substr(0, first);
    pending_.clear();
    return out;
  }
  // Hold back the longest tail of pending_ that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const std::string& s : stops_)
    for (size_t n = std::min(s.size() - 1, pending_.size()); n > hold; --n)
      if (pending_.compare(pending_.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string StopStrings::flush() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace muse
