#include "infer/generation.h"

#include <chrono>
#include <stdexcept>

namespace muse {

std::string to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::stop:
      return "stop";
    case FinishReason::length:
      return "length";
    case FinishReason::interrupted:
      return "interrupted";
  }
  return "?";
}

void check_generation_length(const ModelConfig& c, int context, int max_tokens) {
  if (c.pos_embedding != PosEmbedding::learned) return;
  if (long(context) + max_tokens > c.max_seq)
    throw std::invalid_argument("the context (" + std::to_string(context) + " tokens) plus " +
                                std::to_string(max_tokens) + " new tokens exceeds max_seq = " +
                                std::to_string(c.max_seq) + " of this model's learned positions; ask for at most " +
                                std::to_string(std::max(0, c.max_seq - context)) + " tokens");
}

GenerationResult generate_tokens(Decoder<float>& decoder, int stream, const float* logits, Sampler& sampler,
                                 const Tokenizer& tokenizer, int max_tokens, const std::vector<std::string>& stop,
                                 const std::function<void(const std::string&)>& on_text,
                                 const std::atomic<bool>* interrupt) {
  return generate_tokens([&](int32_t token) { return decoder.step(stream, token); }, logits, sampler, tokenizer,
                         max_tokens, stop, on_text, interrupt);
}

GenerationResult generate_tokens(const std::function<const float*(int32_t)>& feed, const float* logits,
                                 Sampler& sampler, const Tokenizer& tokenizer, int max_tokens,
                                 const std::vector<std::string>& stop,
                                 const std::function<void(const std::string&)>& on_text,
                                 const std::atomic<bool>* interrupt) {
  GenerationResult r;
  StopStrings stops(stop);
  const auto start = std::chrono::steady_clock::now();
  auto show = [&](const std::string& text) {
    if (text.empty()) return;
    r.text += text;
    if (on_text) on_text(text);
  };
  while (true) {
    if (interrupt && interrupt->load()) {
      r.finish = FinishReason::interrupted;
      break;
    }
    if (int(r.tokens.size()) == max_tokens) {
      r.finish = FinishReason::length;
      break;
    }
    const int32_t next = sampler.sample(logits);
    sampler.add_generated(next);
    r.tokens.push_back(next);
    show(stops.push(tokenizer.token_bytes(next)));
    logits = feed(next);
    if (stops.stopped()) {
      r.finish = FinishReason::stop;
      break;
    }
  }
  if (!stops.stopped()) show(stops.flush());
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

}  // namespace muse
