#include "data/prepare.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "common/progress.h"
#include "data/shards.h"

namespace muse {

namespace fs = std::filesystem;

std::string read_corpus_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open input file");
  const bool jsonl = path.size() >= 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0;
  if (!jsonl) {
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
  }
  std::string text, line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("text") || !j["text"].is_string())
      throw std::runtime_error(path + ":" + std::to_string(line_no) + ": expected a JSON object with a \"text\" string");
    if (!text.empty()) text += "\n\n";
    text += j["text"].get<std::string>();
  }
  return text;
}

PrepareResult prepare_corpus(const Tokenizer& tokenizer, const PrepareOptions& o) {
  if (o.inputs.empty()) throw std::runtime_error("prepare: no input files");
  if (!(o.val_fraction > 0 && o.val_fraction < 0.5))
    throw std::runtime_error("prepare: --val-fraction must be in (0, 0.5), got " + std::to_string(o.val_fraction));
  fs::create_directories(o.out_dir);
  const int64_t period = std::max<int64_t>(2, std::llround(1.0 / o.val_fraction));

  PrepareResult result;
  std::vector<int32_t> train, val;
  ProgressBar bar("prepare", int64_t(o.inputs.size()), " files");
  for (size_t f = 0; f < o.inputs.size(); ++f) {
    const std::string text = read_corpus_file(o.inputs[f]);
    result.input_bytes += int64_t(text.size());
    const std::vector<int32_t> ids = tokenizer.encode(text);
    for (int64_t start = 0, block = 0; start < int64_t(ids.size()); start += kSplitBlock, ++block) {
      const int64_t end = std::min<int64_t>(start + kSplitBlock, ids.size());
      auto& dest = (block % period == period - 1) ? val : train;
      dest.insert(dest.end(), ids.begin() + start, ids.begin() + end);
    }
    bar.update(int64_t(f + 1), std::to_string(train.size() + val.size()) + " tokens");
  }
  bar.finish();
  // A corpus too small to give validation a block still gets one: its last block.
  if (val.empty() && int64_t(train.size()) > 2 * kSplitBlock) {
    val.assign(train.end() - kSplitBlock, train.end());
    train.resize(train.size() - kSplitBlock);
  }
  if (train.empty() || val.empty())
    throw std::runtime_error("prepare: the corpus gives " + std::to_string(train.size() + val.size()) +
                             " tokens, too few for a train/validation split (need more than " +
                             std::to_string(2 * kSplitBlock) + ")");

  const uint32_t vocab = uint32_t(tokenizer.vocab_size());
  write_shard(o.out_dir + "/train.bin", train, vocab, tokenizer.fingerprint());
  write_shard(o.out_dir + "/val.bin", val, vocab, tokenizer.fingerprint());
  fs::create_directories(o.out_dir + "/tokenizer");
  tokenizer.save(o.out_dir + "/tokenizer");
  result.train_tokens = int64_t(train.size());
  result.val_tokens = int64_t(val.size());

  nlohmann::json meta = {{"tokenizer", tokenizer.kind()},
                         {"tokenizer_fingerprint", tokenizer.fingerprint()},
                         {"vocab_size", vocab},
                         {"inputs", o.inputs},
                         {"input_bytes", result.input_bytes},
                         {"train_tokens", result.train_tokens},
                         {"val_tokens", result.val_tokens},
                         {"val_fraction", o.val_fraction}};
  std::ofstream(o.out_dir + "/meta.json") << meta.dump(2) << "\n";
  return result;
}

}  // namespace muse
