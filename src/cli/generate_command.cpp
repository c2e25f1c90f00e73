#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "common/rng.h"
#include "train/checkpoint.h"

namespace muse::cli {

namespace {

struct GenerateOptions {
  std::string model_dir, prompt;
  int max_tokens = 200;
  uint64_t seed = 0;
  double temperature = 0.8;
  int top_k = 0;
};

// Samples from softmax(logits/temperature) over the first V logits (greedy at temperature 0), keeping
// only the top_k largest when top_k > 0.
int32_t sample(const float* logits, int V, double temperature, int top_k, Rng& rng) {
  int32_t best = 0;
  for (int v = 1; v < V; ++v)
    if (logits[v] > logits[best]) best = v;
  if (temperature <= 0) return best;
  float threshold = -INFINITY;
  if (top_k > 0 && top_k < V) {
    std::vector<float> sorted(logits, logits + V);
    std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<float>());
    threshold = sorted[top_k - 1];
  }
  std::vector<double> p(V, 0.0);
  double total = 0;
  for (int v = 0; v < V; ++v)
    if (logits[v] >= threshold) total += p[v] = std::exp((logits[v] - logits[best]) / temperature);
  double r = rng.uniform() * total;
  for (int v = 0; v < V; ++v) {
    r -= p[v];
    if (r <= 0 && p[v] > 0) return v;
  }
  return best;
}

}  // namespace

void add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "Continue a prompt, streaming the text as it is sampled");
  cmd->add_option("--model,-m", o->model_dir, "Checkpoint or run directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--prompt", o->prompt, "Prompt text")->required();
  cmd->add_option("--max-tokens", o->max_tokens, "Tokens to generate")->capture_default_str()->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--seed", o->seed, "Sampling seed")->capture_default_str();
  cmd->add_option("--temperature", o->temperature, "Softmax temperature (0: greedy)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 100.0));
  cmd->add_option("--top-k", o->top_k, "Sample among the k most likely tokens (0: all)")->capture_default_str();
  cmd->callback([o] {
    LoadedModel m = load_model(o->model_dir);
    const ModelConfig& c = m.model.config();
    std::vector<int32_t> ids = m.tokenizer->encode(o->prompt);
    if (ids.empty()) throw std::invalid_argument("--prompt is empty");
    // A full forward per token over the context (the recurrent decoder makes this O(1) per token);
    // learned positions limit the context to max_seq.
    const size_t context = c.pos_embedding == PosEmbedding::learned ? size_t(c.max_seq) : ids.size() + o->max_tokens;
    Rng rng(o->seed);
    std::fwrite(o->prompt.data(), 1, o->prompt.size(), stdout);
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < o->max_tokens; ++i) {
      const size_t first = ids.size() > context ? ids.size() - context : 0;
      const int n = int(ids.size() - first);
      m.model.forward(ids.data() + first, 1, n);
      const float* last = m.model.logits() + size_t(n - 1) * c.padded_vocab();
      const int32_t next = sample(last, c.vocab_size, o->temperature, o->top_k, rng);
      ids.push_back(next);
      const std::string bytes = m.tokenizer->token_bytes(next);
      std::fwrite(bytes.data(), 1, bytes.size(), stdout);
      std::fflush(stdout);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "\n[%d tokens in %.2f s, %.1f tokens/s]\n", o->max_tokens, seconds, o->max_tokens / seconds);
  });
}

}  // namespace muse::cli
