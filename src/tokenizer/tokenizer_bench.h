// `muse bench --tokenizer`: single-threaded encoding and decoding speed of a tokenizer on a text.
#pragma once
#include <cstdint>
#include <string>

#include "tokenizer/tokenizer.h"

namespace muse {

struct TokenizerBenchRecord {
  std::string tokenizer;        // kind
  int64_t bytes = 0, tokens = 0;
  int iters = 0;
  double encode_mb_per_s = 0;   // input bytes (10^6) per second, median over iters
  double decode_mb_per_s = 0;
};

// Encodes and decodes `text` `warmup` + `iters` times on the calling thread and reports the medians.
// Throws std::runtime_error when decode(encode(text)) != text, so a fast but wrong tokenizer cannot
// report a speed (SentencePiece models that normalise text are measured with this check off).
TokenizerBenchRecord bench_tokenizer(const Tokenizer& tokenizer, const std::string& text, int warmup, int iters);

}  // namespace muse
