#include "train/batches.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace muse {

Batch sample_batch(const Shard& shard, int B, int N, Rng& rng) {
  if (shard.size() <= uint64_t(N) + 1)
    throw std::runtime_error(shard.path() + ": " + std::to_string(shard.size()) + " tokens, too few for windows of " +
                             std::to_string(N + 1));
  Batch batch{B, N, std::vector<int32_t>(size_t(B) * N), std::vector<int32_t>(size_t(B) * N)};
  const uint64_t starts = shard.size() - uint64_t(N);
  for (int b = 0; b < B; ++b) {
    const uint64_t start = rng.below(starts);
    for (int t = 0; t < N; ++t) {
      batch.inputs[size_t(b) * N + t] = shard[start + t];
      batch.targets[size_t(b) * N + t] = shard[start + t + 1];
    }
  }
  return batch;
}

int64_t window_count(const Shard& shard, int N) {
  return shard.size() > 0 ? int64_t((shard.size() - 1) / uint64_t(N)) : 0;
}

Batch window_batch(const Shard& shard, int64_t first, int B, int N) {
  const int rows = int(std::max<int64_t>(0, std::min<int64_t>(B, window_count(shard, N) - first)));
  Batch batch{rows, N, std::vector<int32_t>(size_t(rows) * N), std::vector<int32_t>(size_t(rows) * N)};
  for (int b = 0; b < rows; ++b) {
    const uint64_t start = uint64_t(first + b) * N;
    for (int t = 0; t < N; ++t) {
      batch.inputs[size_t(b) * N + t] = shard[start + t];
      batch.targets[size_t(b) * N + t] = shard[start + t + 1];
    }
  }
  return batch;
}

void check_token_ids(const Shard& shard, int vocab_size) {
  for (uint64_t i = 0; i < shard.size(); ++i)
    if (shard[i] >= vocab_size)
      throw std::runtime_error(shard.path() + ": token " + std::to_string(i) + " has id " + std::to_string(shard[i]) +
                               ", outside the model's vocabulary of " + std::to_string(vocab_size));
}

}  // namespace muse
