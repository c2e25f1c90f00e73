// Checkpoints (SPEC §1): a directory with model.safetensors (fp32 parameters), config.json (model
// config, preset, muse version), tokenizer/ and, for training checkpoints, optimizer.safetensors and
// trainer.json. Written atomically: everything goes into a temporary sibling directory, is fsynced, and
// the directory is renamed into place, so a crash mid-write leaves the previous checkpoint intact.
//
// A training run directory holds checkpoints/step-NNNNNNNN/ and a file `latest` naming the newest one;
// commands that take --model accept either a checkpoint directory or a run directory.
#pragma once
#include <nlohmann/json.hpp>

#include <string>

#include "model/config.h"
#include "model/model.h"
#include "model/params.h"
#include "tokenizer/tokenizer.h"
#include "train/optimizer.h"

namespace muse {

struct CheckpointWrite {
  const ModelConfig* config = nullptr;
  std::string preset;                         // preset the config came from ("" for a custom config)
  const ParamTable* table = nullptr;
  const float* params = nullptr;
  const Tokenizer* tokenizer = nullptr;
  const AdamW* optimizer = nullptr;           // optional: training checkpoints
  const nlohmann::json* trainer_state = nullptr;
};

void write_checkpoint(const std::string& dir, const CheckpointWrite& contents);

// Writes run_dir/checkpoints/step-<step> and points run_dir/latest at it; keeps the newest keep_last
// checkpoints (0 = all). Returns the checkpoint directory.
std::string write_run_checkpoint(const std::string& run_dir, int64_t step, const CheckpointWrite& contents,
                                 int keep_last);

// A checkpoint directory for `path`: itself when it holds config.json, else the one its `latest` names.
std::string resolve_checkpoint_dir(const std::string& path);

struct CheckpointInfo {
  ModelConfig config;
  std::string preset;
  std::string muse_version;
  nlohmann::json chat_template;  // null when config.json has none (infer/chat_template.h)
};
CheckpointInfo read_checkpoint_info(const std::string& dir);

// Loads model.safetensors into params (table.total() floats), refusing missing, unknown or mis-shaped
// tensors with a message naming them.
void load_params(const std::string& dir, const ParamTable& table, float* params);
// Loads optimizer moments and step count; returns trainer.json.
nlohmann::json load_training_state(const std::string& dir, const ParamTable& table, AdamW& optimizer);

// Loads a checkpoint (or a run directory's latest) for inference: the model with its parameters, its
// tokenizer, and what config.json says.
struct LoadedModel {
  Model<float> model;
  std::unique_ptr<Tokenizer> tokenizer;
  CheckpointInfo info;
  std::string dir;
  nlohmann::json trainer_state;  // empty object when the checkpoint has no trainer.json
};
LoadedModel load_model(const std::string& path);

// Writes a small file atomically (temp file, fsync, rename).
void write_file_atomic(const std::string& path, const std::string& contents);

}  // namespace muse
