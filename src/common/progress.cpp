#include "common/progress.h"

#include <unistd.h>

#include <cstdio>

namespace muse {

std::string format_duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e7) return "?";
  const long s = long(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%lds", s);
  return buf;
}

ProgressBar::ProgressBar(std::string label, int64_t total, std::string unit)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), enabled_(isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()), last_draw_(start_ - std::chrono::seconds(1)) {}

ProgressBar::~ProgressBar() {
  if (enabled_ && !finished_) std::fputc('\n', stderr);
}

void ProgressBar::update(int64_t done, const std::string& suffix) {
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_draw_ < std::chrono::milliseconds(100) && done < total_) return;
  last_draw_ = now;
  draw(done, suffix);
}

void ProgressBar::finish(const std::string& suffix) {
  if (!enabled_ || finished_) return;
  draw(total_, suffix);
  std::fputc('\n', stderr);
  finished_ = true;
}

void ProgressBar::draw(int64_t done, const std::string& suffix) {
  constexpr int kWidth = 30;
  const double fraction = total_ > 0 ? double(done) / double(total_) : 1.0;
  const int filled = int(fraction * kWidth);
  std::string bar(filled, '#');
  bar.append(kWidth - filled, '.');
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double eta = done > 0 ? elapsed * double(total_ - done) / double(done) : -1;
  std::fprintf(stderr, "\r\033[K%s [%s] %3d%% %lld/%lld%s  %s elapsed, ETA %s  %s", label_.c_str(), bar.c_str(),
               int(fraction * 100), (long long)done, (long long)total_, unit_.c_str(), format_duration(elapsed).c_str(),
               done > 0 ? format_duration(eta).c_str() : "?", suffix.c_str());
  std::fflush(stderr);
}

}  // namespace muse
