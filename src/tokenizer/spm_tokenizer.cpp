#include "tokenizer/spm_tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <unordered_map>

namespace muse {

SpmTokenizer::SpmTokenizer(const std::string& model_path)
    : model_bytes_(read_file_bytes(model_path)), processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  const auto status = processor_->LoadFromSerializedProto(model_bytes_);
  if (!status.ok())
    throw std::runtime_error(model_path + ": not a SentencePiece model (" + std::string(status.message()) + ")");
  fingerprint_ = fnv1a64(model_bytes_, fnv1a64("muse-tokenizer:spm:v1"));
}

SpmTokenizer::~SpmTokenizer() = default;

int SpmTokenizer::vocab_size() const { return processor_->GetPieceSize(); }

void SpmTokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= vocab_size())
    throw std::out_of_range("spm tokenizer: token id " + std::to_string(id) + " is not in [0, " +
                            std::to_string(vocab_size()) + ")");
}

std::vector<int32_t> SpmTokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  const auto status = processor_->Encode(text, &ids);
  if (!status.ok()) throw std::runtime_error("spm tokenizer: encoding failed (" + std::string(status.message()) + ")");
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string SpmTokenizer::decode(const std::vector<int32_t>& ids) const {
  for (int32_t id : ids) check_id(id);
  std::string text;
  const auto status = processor_->Decode(std::vector<int>(ids.begin(), ids.end()), &text);
  if (!status.ok()) throw std::runtime_error("spm tokenizer: decoding failed (" + std::string(status.message()) + ")");
  return text;
}

std::string SpmTokenizer::token_bytes(int32_t id) const {
  check_id(id);
  if (processor_->IsControl(id)) return "";
  const std::string& piece = processor_->IdToPiece(id);
  if (processor_->IsByte(id)) return std::string(1, char(std::stoi(piece.substr(3, 2), nullptr, 16)));  // "<0xAB>"
  if (processor_->IsUnknown(id)) return decode({id});  // the model's unknown surface, " ⁇ " by default
  static const std::string kSpaceMark = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space
  std::string bytes;
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, kSpaceMark.size(), kSpaceMark) == 0) {
      bytes += ' ';
      i += kSpaceMark.size();
    } else {
      bytes += piece[i++];
    }
  }
  return bytes;
}

void SpmTokenizer::save(const std::string& dir) const {
  std::ofstream out(dir + "/spm.model", std::ios::binary);
  out << model_bytes_;
  if (!out) throw std::runtime_error(dir + "/spm.model: write failed");
  out.close();
  write_tokenizer_json(dir, *this, {{"model", "spm.model"}});
}

std::string train_sentencepiece(const SpmTrainOptions& o) {
  if (o.inputs.empty()) throw std::invalid_argument("tokenizer train: no input files");
  if (o.model_type != "bpe" && o.model_type != "unigram")
    throw std::invalid_argument("tokenizer train: --model-type " + o.model_type + ": expected bpe or unigram");
  if (o.vocab_size < 260)
    throw std::invalid_argument("tokenizer train: --vocab " + std::to_string(o.vocab_size) +
                                " is too small (the 256 byte pieces and <unk>, <s>, </s> need 259)");
  std::string inputs;
  for (const std::string& path : o.inputs) {
    if (!std::filesystem::is_regular_file(path)) throw std::runtime_error(path + ": no such input file");
    // The library takes the inputs as one comma-separated list.
    if (path.find(',') != std::string::npos) throw std::invalid_argument(path + ": input file names cannot contain ','");
    inputs += (inputs.empty() ? "" : ",") + path;
  }
  std::filesystem::create_directories(o.out_dir);
  const std::string prefix = o.out_dir + "/spm";
  const std::unordered_map<std::string, std::string> args = {
      {"input", inputs},
      {"model_prefix", prefix},
      {"vocab_size", std::to_string(o.vocab_size)},
      {"model_type", o.model_type},
      {"character_coverage", std::to_string(o.character_coverage)},
      {"num_threads", std::to_string(std::max(1, o.threads))},
      // Lossless: every text decodes back to itself (no NFKC, spaces kept, unseen bytes as byte pieces).
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"byte_fallback", "true"},
      {"minloglevel", "1"},  // warnings and errors only
  };
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  if (!status.ok()) throw std::runtime_error("tokenizer train: " + std::string(status.message()));
  return prefix + ".model";
}

}  // namespace muse
