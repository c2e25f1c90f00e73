// The training loop (SPEC §3): AdamW with warmup + cosine, grad-norm clipping, gradient accumulation,
// evaluation before the first step, periodically and after the last, atomic checkpoints with
// keep-last-k, bit-exact resume on the CPU, a step count or a time budget, a progress bar on a
// terminal and one JSON line per log step on stdout.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/config.h"

namespace muse {

struct TrainOptions {
  std::string preset;                  // a preset name, or
  std::string config_file;             // a JSON config ({"model": {...}} or the bare model object)
  std::vector<std::string> overrides;  // --set key=value
  std::string data_dir;
  std::string out_dir;
  int64_t steps = 0;                   // optimizer steps (0: derived from the time budget, else 1000)
  double time_budget_s = 0;            // stop after this many seconds of training (0: no budget)
  int batch = 0, seq = 0;              // 0: the preset's defaults
  int grad_accum = 1;                  // micro-batches per optimizer step
  double lr = 0;                       // 0: the preset's default
  double final_lr_fraction = 0.1;
  int64_t warmup = 100;
  double weight_decay = 0.1;
  double clip = 1.0;
  double label_smoothing = 0.0;
  int64_t eval_every = 100;
  int64_t eval_windows = 64;           // validation windows per evaluation
  int64_t checkpoint_every = 500;
  int keep_last = 3;
  int64_t log_every = 10;
  uint64_t seed = 1337;
  bool resume = false;
  std::string device = "cpu";          // cpu, cuda or auto (common/device.h)
  std::string gpu_math = "bf16";       // GEMMs on the GPU: bf16 or tf32 (tensor cores) or fp32 (the reference mode)
  // Phase 8 diagnostics and their optional losses (SPEC §5, diag/diagnose.h).
  int64_t diagnostics_every = 0;  // measure the first validation window every K steps (0: never)
  int diagnostics_layer = -1;     // block whose residual is measured and regularised (−1: the last)
  std::string pairs;              // phrase pairs: a pair file or "wordnet" (measured; the order loss's data)
  double entail_weight = 0;       // weight of the cone order loss on `pairs` (0: off)
  double topology_weight = 0;     // weight of the H0 regulariser on each training row (0: off)
  double topology_margin = 0.5;   // the regulariser's ph_margin (Poincaré distance)
};

// One JSON object per line of the training log (also printed on stdout).
using LogSink = std::function<void(const std::string& json_line)>;

struct TrainSummary {
  int64_t steps = 0;
  double first_val_loss = 0, last_val_loss = 0;
  double first_val_bpb = 0, last_val_bpb = 0;
  double tokens_per_s = 0;
  std::string checkpoint_dir;
};

// Throws std::runtime_error / std::invalid_argument with a message naming the bad input.
TrainSummary train(const TrainOptions& options, const LogSink& log);

// The model config a run uses: preset or config file, then the overrides, then validation.
ModelConfig resolve_model_config(const std::string& preset, const std::string& config_file,
                                 const std::vector<std::string>& overrides);

}  // namespace muse
