// A progress bar with rate and ETA on stderr, drawn only when stderr is a terminal (logs and pipes get
// the JSON lines alone). Redraws at most ten times a second.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace muse {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, std::string unit = "");
  ~ProgressBar();

  // done of total units finished; suffix is printed after the ETA (e.g. "loss 2.31").
  void update(int64_t done, const std::string& suffix = "");
  // Draws the final state and moves to a new line.
  void finish(const std::string& suffix = "");
  bool enabled() const { return enabled_; }

 private:
  void draw(int64_t done, const std::string& suffix);

  std::string label_, unit_;
  int64_t total_;
  bool enabled_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

// "1h02m", "3m07s", "12s".
std::string format_duration(double seconds);

}  // namespace muse
