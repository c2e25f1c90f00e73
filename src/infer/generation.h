// The generation loop shared by `muse generate` and `muse chat`: sample a token, stream its text through
// the stop strings, feed it back into the recurrent decoder, repeat.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "infer/decoder.h"
#include "infer/sampler.h"
#include "tokenizer/tokenizer.h"

namespace muse {

enum class FinishReason { stop, length, interrupted };
std::string to_string(FinishReason reason);

struct GenerationResult {
  std::string text;             // the text shown: up to (not including) a stop string
  std::vector<int32_t> tokens;  // every sampled token
  double seconds = 0;           // sampling and decode steps together
  FinishReason finish = FinishReason::length;
};

// Continues `stream` of the decoder from `logits` (those after its context) with up to max_tokens sampled
// tokens. Every sampled token is fed back, so afterwards the stream's state holds the context and all of
// `tokens`. on_text receives text as soon as no stop string can still claim it; interrupt (may be null) is
// checked before each token. The sampler's completion counts are the caller's to reset.
GenerationResult generate_tokens(Decoder<float>& decoder, int stream, const float* logits, Sampler& sampler,
                                 const Tokenizer& tokenizer, int max_tokens, const std::vector<std::string>& stop,
                                 const std::function<void(const std::string&)>& on_text,
                                 const std::atomic<bool>* interrupt = nullptr);

// The same loop over any decoder: feed(token) appends a sampled token and returns the logits after it.
GenerationResult generate_tokens(const std::function<const float*(int32_t)>& feed, const float* logits,
                                 Sampler& sampler, const Tokenizer& tokenizer, int max_tokens,
                                 const std::vector<std::string>& stop,
                                 const std::function<void(const std::string&)>& on_text,
                                 const std::atomic<bool>* interrupt = nullptr);

// Learned positions bound the whole sequence: refuses (std::invalid_argument naming max_seq) a context of
// `context` tokens that max_tokens more would carry past it. Other position modes have no limit.
void check_generation_length(const ModelConfig& config, int context, int max_tokens);

}  // namespace muse
