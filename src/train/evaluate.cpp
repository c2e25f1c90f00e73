#include "train/evaluate.h"

#include <cmath>
#include <stdexcept>

#include "train/batches.h"

namespace muse {

namespace {

// run(batch, &nats, &count): the summed loss of the batch's targets and their count, on some device.
template <class Run>
EvalResult evaluate_windows(const Run& run, const Shard& shard, const Tokenizer& tokenizer, int seq, int batch,
                            int64_t max_windows) {
  int64_t windows = window_count(shard, seq);
  if (max_windows > 0) windows = std::min(windows, max_windows);
  if (windows == 0)
    throw std::runtime_error(shard.path() + ": " + std::to_string(shard.size()) +
                             " tokens, too few for one evaluation window of " + std::to_string(seq + 1));
  // Bytes per token id, computed once: bits-per-byte divides by the bytes the targets decode to.
  std::vector<int> token_bytes(tokenizer.vocab_size());
  for (int id = 0; id < tokenizer.vocab_size(); ++id) token_bytes[id] = int(tokenizer.token_bytes(id).size());

  EvalResult r;
  double nats = 0;
  for (int64_t first = 0; first < windows; first += batch) {
    Batch b = window_batch(shard, first, int(std::min<int64_t>(batch, windows - first)), seq);
    double batch_nats = 0;
    int64_t count = 0;
    run(b, &batch_nats, &count);
    nats += batch_nats;
    r.tokens += count;
    for (int32_t t : b.targets) r.bytes += token_bytes[t];
  }
  r.loss = nats / double(r.tokens);
  r.perplexity = std::exp(r.loss);
  r.bits_per_byte = r.bytes > 0 ? nats / std::log(2.0) / double(r.bytes) : 0;
  return r;
}

}  // namespace

EvalResult evaluate(Model<float>& model, const Shard& shard, const Tokenizer& tokenizer, int seq, int batch,
                    int64_t max_windows) {
  auto run = [&](const Batch& b, double* nats, int64_t* count) {
    model.forward(b.inputs.data(), b.B, b.N);
    model.loss(b.targets.data(), 0.0, nats, count);
  };
  return evaluate_windows(run, shard, tokenizer, seq, batch, max_windows);
}

#ifdef MUSE_HAVE_CUDA
EvalResult evaluate(cuda::Model& model, const Shard& shard, const Tokenizer& tokenizer, int seq, int batch,
                    int64_t max_windows) {
  auto run = [&](const Batch& b, double* nats, int64_t* count) {
    model.forward(b.inputs.data(), b.B, b.N);
    model.loss(b.targets.data());
    model.read_loss(nats, count);
  };
  return evaluate_windows(run, shard, tokenizer, seq, batch, max_windows);
}
#endif

}  // namespace muse
