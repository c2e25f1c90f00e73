#include <nlohmann/json.hpp>

#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "cli/device_flags.h"
#include "common/device.h"
#include "data/prepare.h"
#include "train/checkpoint.h"
#include "train/evaluate.h"

namespace muse::cli {

namespace {

struct EvalOptions {
  std::string model_dir, data_dir, text_file;
  int seq = 0, batch = 8;
  int64_t max_windows = 0;
  std::string device = "auto";
  std::string gpu_math = "tf32";  // a measurement, not a hot loop: TF32 rather than training's bf16
};

}  // namespace

void add_eval_command(CLI::App& app) {
  auto o = std::make_shared<EvalOptions>();
  CLI::App* cmd = app.add_subcommand("eval", "Validation loss, perplexity and bits per byte of a checkpoint (JSON)");
  cmd->add_option("--model,-m", o->model_dir, "Checkpoint or run directory")->required()->check(CLI::ExistingDirectory);
  auto* data = cmd->add_option("--data,-d", o->data_dir, "Prepared data directory (its val.bin is evaluated)")
                   ->check(CLI::ExistingDirectory);
  auto* text = cmd->add_option("--text,-t", o->text_file, "A text file, tokenized with the model's tokenizer")
                   ->check(CLI::ExistingFile);
  data->excludes(text);
  cmd->add_option("--seq,-n", o->seq, "Window length (default: the training sequence length)");
  cmd->add_option("--batch,-b", o->batch, "Windows per forward")->capture_default_str();
  cmd->add_option("--max-windows", o->max_windows, "Evaluate at most this many windows (0: all)");
  add_device_flag(cmd, o->device, "the GPU when one is visible");
  add_gpu_math_flag(cmd, o->gpu_math);
  cmd->callback([o] {
    if (o->data_dir.empty() == o->text_file.empty()) throw std::invalid_argument("give exactly one of --data and --text");
    LoadedModel m = load_model(o->model_dir);
    const int seq = o->seq > 0 ? o->seq : m.trainer_state.value("seq", 256);
    std::unique_ptr<Shard> shard;
    if (!o->text_file.empty()) {
      shard = std::make_unique<Shard>(o->text_file, m.tokenizer->encode(read_corpus_file(o->text_file)),
                                      m.tokenizer->fingerprint());
    } else {
      shard = std::make_unique<Shard>(o->data_dir + "/val.bin");
      if (shard->header().tokenizer_fingerprint != m.tokenizer->fingerprint())
        throw std::runtime_error(shard->path() + ": tokenized with a different tokenizer than the model's (" +
                                 m.tokenizer->kind() + ")");
    }
    const std::string device = resolve_device(o->device);
    EvalResult r;
#ifdef MUSE_HAVE_CUDA
    if (device == "cuda") {
      cuda::Model gpu(m.model.config());
      gpu.set_inference_only(true);
      gpu.set_gemm_math(cuda::gemm_math_from_string(o->gpu_math));
      gpu.upload_params(m.model.params().data());
      r = evaluate(gpu, *shard, *m.tokenizer, seq, o->batch, o->max_windows);
    }
#endif
    if (device == "cpu") r = evaluate(m.model, *shard, *m.tokenizer, seq, o->batch, o->max_windows);
    nlohmann::json out = {{"val_loss", r.loss},   {"perplexity", r.perplexity}, {"bits_per_byte", r.bits_per_byte},
                          {"tokens", r.tokens},   {"bytes", r.bytes},           {"seq", seq},
                          {"model", m.dir},       {"device", device}};
    std::printf("%s\n", out.dump().c_str());
  });
}

}  // namespace muse::cli
