// `muse tokenizer encode|decode|train`: the tokenizers on the command line.
#include <omp.h>

#include <cstdio>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>
#include <stdexcept>

#include "cli/commands.h"
#include "tokenizer/spm_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace muse::cli {

namespace {

constexpr const char* kSpecHelp =
    "Tokenizer: byte, gpt2 (GPT-2 BPE; files from $MUSE_GPT2_DIR or scripts/setup-debian.sh), gpt2:DIR, "
    "spm:MODEL_PATH (SentencePiece), or a tokenizer/ folder saved in a checkpoint or prepared data";

// The whole input, as bytes: --file when given, else standard input.
std::string read_input(const std::string& file) {
  if (!file.empty()) return read_file_bytes(file);
  std::ios::sync_with_stdio(false);
  return std::string(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
}

// Whitespace-separated decimal token ids.
std::vector<int32_t> parse_ids(const std::string& text, const std::string& source) {
  std::vector<int32_t> ids;
  std::istringstream in(text);
  std::string word;
  while (in >> word) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(word, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != word.size() || v < 0 || v > INT32_MAX)
      throw std::invalid_argument(source + ": '" + word + "' (id number " + std::to_string(ids.size() + 1) +
                                  ") is not a token id");
    ids.push_back(int32_t(v));
  }
  return ids;
}

}  // namespace

void add_tokenizer_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand(
      "tokenizer", "Encode text to token ids, decode ids to text, or train a SentencePiece model");
  cmd->require_subcommand(1);

  struct CodecOptions {
    std::string spec = "gpt2", file;
  };
  auto enc = std::make_shared<CodecOptions>();
  CLI::App* encode = cmd->add_subcommand(
      "encode", "Print the token ids of a text (--file, else standard input; bytes taken as they are, trailing "
                "newline included) on one line, separated by spaces");
  encode->add_option("--tokenizer,-t", enc->spec, kSpecHelp)->capture_default_str();
  encode->add_option("--file,-f", enc->file, "Text file to encode (default: standard input)")->check(CLI::ExistingFile);
  encode->callback([enc] {
    const std::vector<int32_t> ids = make_tokenizer(enc->spec)->encode(read_input(enc->file));
    std::string line;
    for (size_t i = 0; i < ids.size(); ++i) line += (i ? " " : "") + std::to_string(ids[i]);
    std::printf("%s\n", line.c_str());
  });

  auto dec = std::make_shared<CodecOptions>();
  CLI::App* decode = cmd->add_subcommand(
      "decode", "Write the text of token ids (whitespace-separated, from --file, else standard input) to standard "
                "output, byte for byte");
  decode->add_option("--tokenizer,-t", dec->spec, kSpecHelp)->capture_default_str();
  decode->add_option("--file,-f", dec->file, "File of token ids (default: standard input)")->check(CLI::ExistingFile);
  decode->callback([dec] {
    const auto tokenizer = make_tokenizer(dec->spec);
    const std::string text = tokenizer->decode(parse_ids(read_input(dec->file), dec->file.empty() ? "stdin" : dec->file));
    std::fwrite(text.data(), 1, text.size(), stdout);
  });

  auto tr = std::make_shared<SpmTrainOptions>();
  tr->threads = omp_get_max_threads();
  CLI::App* train = cmd->add_subcommand(
      "train", "Train a SentencePiece model (lossless: identity normalisation, whitespace kept, byte fallback) and "
               "write DIR/spm.model; use it as --tokenizer spm:DIR/spm.model");
  train->add_option("--input,-i", tr->inputs, "Text files, one sentence per line (lines over 4192 bytes are skipped)")
      ->required()
      ->check(CLI::ExistingFile);
  train->add_option("--vocab", tr->vocab_size, "Vocabulary size, including 256 byte pieces and <unk> <s> </s>")
      ->required();
  train->add_option("--model-type", tr->model_type, "bpe or unigram")
      ->capture_default_str()
      ->check(CLI::IsMember({"bpe", "unigram"}));
  train->add_option("--out,-o", tr->out_dir, "Output directory (spm.model, spm.vocab)")->required();
  train->add_option("--character-coverage", tr->character_coverage,
                    "Share of the corpus's characters that get pieces of their own; rarer ones use byte pieces")
      ->capture_default_str()
      ->check(CLI::Range(0.9, 1.0));
  train->add_option("--threads", tr->threads, "Training threads")->capture_default_str()->check(CLI::PositiveNumber);
  train->callback([tr] {
    const std::string model = train_sentencepiece(*tr);
    std::printf("trained %s: %s model, %d pieces\n", model.c_str(), tr->model_type.c_str(),
                make_tokenizer("spm:" + model)->vocab_size());
  });
}

}  // namespace muse::cli
