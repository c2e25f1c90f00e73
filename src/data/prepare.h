// `muse prepare`: text or JSONL files → train/val token shards plus the tokenizer and a summary.
//
// Output directory:  train.bin, val.bin (token shards, data/shards.h), tokenizer/ (the tokenizer's
// files), meta.json (tokenizer kind and fingerprint, token counts, inputs).
// Split: the token stream of each file is cut into blocks of kSplitBlock tokens and every
// round(1/val_fraction)-th block goes to validation, so validation samples the whole corpus instead of
// its last pages. JSONL files contribute the "text" field of each line, documents separated by a blank
// line.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace muse {

inline constexpr int64_t kSplitBlock = 4096;

struct PrepareOptions {
  std::vector<std::string> inputs;
  std::string out_dir;
  double val_fraction = 0.02;
};

struct PrepareResult {
  int64_t input_bytes = 0;
  int64_t train_tokens = 0;
  int64_t val_tokens = 0;
};

// Throws std::runtime_error naming the file on unreadable input, malformed JSONL (with line number) or
// an empty corpus.
PrepareResult prepare_corpus(const Tokenizer& tokenizer, const PrepareOptions& options);

// Reads a text file, or the "text" fields of a .jsonl file.
std::string read_corpus_file(const std::string& path);

}  // namespace muse
