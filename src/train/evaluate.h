// Validation loss, perplexity and bits-per-byte (SPEC §3: total nats / ln 2 / UTF-8 bytes of the
// decoded evaluated targets) of a model on consecutive windows of a shard.
#pragma once
#include <cstdint>

#include "data/shards.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#ifdef MUSE_HAVE_CUDA
#include "model/cuda_model.h"
#endif

namespace muse {

struct EvalResult {
  double loss = 0;            // mean nats per target token
  double perplexity = 0;
  double bits_per_byte = 0;
  int64_t tokens = 0;
  int64_t bytes = 0;
};

// Evaluates windows [0, max_windows) of length seq (all windows when max_windows ≤ 0), batch at a time.
EvalResult evaluate(Model<float>& model, const Shard& shard, const Tokenizer& tokenizer, int seq, int batch,
                    int64_t max_windows);
#ifdef MUSE_HAVE_CUDA
EvalResult evaluate(cuda::Model& model, const Shard& shard, const Tokenizer& tokenizer, int seq, int batch,
                    int64_t max_windows);
#endif

}  // namespace muse
