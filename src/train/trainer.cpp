#include "train/trainer.h"

#include <omp.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>

#include "common/device.h"
#include "common/progress.h"
#include "data/shards.h"
#include "diag/diagnose.h"
#include "model/model.h"
#include "train/batches.h"
#include "train/checkpoint.h"
#include "train/evaluate.h"
#include "train/optimizer.h"
#ifdef MUSE_HAVE_CUDA
#include "train/cuda_training.h"
#endif

namespace muse {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

constexpr int kTrainWordnetPairs = 1000;  // WordNet pairs drawn for a run (--pairs wordnet)
constexpr size_t kDiagnosticPairs = 256;  // of the run's pairs, the first these many are measured
constexpr int kOrderPairsPerStep = 16;    // positives per step of the order loss (as many negatives)

// A seed for step `step`'s auxiliary samples that needs no saved state, so resumed runs draw the same.
uint64_t step_seed(uint64_t seed, int64_t step, uint64_t salt) {
  return seed ^ (uint64_t(step) * 0x9e3779b97f4a7c15ULL) ^ salt;
}

json group_grad_norms(const ParamTable& table, const std::vector<float>& grads) {
  std::map<std::string, double> sq;
  for (const ParamInfo& p : table.entries()) {
    double s = 0;
    for (size_t i = 0; i < p.size; ++i) s += double(grads[p.offset + i]) * grads[p.offset + i];
    sq[param_module(p.name)] += s;
  }
  json j = json::object();
  for (auto& [group, s] : sq) j[group] = std::sqrt(s);
  return j;
}

json rng_to_json(const Rng& rng) {
  json j = json::array();
  for (uint64_t w : rng.state()) j.push_back(std::to_string(w));
  return j;
}

Rng rng_from_json(const json& j) {
  std::array<uint64_t, 4> s{};
  for (size_t i = 0; i < 4; ++i) s[i] = std::stoull(j.at(i).get<std::string>());
  Rng rng;
  rng.set_state(s);
  return rng;
}

// Writes what the run saw at a non-finite step, so the failure can be reproduced, and returns the
// message for the error.
std::string dump_nonfinite(const std::string& out_dir, int64_t step, double loss, double grad_norm,
                           const ParamTable& table, const std::vector<float>& grads, const std::vector<int32_t>& ids) {
  json bad = json::array();
  for (const ParamInfo& p : table.entries())
    for (size_t i = 0; i < p.size; ++i)
      if (!std::isfinite(grads[p.offset + i])) {
        bad.push_back(p.name);
        break;
      }
  const std::string path = out_dir + "/nonfinite-step-" + std::to_string(step) + ".json";
  json dump = {{"step", step}, {"loss", std::isfinite(loss) ? json(loss) : json(std::to_string(loss))},
               {"grad_norm", std::isfinite(grad_norm) ? json(grad_norm) : json(std::to_string(grad_norm))},
               {"tensors_with_nonfinite_grad", bad}, {"input_ids", ids}};
  std::ofstream(path) << dump.dump(1) << "\n";
  return "non-finite " + std::string(std::isfinite(loss) ? "gradient" : "loss") + " at step " + std::to_string(step) +
         " (loss " + std::to_string(loss) + ", grad norm " + std::to_string(grad_norm) +
         "); stopped without updating the weights. Offending batch and tensors written to " + path +
         ". Try a lower --lr or a smaller --clip.";
}

}  // namespace

ModelConfig resolve_model_config(const std::string& preset, const std::string& config_file,
                                 const std::vector<std::string>& overrides) {
  if (preset.empty() == config_file.empty()) throw std::invalid_argument("give exactly one of --preset and --config");
  ModelConfig c;
  if (!preset.empty()) {
    c = find_preset(preset).model;
  } else {
    std::ifstream in(config_file);
    if (!in) throw std::runtime_error(config_file + ": cannot open config file");
    json j = json::parse(in, nullptr, false);
    if (j.is_discarded()) throw std::runtime_error(config_file + ": not valid JSON");
    try {
      c = model_config_from_json(j.contains("model") ? j["model"] : j);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(config_file + ": " + e.what());
    }
  }
  for (const std::string& o : overrides) apply_override(c, o);
  validate(c);
  return c;
}

TrainSummary train(const TrainOptions& o, const LogSink& log) {
  if (o.out_dir.empty()) throw std::invalid_argument("--out is required");
  fs::create_directories(o.out_dir);
  const Shard train_shard(o.data_dir + "/train.bin"), val_shard(o.data_dir + "/val.bin");
  const auto tokenizer = load_tokenizer(o.data_dir + "/tokenizer");
  for (const Shard* s : {&train_shard, &val_shard})
    if (s->header().tokenizer_fingerprint != tokenizer->fingerprint())
      throw std::runtime_error(s->path() + ": tokenized with a different tokenizer than " + o.data_dir +
                               "/tokenizer (fingerprint mismatch); re-run `muse prepare`");

  // Model config: from the checkpoint when resuming, else the preset/config plus overrides.
  std::string resume_dir;
  ModelConfig config;
  std::string preset = o.preset;
  if (o.resume && fs::exists(fs::path(o.out_dir) / "latest")) {
    resume_dir = resolve_checkpoint_dir(o.out_dir);
    const CheckpointInfo info = read_checkpoint_info(resume_dir);
    config = info.config;
    preset = info.preset;
  } else {
    config = resolve_model_config(o.preset, o.config_file, o.overrides);
    bool vocab_set = false;
    for (const std::string& s : o.overrides) vocab_set |= s.rfind("vocab_size=", 0) == 0;
    if (!vocab_set && config.vocab_size != tokenizer->vocab_size()) {
      if (preset == "tiny") {
        config.vocab_size = tokenizer->vocab_size();  // tiny takes any vocabulary (SPEC §2.11)
      } else {
        throw std::invalid_argument("the model's vocab_size is " + std::to_string(config.vocab_size) +
                                    " but the data's tokenizer (" + tokenizer->kind() + ") has " +
                                    std::to_string(tokenizer->vocab_size()) +
                                    " tokens: prepare the data with the matching tokenizer or --set vocab_size=" +
                                    std::to_string(tokenizer->vocab_size()));
      }
    }
  }
  if (config.vocab_size < tokenizer->vocab_size())
    throw std::invalid_argument("vocab_size " + std::to_string(config.vocab_size) + " is smaller than the tokenizer's " +
                                std::to_string(tokenizer->vocab_size()));
  check_token_ids(train_shard, config.vocab_size);
  check_token_ids(val_shard, config.vocab_size);

  const TrainDefaults defaults = preset.empty() ? TrainDefaults{} : find_preset(preset).train;
  const int B = o.batch > 0 ? o.batch : defaults.batch;
  const int N = o.seq > 0 ? o.seq : defaults.seq_len;
  if (o.grad_accum < 1) throw std::invalid_argument("--grad-accum must be at least 1");
  if (config.pos_embedding == PosEmbedding::learned && N > config.max_seq)
    throw std::invalid_argument("--seq " + std::to_string(N) + " exceeds max_seq = " + std::to_string(config.max_seq) +
                                " of the learned positions");
  const double lr = o.lr > 0 ? o.lr : defaults.lr;
  // The auxiliary losses of the diagnostics back-propagate through the CPU model only: `auto` picks the CPU
  // for them, an explicit `cuda` is refused.
  const bool aux_losses = o.entail_weight > 0 || o.topology_weight > 0;
  const std::string device = resolve_device(aux_losses && o.device == "auto" ? "cpu" : o.device);
  if (device == "cuda" && aux_losses)
    throw std::invalid_argument("--entail-weight and --topology-weight train on the CPU only: add --device cpu");

  Model<float> model(config);
  model.init(o.seed);
  AdamWConfig adam;
  adam.weight_decay = o.weight_decay;
  AdamW optimizer(model.table(), adam);
  Rng data_rng(o.seed ^ 0x6d7573652d646174ULL);

  int64_t step = 0, tokens_seen = 0;
  int64_t total_steps = o.steps > 0 ? o.steps : (o.time_budget_s > 0 ? 0 : 1000);
  if (!resume_dir.empty()) {
    load_params(resume_dir, model.table(), model.params().data());
    const json state = load_training_state(resume_dir, model.table(), optimizer);
    step = state.at("step").get<int64_t>();
    total_steps = o.steps > 0 ? o.steps : state.at("total_steps").get<int64_t>();
    tokens_seen = state.at("tokens_seen").get<int64_t>();
    data_rng = rng_from_json(state.at("data_rng"));
    if (state.value("threads", 0) != omp_get_max_threads())
      std::fprintf(stderr,
                   "muse train: warning: the run was started with %d threads and resumes with %d; losses will not "
                   "match an uninterrupted run bit for bit\n",
                   state.value("threads", 0), omp_get_max_threads());
  }
  LrSchedule schedule{lr, o.warmup, std::max<int64_t>(total_steps, 1), o.final_lr_fraction};

  // On the GPU the step runs there; the host model and optimizer hold the state for checkpoints and the
  // CPU-side diagnostics, refreshed from the device when those need it.
#ifdef MUSE_HAVE_CUDA
  std::unique_ptr<cuda::Training> gpu;
  if (device == "cuda") {
    gpu = std::make_unique<cuda::Training>(config, model.params().data(), adam);
    gpu->model().set_gemm_math(cuda::gemm_math_from_string(o.gpu_math));
    if (!resume_dir.empty()) gpu->upload(model.params().data(), optimizer);
  }
  auto sync_host = [&](bool with_optimizer) {
    if (gpu) gpu->download(model.params().data(), with_optimizer ? &optimizer : nullptr);
  };
#else
  auto sync_host = [](bool) {};
#endif

  // Diagnostics (SPEC §5): the first validation window, the run's pairs, and the auxiliary losses.
  const int diag_layer = resolve_layer(config, o.diagnostics_layer);
  std::vector<TokenPair> pairs;
  if (!o.pairs.empty()) pairs = tokenize_pairs(load_pairs(o.pairs, kTrainWordnetPairs, o.seed), *tokenizer);
  if (o.entail_weight > 0 && pairs.empty()) throw std::invalid_argument("--entail-weight needs --pairs");
  if (o.entail_weight < 0 || o.topology_weight < 0) throw std::invalid_argument("loss weights must be non-negative");
  const std::vector<TokenPair> diag_pairs(pairs.begin(), pairs.begin() + std::min(pairs.size(), kDiagnosticPairs));
  DiagOptions diag_options;
  diag_options.layer = diag_layer;
  diag_options.topology.margin = o.topology_margin;
  const std::vector<int32_t> diag_window = o.diagnostics_every > 0 ? window_batch(val_shard, 0, 1, N).inputs
                                                                   : std::vector<int32_t>();
  std::vector<float> aux_dh;

  const int64_t tokens_per_step = int64_t(B) * N * o.grad_accum;
  const int64_t eval_windows = o.eval_windows;
  TrainSummary summary;
  auto run_eval = [&] {
#ifdef MUSE_HAVE_CUDA
    if (gpu) return evaluate(gpu->model(), val_shard, *tokenizer, N, B, eval_windows);
#endif
    return evaluate(model, val_shard, *tokenizer, N, B, eval_windows);
  };
  auto save = [&](int64_t at_step) {
    sync_host(true);
    json state = {{"step", at_step},          {"total_steps", total_steps}, {"tokens_seen", tokens_seen},
                  {"data_rng", rng_to_json(data_rng)}, {"threads", omp_get_max_threads()}, {"device", device},
                  {"seed", o.seed},          {"batch", B},                 {"seq", N},
                  {"grad_accum", o.grad_accum}, {"lr", lr},                {"warmup", o.warmup},
                  {"data_dir", fs::absolute(o.data_dir).string()}};
    CheckpointWrite w;
    w.config = &config;
    w.preset = preset;
    w.table = &model.table();
    w.params = model.params().data();
    w.tokenizer = tokenizer.get();
    w.optimizer = &optimizer;
    w.trainer_state = &state;
    summary.checkpoint_dir = write_run_checkpoint(o.out_dir, at_step, w, o.keep_last);
  };

  if (step == 0) {
    const EvalResult e = run_eval();
    summary.first_val_loss = e.loss;
    summary.first_val_bpb = e.bits_per_byte;
    log(json{{"step", 0}, {"val_loss", e.loss}, {"val_bpb", e.bits_per_byte}, {"val_tokens", e.tokens}}.dump());
  }

  const Clock::time_point start = Clock::now();
  double train_seconds = 0, window_seconds = 0;
  int64_t window_tokens = 0;
  // A time budget's schedule is fixed at step calibrate_at from the step time after step kSettleSteps (the GPU
  // runs its first step eagerly and captures the second).
  constexpr int64_t kSettleSteps = 2;
  const int64_t calibrate_at = std::max<int64_t>(kSettleSteps + 1, std::min<int64_t>(20, o.warmup));
  double settle_seconds = 0;
  ProgressBar bar("train", total_steps > 0 ? total_steps : 1, " steps");
  std::vector<float>& grads = model.grads();
  while (true) {
    if (total_steps > 0 && step >= total_steps) break;
    if (o.time_budget_s > 0 && train_seconds >= o.time_budget_s) break;
    const Clock::time_point t0 = Clock::now();
    const bool log_now = (step + 1) % o.log_every == 0 || step + 1 == total_steps;
    const double step_lr = schedule.at(step);
    double loss = 0, topology_loss_value = 0, entail_loss_value = 0, grad_norm = 0;
    std::vector<int32_t> last_inputs;
    json groups;
#ifdef MUSE_HAVE_CUDA
    if (gpu) {
      auto next_batch = [&] {
        Batch batch = sample_batch(train_shard, B, N, data_rng);
        last_inputs = batch.inputs;
        return batch;
      };
      const cuda::Training::StepResult r = gpu->step(next_batch, o.grad_accum, step_lr, o.clip, o.label_smoothing);
      loss = r.loss;
      grad_norm = r.grad_norm;
      // The GPU step clips on the fly and leaves the gradients as the backward wrote them.
      if (log_now || !std::isfinite(loss) || !std::isfinite(grad_norm)) gpu->download_grads(grads.data());
      if (log_now) groups = group_grad_norms(model.table(), grads);
    }
#endif
    if (device == "cpu") {
      model.zero_grads();
      for (int a = 0; a < o.grad_accum; ++a) {
        Batch batch = sample_batch(train_shard, B, N, data_rng);
        model.forward(batch.inputs.data(), B, N);
        loss += model.loss(batch.targets.data(), o.label_smoothing) / o.grad_accum;
        if (o.topology_weight > 0) {
          TopologyOptions t = diag_options.topology;
          t.seed = step_seed(o.seed, step * o.grad_accum + a, 0x746f706fULL);
          double dc = 0;
          topology_loss_value +=
              topology_loss(model, B, N, diag_layer, t, o.topology_weight / o.grad_accum, &aux_dh, &dc) / o.grad_accum;
          const ResidualGrad<float> extra{diag_layer, aux_dh.data(), dc};
          model.backward(1.0 / o.grad_accum, &extra);
        } else {
          model.backward(1.0 / o.grad_accum);
        }
        last_inputs = std::move(batch.inputs);
      }
      if (o.entail_weight > 0) {
        Rng pair_rng(step_seed(o.seed, step, 0x656e7461ULL));
        entail_loss_value = entail_loss_step(model, sample_order_pairs(pairs, kOrderPairsPerStep, pair_rng), diag_layer,
                                             diag_options.cone, o.entail_weight);
      }
      if (log_now) groups = group_grad_norms(model.table(), grads);
      grad_norm = clip_grad_norm(grads.data(), grads.size(), o.clip);
    }
    const double total_loss = loss + o.topology_weight * topology_loss_value + o.entail_weight * entail_loss_value;
    if (!std::isfinite(total_loss) || !std::isfinite(grad_norm))
      throw std::runtime_error(
          dump_nonfinite(o.out_dir, step + 1, total_loss, grad_norm, model.table(), grads, last_inputs));
    if (device == "cpu") optimizer.step(model.params().data(), grads.data(), step_lr);
    ++step;
    tokens_seen += tokens_per_step;
    const double dt = seconds_since(t0);
    train_seconds += dt;
    window_seconds += dt;
    window_tokens += tokens_per_step;

    // A time budget fixes the schedule's length once the step time is known (before the cosine starts).
    if (step == kSettleSteps) settle_seconds = train_seconds;
    if (total_steps == 0 && step == calibrate_at) {
      total_steps = steps_for_budget(o.time_budget_s, step, train_seconds, kSettleSteps, settle_seconds);
      schedule.total_steps = total_steps;
      bar = ProgressBar("train", total_steps, " steps");
    }
    bar.update(step, "loss " + std::to_string(loss).substr(0, 6));

    const bool last = (total_steps > 0 && step >= total_steps) ||
                      (o.time_budget_s > 0 && train_seconds >= o.time_budget_s);
    const bool eval_now = step % o.eval_every == 0 || last;
    const bool diag_now = o.diagnostics_every > 0 && (step % o.diagnostics_every == 0 || last);
    if (log_now || eval_now || diag_now || last) {
      json line = {{"step", step},
                   {"loss", loss},
                   {"lr", step_lr},
                   {"grad_norm", grad_norm},
                   {"tokens_per_s", window_seconds > 0 ? double(window_tokens) / window_seconds : 0.0},
                   {"tokens", tokens_seen},
                   {"elapsed_s", seconds_since(start)}};
      if (!groups.is_null()) line["grad_norm_groups"] = groups;
      if (o.topology_weight > 0) line["topology_loss"] = topology_loss_value;
      if (o.entail_weight > 0) line["entail_loss"] = entail_loss_value;
      if (diag_now) {
        // Measured with the weights just updated, outside the step timing; the forward it runs only
        // replaces activations, which the next step recomputes.
        const Clock::time_point d0 = Clock::now();
        sync_host(false);
        DiagReport report = diagnose(model, {diag_window}, diag_pairs, diag_options);
        if (!diag_pairs.empty()) report.pair_source = o.pairs;
        line["diagnostics"] = to_json(report);
        line["diagnostics"]["seconds"] = seconds_since(d0);
      }
      if (eval_now) {
        const EvalResult e = run_eval();
        line["val_loss"] = e.loss;
        line["val_bpb"] = e.bits_per_byte;
        summary.last_val_loss = e.loss;
        summary.last_val_bpb = e.bits_per_byte;
      }
      log(line.dump());
      window_seconds = 0;
      window_tokens = 0;
    }
    if (step % o.checkpoint_every == 0 || last) save(step);
    if (last) break;
  }
  bar.finish();
  if (summary.checkpoint_dir.empty()) save(step);
  summary.steps = step;
  summary.tokens_per_s = train_seconds > 0 ? double(tokens_seen) / train_seconds : 0;
  return summary;
}

}  // namespace muse
