// Training and validation batches from token shards (SPEC §3): training draws random windows of N+1
// tokens with a seeded generator (its state is part of a checkpoint, so resumes see the same data);
// validation walks the shard in consecutive windows, the same every time.
#pragma once
#include <cstdint>
#include <vector>

#include "common/rng.h"
#include "data/shards.h"

namespace muse {

struct Batch {
  int B = 0, N = 0;
  std::vector<int32_t> inputs;   // [B, N]
  std::vector<int32_t> targets;  // [B, N]: inputs shifted by one
};

// B random windows of N+1 tokens from the shard (which must hold more than N+1 tokens).
Batch sample_batch(const Shard& shard, int B, int N, Rng& rng);

// Consecutive windows of the shard: window w covers tokens [w·N, w·N + N] (N+1 tokens). Returns how
// many full windows the shard holds.
int64_t window_count(const Shard& shard, int N);
// Windows [first, first + B) (fewer at the end of the shard).
Batch window_batch(const Shard& shard, int64_t first, int B, int N);

// Checks every id of the shard is below vocab_size; throws naming the file, position and id.
void check_token_ids(const Shard& shard, int vocab_size);

}  // namespace muse
