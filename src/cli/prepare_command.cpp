#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "data/prepare.h"

namespace muse::cli {

void add_prepare_command(CLI::App& app) {
  auto options = std::make_shared<PrepareOptions>();
  auto tokenizer_spec = std::make_shared<std::string>("byte");
  CLI::App* cmd = app.add_subcommand("prepare", "Tokenize text/JSONL files into train/val token shards");
  cmd->add_option("--input,-i", options->inputs, "Text files (.jsonl: the \"text\" field of each line)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--out,-o", options->out_dir, "Output directory (train.bin, val.bin, tokenizer/, meta.json)")
      ->required();
  cmd->add_option("--tokenizer,-t", *tokenizer_spec, "Tokenizer: byte, gpt2 (GPT-2 BPE), gpt2:DIR, spm:MODEL_PATH (SentencePiece), or a saved tokenizer/ folder")->capture_default_str();
  cmd->add_option("--val-fraction", options->val_fraction, "Share of the tokens held out for validation")
      ->capture_default_str();
  cmd->callback([options, tokenizer_spec] {
    const auto tokenizer = make_tokenizer(*tokenizer_spec);
    const PrepareResult r = prepare_corpus(*tokenizer, *options);
    std::printf("prepared %s: %lld bytes -> %lld train + %lld val tokens (tokenizer %s)\n", options->out_dir.c_str(),
                (long long)r.input_bytes, (long long)r.train_tokens, (long long)r.val_tokens,
                tokenizer->kind().c_str());
  });
}

}  // namespace muse::cli
