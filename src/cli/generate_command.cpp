#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "cli/device_flags.h"
#include "cli/generation_flags.h"
#include "infer/decoder.h"
#ifdef MUSE_HAVE_CUDA
#include "infer/cuda_decoder.h"
#endif
#include "infer/generation.h"
#include "train/checkpoint.h"

namespace muse::cli {

namespace {

struct GenerateOptions {
  std::string model_dir, prompt;
  int max_tokens = 200;
  SamplingOptions sampling;
  std::vector<std::string> stop;
  std::string device = "cpu";
};

}  // namespace

void add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand(
      "generate",
      "Continue a prompt, streaming the text as it is sampled. The prompt is prefilled in one parallel forward,\n"
      "then each token is decoded recurrently at a cost that does not grow with the context (Phase 7/8).\n"
      "Prompt and generation speeds are reported on stderr at the end; Ctrl-C stops early.");
  cmd->add_option("--model,-m", o->model_dir, "Checkpoint or run directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--prompt", o->prompt, "Prompt text")->required();
  cmd->add_option("--max-tokens", o->max_tokens, "Tokens to generate at most")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 30));
  add_sampling_flags(cmd, o->sampling, o->stop);
  add_device_flag(cmd, o->device,
                  "auto: the GPU when one is visible, except for arch = gpt, whose growing KV cache only the CPU\n"
                  "decoder keeps. Both decode recurrently at a cost per token that does not grow with the context;\n"
                  "cuda keeps the state on the GPU and replays each step as one CUDA graph");
  cmd->callback([o] {
    validate(o->sampling);
    LoadedModel m = load_model(o->model_dir);
    const ModelConfig& c = m.model.config();
    const std::vector<int32_t> ids = m.tokenizer->encode(o->prompt);
    if (ids.empty()) throw std::invalid_argument("--prompt is empty");
    check_generation_length(c, int(ids.size()), o->max_tokens);
    // A model may have more rows than its tokenizer has tokens (--set vocab_size=…): those are never sampled.
    Sampler sampler(o->sampling, std::min(c.vocab_size, m.tokenizer->vocab_size()));
    sampler.add_context(ids.data(), int(ids.size()));
    const bool gpu = resolve_decode_device(o->device, c) == "cuda";
    std::unique_ptr<Decoder<float>> decoder;
    std::function<const float*(int32_t)> feed;
#ifdef MUSE_HAVE_CUDA
    std::unique_ptr<cuda::Decoder> gpu_decoder;
#endif

    std::fwrite(o->prompt.data(), 1, o->prompt.size(), stdout);
    std::fflush(stdout);
    const auto start = std::chrono::steady_clock::now();
    const float* logits = nullptr;
#ifdef MUSE_HAVE_CUDA
    if (gpu) {
      // The sampler reads host logits: each step's row comes back over PCIe (Vp floats).
      gpu_decoder = std::make_unique<cuda::Decoder>(m.model);
      gpu_decoder->prefill(0, ids.data(), int(ids.size()));
      logits = gpu_decoder->host_logits();
      feed = [&](int32_t token) {
        gpu_decoder->step(0, token);
        return gpu_decoder->host_logits();
      };
    }
#endif
    if (!gpu) {
      decoder = std::make_unique<Decoder<float>>(m.model);
      logits = decoder->prefill(0, ids.data(), int(ids.size()));
      feed = [&](int32_t token) { return decoder->step(0, token); };
    }
    const double prompt_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    InterruptCatcher catcher;
    const GenerationResult r = generate_tokens(
        feed, logits, sampler, *m.tokenizer, o->max_tokens, o->stop,
        [](const std::string& text) {
          std::fwrite(text.data(), 1, text.size(), stdout);
          std::fflush(stdout);
        },
        &g_interrupted);
    const size_t n = r.tokens.size();
    std::fprintf(stderr,
                 "\n[prompt: %zu tokens in %.3f s (%.1f tokens/s); generated: %zu tokens in %.3f s (%.1f tokens/s); "
                 "finished: %s]\n",
                 ids.size(), prompt_s, ids.size() / prompt_s, n, r.seconds, n / std::max(r.seconds, 1e-9),
                 to_string(r.finish).c_str());
  });
}

}  // namespace muse::cli
