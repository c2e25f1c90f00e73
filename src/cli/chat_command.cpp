#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/device_flags.h"
#include "cli/generation_flags.h"
#include "infer/chat_template.h"
#include "infer/decoder.h"
#ifdef MUSE_HAVE_CUDA
#include "infer/cuda_decoder.h"
#endif
#include "infer/generation.h"
#include "train/checkpoint.h"

namespace muse::cli {

namespace {

struct ChatOptions {
  std::string model_dir, template_file;
  int max_tokens = 512;
  SamplingOptions sampling;
  std::vector<std::string> stop;
  std::string device = "cpu";
};

// The conversation's recurrent decoder (stream 0) on the CPU or the GPU, as the chat loop uses it: host
// logits out (for the sampler), states in the CPU decoder's form (the history's snapshots).
struct ChatDecoder {
  std::function<void()> reset;
  std::function<const float*(const std::vector<int32_t>&)> prefill, feed;
  std::function<const float*(int32_t)> step;
  std::function<int()> position;
  std::function<DecodeState<float>()> snapshot;
  std::function<void(const DecodeState<float>&)> restore;
};

// The logits of a decoder call on the host: the CPU decoder returns them; the GPU one leaves them on the
// device until host_logits().
const float* host(Decoder<float>&, const float* logits) { return logits; }
#ifdef MUSE_HAVE_CUDA
const float* host(cuda::Decoder& d, const float*) { return d.host_logits(); }
#endif

template <class AnyDecoder>
ChatDecoder chat_decoder(AnyDecoder& d) {
  ChatDecoder c;
  c.reset = [&d] { d.reset(0); };
  c.prefill = [&d](const std::vector<int32_t>& ids) { return host(d, d.prefill(0, ids.data(), int(ids.size()))); };
  c.feed = [&d](const std::vector<int32_t>& ids) { return host(d, d.feed(0, ids.data(), int(ids.size()))); };
  c.step = [&d](int32_t token) { return host(d, d.step(0, token)); };
  c.position = [&d] { return d.position(0); };
  c.snapshot = [&d] { return d.snapshot(0); };
  c.restore = [&d](const DecodeState<float>& state) { d.restore(0, state); };
  return c;
}

ChatTemplate resolve_template(const ChatOptions& o, const LoadedModel& m) {
  if (!o.template_file.empty()) {
    std::ifstream in(o.template_file);
    const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    if (j.is_discarded()) throw std::invalid_argument("--template " + o.template_file + ": not valid JSON");
    try {
      return chat_template_from_json(j.contains("chat_template") ? j["chat_template"] : j);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("--template " + o.template_file + ": " + e.what());
    }
  }
  if (m.info.chat_template.is_null()) return default_chat_template();
  try {
    return chat_template_from_json(m.info.chat_template);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(m.dir + "/config.json: " + e.what());
  }
}

void print(const std::string& text) {
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

// Model text for the terminal: control bytes other than newline and tab (which a byte-level model can
// produce, escape sequences included) are shown as U+FFFD instead of being obeyed by the terminal. The
// history keeps the text as generated.
void show_reply(const std::string& text) {
  std::string shown;
  for (const char ch : text) {
    const unsigned char b = static_cast<unsigned char>(ch);
    if ((b < 0x20 && b != '\n' && b != '\t') || b == 0x7f)
      shown += "\xEF\xBF\xBD";
    else
      shown += ch;
  }
  print(shown);
}

// One line from the terminal without its newline. Returns false at end of input; sets *interrupted (and
// returns true with an empty line) when Ctrl-C abandoned the line.
bool read_line(std::string& line, bool* interrupted) {
  char* buffer = nullptr;
  size_t capacity = 0;
  g_interrupted.store(false);
  const ssize_t n = ::getline(&buffer, &capacity, stdin);
  *interrupted = false;
  line.clear();
  if (n < 0) {
    std::free(buffer);
    if (!g_interrupted.load()) return false;
    clearerr(stdin);
    *interrupted = true;
    return true;
  }
  line.assign(buffer, size_t(n));
  std::free(buffer);
  while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
  return true;
}

}  // namespace

void add_chat_command(CLI::App& app) {
  auto o = std::make_shared<ChatOptions>();
  CLI::App* cmd = app.add_subcommand(
      "chat",
      "Multi-turn chat in the terminal. Turns are laid out with the checkpoint's chat template (config.json\n"
      "\"chat_template\", else the default \"User: {message}\\n\" / \"Assistant: {message}\\n\"); the history\n"
      "lives in the recurrent decoder's state, so a long conversation costs no more per token than a short\n"
      "one (Phase 7/8). Type /reset to clear the history and /exit (or Ctrl-D) to quit; Ctrl-C stops the\n"
      "current reply, not the program.");
  cmd->add_option("--model,-m", o->model_dir, "Checkpoint or run directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--max-tokens", o->max_tokens, "Tokens per reply at most")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 30));
  cmd->add_option("--template", o->template_file,
                  "JSON file with a chat template {\"system\", \"user\", \"assistant\"} to use instead of the "
                  "checkpoint's")
      ->check(CLI::ExistingFile);
  add_sampling_flags(cmd, o->sampling, o->stop);
  add_device_flag(cmd, o->device,
                  "auto: the GPU when one is visible, except for arch = gpt, whose growing KV cache only the CPU\n"
                  "decoder keeps; default cpu. On cuda the history's state stays on the GPU");
  cmd->callback([o] {
    validate(o->sampling);
    LoadedModel m = load_model(o->model_dir);
    const ModelConfig& c = m.model.config();
    const ChatTemplate chat = resolve_template(*o, m);
    const Tokenizer& tokenizer = *m.tokenizer;
    const bool gpu = resolve_decode_device(o->device, c) == "cuda";
    std::unique_ptr<Decoder<float>> cpu_decoder;
    ChatDecoder decoder;
#ifdef MUSE_HAVE_CUDA
    std::unique_ptr<cuda::Decoder> gpu_decoder;
    if (gpu) {
      gpu_decoder = std::make_unique<cuda::Decoder>(m.model);
      decoder = chat_decoder(*gpu_decoder);
    }
#endif
    if (!gpu) {
      cpu_decoder = std::make_unique<Decoder<float>>(m.model);
      decoder = chat_decoder(*cpu_decoder);
    }
    Sampler sampler(o->sampling, std::min(c.vocab_size, tokenizer.vocab_size()));  // only decodable tokens
    std::vector<std::string> stops = o->stop;
    if (!chat.assistant_suffix().empty()) stops.push_back(chat.assistant_suffix());

    // The conversation's start: empty, or the system text prefilled.
    auto start_conversation = [&] {
      decoder.reset();
      sampler.clear();
      if (chat.system.empty()) return;
      const std::vector<int32_t> ids = tokenizer.encode(chat.system);
      decoder.prefill(ids);
      sampler.add_context(ids.data(), int(ids.size()));
    };
    // Appends text to the history: a parallel prefill when the history is empty, else token by token.
    auto append = [&](const std::vector<int32_t>& ids) -> const float* {
      if (ids.empty()) return nullptr;
      sampler.add_context(ids.data(), int(ids.size()));
      if (decoder.position() == 0) return decoder.prefill(ids);
      return decoder.feed(ids);
    };

    InterruptCatcher catcher;
    start_conversation();
    print("muse chat: " + m.dir + " (" + (m.info.preset.empty() ? to_string(c.arch) : m.info.preset) +
          "). /reset clears the history, /exit quits, Ctrl-C stops a reply.\n");
    std::string line;
    while (true) {
      print("> ");
      bool interrupted = false;
      if (!read_line(line, &interrupted)) {
        print("\n");
        break;
      }
      if (interrupted) {
        print("\n(Ctrl-C stops a reply; /exit quits)\n");
        continue;
      }
      if (line == "/exit") break;
      if (line == "/reset") {
        start_conversation();
        print("[history cleared]\n");
        continue;
      }
      if (line.empty()) continue;

      const DecodeState<float> before_turn = decoder.snapshot();
      try {
        const std::vector<int32_t> turn = tokenizer.encode(chat.user_turn(line) + chat.assistant_prefix());
        check_generation_length(c, decoder.position() + int(turn.size()), o->max_tokens);
        const float* logits = append(turn);
        const DecodeState<float> after_prompt = decoder.snapshot();
        sampler.begin_completion();
        g_interrupted.store(false);
        const GenerationResult r =
            generate_tokens(decoder.step, logits, sampler, tokenizer, o->max_tokens, stops, show_reply, &g_interrupted);
        print(r.finish == FinishReason::interrupted ? " [stopped]\n" : "\n");
        // The history keeps the reply as shown, closed by the template's suffix (whatever the model wrote
        // after a stop string is not part of it).
        decoder.restore(after_prompt);
        append(tokenizer.encode(r.text + chat.assistant_suffix()));
      } catch (const std::invalid_argument& e) {
        decoder.restore(before_turn);
        print(std::string("[error: ") + e.what() + "; /reset starts a new conversation]\n");
      }
    }
  });
}

}  // namespace muse::cli
