// What `muse generate` and `muse chat` share: the sampling flags of SPEC §4 and a Ctrl-C flag that stops
// the current generation instead of the program.
#pragma once
#include <CLI/CLI.hpp>
#include <atomic>
#include <csignal>
#include <string>
#include <vector>

#include "infer/sampler.h"

namespace muse::cli {

inline void add_sampling_flags(CLI::App* cmd, SamplingOptions& s, std::vector<std::string>& stop) {
  cmd->add_option("--temperature", s.temperature, "Softmax temperature; 0 is greedy (always the most likely token)")
      ->capture_default_str();
  cmd->add_option("--top-k", s.top_k, "Sample among the k most likely tokens (0: off)")->capture_default_str();
  cmd->add_option("--top-p", s.top_p, "Sample among the most likely tokens whose probability sums to p (1: off)")
      ->capture_default_str();
  cmd->add_option("--min-p", s.min_p, "Drop tokens less likely than min-p times the most likely one (0: off)")
      ->capture_default_str();
  cmd->add_option("--repetition-penalty", s.repetition_penalty,
                  "Make tokens already in the context less likely: positive logits are divided by it, negative "
                  "ones multiplied (1: off)")
      ->capture_default_str();
  cmd->add_option("--presence-penalty", s.presence_penalty,
                  "Subtract this from the logit of every token already generated (0: off)")
      ->capture_default_str();
  cmd->add_option("--frequency-penalty", s.frequency_penalty,
                  "Subtract this times its count from the logit of every generated token (0: off)")
      ->capture_default_str();
  cmd->add_option("--seed", s.seed, "Sampling seed: the same seed gives the same text")->capture_default_str();
  cmd->add_option("--stop", stop, "Stop when this text appears; it is not printed (repeatable)");
}

// Set by SIGINT while installed; generation loops poll it.
inline std::atomic<bool> g_interrupted{false};

// While alive, Ctrl-C sets g_interrupted instead of ending the program. Without SA_RESTART, a blocking
// read of the terminal returns with EINTR, so a line being typed is abandoned too.
class InterruptCatcher {
 public:
  InterruptCatcher() {
    struct sigaction action {};
    action.sa_handler = [](int) { g_interrupted.store(true); };
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, &previous_);
  }
  ~InterruptCatcher() { sigaction(SIGINT, &previous_, nullptr); }
  InterruptCatcher(const InterruptCatcher&) = delete;
  InterruptCatcher& operator=(const InterruptCatcher&) = delete;

 private:
  struct sigaction previous_ {};
};

}  // namespace muse::cli
