// A small training setup shared by the CPU and GPU trainer tests: a scratch directory, a ~40 KB byte-level
// corpus prepared in it, a six-step `tiny` run, and the losses of a run's JSON log.
#pragma once
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/prepare.h"
#include "support/temp_dir.h"
#include "tokenizer/byte_tokenizer.h"
#include "train/trainer.h"

namespace muse::test {

namespace fs = std::filesystem;

// ~40 KB of varied text, prepared with the byte tokenizer.
inline void prepare_small_corpus(const TempDir& dir) {
  std::ofstream text(dir.str("corpus.txt"));
  for (int i = 0; i < 900; ++i)
    text << "Line " << i << ": the quick brown fox jumps over the lazy dog " << (i * 7919 % 1000) << ".\n";
  text.close();
  PrepareOptions o;
  o.inputs = {dir.str("corpus.txt")};
  o.out_dir = dir.str("data");
  o.val_fraction = 0.1;
  prepare_corpus(ByteTokenizer(), o);
}

inline TrainOptions tiny_run(const TempDir& dir, const std::string& out) {
  TrainOptions o;
  o.preset = "tiny";
  o.data_dir = dir.str("data");
  o.out_dir = dir.str(out);
  o.steps = 6;
  o.batch = 2;
  o.seq = 32;
  o.warmup = 2;
  o.log_every = 1;
  o.eval_every = 1000;
  o.eval_windows = 4;
  o.checkpoint_every = 3;
  o.keep_last = 0;
  return o;
}

inline std::vector<double> losses_of(const std::vector<std::string>& lines) {
  std::vector<double> out;
  for (const std::string& l : lines) {
    const auto j = nlohmann::json::parse(l);
    if (j.contains("loss")) out.push_back(j["loss"].get<double>());
  }
  return out;
}

}  // namespace muse::test
