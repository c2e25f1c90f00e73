#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "cli/device_flags.h"
#include "train/trainer.h"

namespace muse::cli {

void add_train_command(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  CLI::App* cmd = app.add_subcommand("train", "Train a model from scratch or resume a run");
  cmd->add_option("--preset,-p", o->preset, "Preset: phase7-small, phase7-medium, phase8-small, phase8-medium, demo, tiny");
  cmd->add_option("--config,-c", o->config_file, "JSON model config (instead of --preset)")->check(CLI::ExistingFile);
  cmd->add_option("--set", o->overrides, "Override a config field, e.g. --set window=32 (repeatable)");
  cmd->add_option("--data,-d", o->data_dir, "Directory made by `muse prepare`")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--out,-o", o->out_dir, "Run directory (checkpoints/, latest)")->required();
  cmd->add_option("--steps", o->steps, "Optimizer steps (default 1000, or what the time budget allows)");
  cmd->add_option("--time-budget", o->time_budget_s, "Stop after this many seconds of training");
  cmd->add_option("--batch,-b", o->batch, "Sequences per micro-batch (default: the preset's)");
  cmd->add_option("--seq,-n", o->seq, "Tokens per sequence (default: the preset's)");
  cmd->add_option("--grad-accum", o->grad_accum, "Micro-batches per optimizer step")->capture_default_str();
  cmd->add_option("--lr", o->lr, "Peak learning rate (default: the preset's)");
  cmd->add_option("--warmup", o->warmup, "Warmup steps")->capture_default_str();
  cmd->add_option("--final-lr-fraction", o->final_lr_fraction, "Cosine floor as a fraction of the peak")
      ->capture_default_str();
  cmd->add_option("--weight-decay", o->weight_decay, "AdamW weight decay (2-D weights only)")->capture_default_str();
  cmd->add_option("--clip", o->clip, "Global grad-norm clip (0: off)")->capture_default_str();
  cmd->add_option("--label-smoothing", o->label_smoothing, "Label smoothing")->capture_default_str();
  cmd->add_option("--eval-every", o->eval_every, "Evaluate every K steps")->capture_default_str();
  cmd->add_option("--eval-windows", o->eval_windows, "Validation windows per evaluation")->capture_default_str();
  cmd->add_option("--checkpoint-every", o->checkpoint_every, "Checkpoint every K steps")->capture_default_str();
  cmd->add_option("--keep-last", o->keep_last, "Checkpoints to keep (0: all)")->capture_default_str();
  cmd->add_option("--log-every", o->log_every, "Log a JSON line every K steps")->capture_default_str();
  cmd->add_option("--seed", o->seed, "Seed for initialisation and data order")->capture_default_str();
  cmd->add_flag("--resume", o->resume, "Continue the run in --out from its latest checkpoint");
  cmd->add_option("--diagnostics-every", o->diagnostics_every,
                  "Log entailment-cone and persistent-homology diagnostics of the first validation window every K "
                  "steps (0: never; see muse diagnose)")
      ->capture_default_str();
  cmd->add_option("--diagnostics-layer", o->diagnostics_layer,
                  "Block whose residual the diagnostics and their losses read (-1: the last)")
      ->capture_default_str();
  cmd->add_option("--pairs", o->pairs,
                  "Phrase pairs for the diagnostics and the order loss: a file of \"premise<TAB>hypothesis[<TAB>label]\" "
                  "lines, or \"wordnet\"");
  cmd->add_option("--entail-weight", o->entail_weight,
                  "Weight of the entailment-cone max-margin order loss on --pairs (logged as entail_loss)")
      ->capture_default_str();
  cmd->add_option("--topology-weight", o->topology_weight,
                  "Weight of the H0 regulariser sum(relu(MST edge - margin)) on each training row (logged as "
                  "topology_loss)")
      ->capture_default_str();
  cmd->add_option("--topology-margin", o->topology_margin, "Margin of the H0 regulariser (Poincare distance)")
      ->capture_default_str();
  o->device = "auto";
  add_device_flag(cmd, o->device,
                  "the GPU when this build has CUDA and one is visible, else the CPU; auto stays on the CPU when\n"
                  "--entail-weight or --topology-weight is on, which need the CPU model");
  add_gpu_math_flag(cmd, o->gpu_math);
  cmd->callback([o] {
    if (o->preset.empty() && o->config_file.empty() && !o->resume)
      throw std::invalid_argument("give --preset NAME or --config FILE");
    const TrainSummary s = train(*o, [](const std::string& line) {
      std::printf("%s\n", line.c_str());
      std::fflush(stdout);
    });
    std::fprintf(stderr,
                 "trained %lld steps at %.0f tokens/s; validation bits/byte %.3f -> %.3f (loss %.3f -> %.3f)\n"
                 "checkpoint: %s\n",
                 (long long)s.steps, s.tokens_per_s, s.first_val_bpb, s.last_val_bpb, s.first_val_loss, s.last_val_loss,
                 s.checkpoint_dir.c_str());
  });
}

}  // namespace muse::cli
