// Sampling controls (SPEC §4) and stop strings.
//
// The next token is drawn from the logits of the first V vocabulary entries in this order:
//   1. penalties, on the raw logits:
//        repetition  (r):  a token present in the context (prompt or generated) has its logit divided by r
//                          when positive and multiplied by r when negative, so r > 1 always makes it less
//                          likely (dividing a negative logit would make it more likely);
//        presence    (α):  logit −= α for a token generated at least once in this completion;
//        frequency   (β):  logit −= β·count for a token generated `count` times in this completion;
//   2. temperature 0 → greedy: the largest penalised logit (the lowest id on a tie); no draw;
//   3. softmax(logit / temperature);
//   4. top-k: keep the k most probable tokens (ties broken towards the lower id);
//   5. top-p: keep the smallest set of most probable tokens whose probability sums to ≥ p;
//   6. min-p: keep the tokens whose probability is ≥ min_p × the largest probability;
//   7. renormalise and draw with the seeded generator.
// Each filter is off at its neutral value (k = 0, p = 1, min_p = 0) and always keeps the most probable
// token. Repetition uses prompt + generated tokens and presence/frequency only this completion's tokens,
// the conventions of the OpenAI API for the latter.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/rng.h"

namespace muse {

struct SamplingOptions {
  double temperature = 0.8;         // 0: greedy
  int top_k = 0;                    // 0: off
  double top_p = 1.0;               // 1: off
  double min_p = 0.0;               // 0: off
  double repetition_penalty = 1.0;  // 1: off
  double presence_penalty = 0.0;    // 0: off
  double frequency_penalty = 0.0;   // 0: off
  uint64_t seed = 0;
};

// Throws std::invalid_argument naming the option (as its command-line flag) that is out of range.
void validate(const SamplingOptions& options);

class Sampler {
 public:
  Sampler(const SamplingOptions& options, int vocab_size);

  const SamplingOptions& options() const { return options_; }

  // Context tokens (the prompt, a chat history): they count for the repetition penalty.
  void add_context(const int32_t* ids, int n);
  // Starts a new completion: presence and frequency counts restart from zero (the context stays).
  void begin_completion();
  // A token this completion produced: it counts for all three penalties.
  void add_generated(int32_t id);
  // Forgets every context and generated token (the random generator keeps its state).
  void clear();

  // The distribution the next draw uses, over the V vocabulary entries (0 for removed tokens); one-hot
  // at the greedy choice when the temperature is 0.
  std::vector<double> probabilities(const float* logits);
  // Draws the next token (it is not added to the counts: call add_generated).
  int32_t sample(const float* logits);

 private:
  void penalised(const float* logits);
  void filter();

  SamplingOptions options_;
  int V_;
  Rng rng_;
  std::vector<int32_t> context_count_, generated_count_;
  std::vector<double> logits_, probs_;  // scratch [V]
  std::vector<int32_t> order_;          // scratch: token ids by decreasing probability
};

// Stop strings for streamed text: push() takes each token's bytes and returns the text that is safe to
// show, holding back any tail that could still become a stop string, so a stop string is never shown even
// when it straddles token boundaries. Once a stop string appears, the text before it is returned and
// stopped() is true; everything after it is dropped.
class StopStrings {
 public:
  explicit StopStrings(std::vector<std::string> stops);
  std::string push(const std::string& bytes);
  bool stopped() const { return stopped_; }
  // The text still held back (call at the end of a generation that did not stop).
  std::string flush();

 private:
  std::vector<std::string> stops_;
  std::string pending_;
  bool stopped_ = false;
};

}  // namespace muse
