#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <functional>

#include "data/prepare.h"
#include "data/shards.h"
#include "tokenizer/byte_tokenizer.h"
#include "tokenizer/tokenizer_bench.h"
#include "tokenizer/tokenizer_test_support.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace muse::test {

namespace {

namespace fs = std::filesystem;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

// Runs a shell command; returns its standard output, failing the test on a non-zero exit.
std::string run(const std::string& command) {
  std::string output;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return output;
  char buffer[4096];
  for (size_t n; (n = fread(buffer, 1, sizeof buffer, pipe)) > 0;) output.append(buffer, n);
  EXPECT_EQ(pclose(pipe), 0) << command;
  return output;
}

// Prepares `text` with `tokenizer` into dir/`name`.
void prepare(const ScratchDir& dir, const std::string& name, const Tokenizer& tokenizer, const std::string& text) {
  dir.write(name + ".txt", text);
  PrepareOptions o;
  o.inputs = {dir.str(name + ".txt")};
  o.out_dir = dir.str(name);
  o.val_fraction = 0.1;
  prepare_corpus(tokenizer, o);
}

TrainOptions tiny_run(const ScratchDir& dir, const std::string& data, const std::string& out) {
  TrainOptions o;
  o.preset = "tiny";
  o.data_dir = dir.str(data);
  o.out_dir = dir.str(out);
  o.steps = 2;
  o.batch = 2;
  o.seq = 16;
  o.warmup = 1;
  o.eval_every = 1000;
  o.eval_windows = 2;
  o.checkpoint_every = 2;
  o.keep_last = 0;
  return o;
}

// Text long enough for a train/validation split under any of the test tokenizers.
std::string long_text() {
  std::string text;
  for (int i = 0; i < 2; ++i) text += training_text();
  return text;
}

}  // namespace

TEST(tokenizer_byte, ids_are_bytes) {
  const ByteTokenizer byte;
  const std::string text = "h\xC3\xA9\xFF\n";
  EXPECT_EQ(byte.encode(text), (std::vector<int32_t>{'h', 0xC3, 0xA9, 0xFF, '\n'}));
  EXPECT_EQ(byte.decode(byte.encode(text)), text);
  EXPECT_EQ(byte.vocab_size(), 256);
  EXPECT_NE(error_of([&] { byte.decode({256}); }).find("256"), std::string::npos);
}

TEST(tokenizer_spec, specs_and_folders_name_what_is_wrong) {
  EXPECT_EQ(make_tokenizer("byte")->kind(), "byte");
  EXPECT_NE(error_of([] { make_tokenizer("bpe"); }).find("unknown tokenizer 'bpe'"), std::string::npos);
  ScratchDir dir("spec");
  make_tokenizer("spm:" + trained_spm_model("bpe"))->save(dir.str());
  EXPECT_EQ(make_tokenizer(dir.str())->kind(), "spm");  // a saved tokenizer/ folder is a spec too

  dir.write("tokenizer.json", "{\"kind\": \"wordpiece\"}");
  EXPECT_NE(error_of([&] { load_tokenizer(dir.str()); }).find("unknown tokenizer kind 'wordpiece'"), std::string::npos);
  dir.write("tokenizer.json", "{\"kind\": \"spm\", \"model\": \"../elsewhere.model\"}");
  EXPECT_NE(error_of([&] { load_tokenizer(dir.str()); }).find("must name a file inside"), std::string::npos);
  dir.write("tokenizer.json", "not json");
  EXPECT_NE(error_of([&] { load_tokenizer(dir.str()); }).find("tokenizer.json: not a tokenizer description"),
            std::string::npos);
  fs::remove(dir.str("tokenizer.json"));
  EXPECT_NE(error_of([&] { load_tokenizer(dir.str()); }).find("missing"), std::string::npos);
}

TEST(tokenizer_fingerprint, training_refuses_shards_of_another_tokenizer) {
  ScratchDir dir("fingerprint");
  const std::string text = long_text();
  prepare(dir, "bytes", ByteTokenizer(), text);
  prepare(dir, "pieces", *make_tokenizer("spm:" + trained_spm_model("unigram")), text);

  // Shards made with the SentencePiece model next to the byte tokenizer's folder.
  fs::copy_file(dir.str("pieces/train.bin"), dir.str("bytes/train.bin"), fs::copy_options::overwrite_existing);
  std::string error = error_of([&] { train(tiny_run(dir, "bytes", "run"), [](const std::string&) {}); });
  EXPECT_NE(error.find("bytes/train.bin: tokenized with a different tokenizer"), std::string::npos) << error;
  EXPECT_NE(error.find("fingerprint mismatch"), std::string::npos) << error;

  // The other way round: the shards are right but the tokenizer folder was swapped.
  fs::remove_all(dir.str("pieces/tokenizer"));
  fs::create_directories(dir.str("pieces/tokenizer"));
  ByteTokenizer().save(dir.str("pieces/tokenizer"));
  error = error_of([&] { train(tiny_run(dir, "pieces", "run2"), [](const std::string&) {}); });
  EXPECT_NE(error.find("fingerprint mismatch"), std::string::npos) << error;
}

TEST(tokenizer_checkpoint, prepare_and_checkpoints_carry_the_tokenizer) {
  ScratchDir dir("checkpoint");
  const auto spm = make_tokenizer("spm:" + trained_spm_model("bpe"));
  prepare(dir, "data", *spm, long_text());
  const nlohmann::json meta = nlohmann::json::parse(read_file_bytes(dir.str("data/meta.json")));
  EXPECT_EQ(meta["tokenizer"], "spm");
  EXPECT_EQ(meta["tokenizer_fingerprint"].get<uint64_t>(), spm->fingerprint());
  EXPECT_EQ(Shard(dir.str("data/train.bin")).header().tokenizer_fingerprint, spm->fingerprint());

  train(tiny_run(dir, "data", "run"), [](const std::string&) {});
  const LoadedModel m = load_model(dir.str("run"));
  EXPECT_TRUE(fs::exists(m.dir + "/tokenizer/spm.model"));
  EXPECT_EQ(m.tokenizer->kind(), "spm");
  EXPECT_EQ(m.tokenizer->fingerprint(), spm->fingerprint());
  EXPECT_EQ(m.model.config().vocab_size, spm->vocab_size());
}

TEST(tokenizer_bench, reports_speed_of_a_round_tripping_tokenizer) {
  const TokenizerBenchRecord r = bench_tokenizer(ByteTokenizer(), training_text(), 0, 3);
  EXPECT_EQ(r.tokens, r.bytes);
  EXPECT_GT(r.encode_mb_per_s, 0);
  EXPECT_GT(r.decode_mb_per_s, 0);
  EXPECT_THROW(bench_tokenizer(ByteTokenizer(), "", 0, 1), std::invalid_argument);
}

TEST(tokenizer_cli, encode_then_decode_gives_back_the_bytes) {
  ScratchDir dir("cli");
  const std::string text = "Tokenizers on the command line: 42 \xF0\x9F\x98\x80 \xE6\x97\xA5\xE6\x9C\xAC  end\n";
  dir.write("in.txt", text);
  std::vector<std::string> specs = {"byte", "spm:" + trained_spm_model("unigram")};
  if (shared_gpt2() != nullptr) specs.push_back("gpt2");
  const std::string muse = MUSE_BINARY;
  for (const std::string& spec : specs) {
    const std::string ids = run(muse + " tokenizer encode --tokenizer " + spec + " --file " + dir.str("in.txt"));
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids.back(), '\n') << spec;
    EXPECT_EQ(ids.find('\n'), ids.size() - 1) << spec << ": ids on one line";
    // stdin in, stdout out, byte for byte.
    dir.write("ids.txt", ids);
    EXPECT_EQ(run(muse + " tokenizer decode -t " + spec + " < " + dir.str("ids.txt")), text) << spec;
    EXPECT_EQ(run("printf 'x' | " + muse + " tokenizer encode -t " + spec + " | " + muse + " tokenizer decode -t " + spec),
              "x")
        << spec;
  }
  const std::string gpt2_ids = shared_gpt2() ? run(muse + " tokenizer encode < /dev/null") : "\n";
  EXPECT_EQ(gpt2_ids, "\n");  // empty text, no ids
  const std::string bench = run(muse + " bench --tokenizer byte --text " + dir.str("in.txt") + " --iters 2 --json");
  EXPECT_NE(bench.find("\"encode_mb_per_s\""), std::string::npos) << bench;
  EXPECT_NE(std::system(("echo '1 x' | " + muse + " tokenizer decode -t byte 2> /dev/null").c_str()), 0);
}

}  // namespace muse::test
