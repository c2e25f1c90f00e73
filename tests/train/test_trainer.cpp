#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "data/prepare.h"
#include "io/safetensors.h"
#include "support/train_fixture.h"
#include "tokenizer/byte_tokenizer.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace muse::test {

namespace fs = std::filesystem;

namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST(train_resume, continues_bit_exactly) {
  TempDir dir("resume");
  prepare_small_corpus(dir);
  std::vector<std::string> full_log, resumed_log;
  train(tiny_run(dir, "full"), [&](const std::string& l) { full_log.push_back(l); });
  const std::vector<double> full = losses_of(full_log);
  ASSERT_EQ(full.size(), 6u);

  // Simulate a crash after step 3: a run directory whose latest checkpoint is step 3.
  fs::create_directories(dir.path / "crashed" / "checkpoints");
  fs::copy(dir.path / "full" / "checkpoints" / "step-00000003", dir.path / "crashed" / "checkpoints" / "step-00000003",
           fs::copy_options::recursive);
  std::ofstream(dir.str("crashed/latest")) << "checkpoints/step-00000003\n";
  TrainOptions resume = tiny_run(dir, "crashed");
  resume.resume = true;
  train(resume, [&](const std::string& l) { resumed_log.push_back(l); });
  const std::vector<double> resumed = losses_of(resumed_log);
  ASSERT_EQ(resumed.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(resumed[i], full[3 + i]) << "step " << 4 + i;
  EXPECT_LT(full.back(), full.front());  // it learns something in six steps
}

TEST(train_checkpoint, refuses_truncated_misshapen_and_unknown_tensors) {
  TempDir dir("ckpt");
  prepare_small_corpus(dir);
  TrainOptions o = tiny_run(dir, "run");
  o.steps = 1;
  train(o, [](const std::string&) {});
  const std::string ckpt = resolve_checkpoint_dir(dir.str("run"));
  const std::string weights = ckpt + "/model.safetensors";
  LoadedModel good = load_model(dir.str("run"));
  EXPECT_EQ(good.info.preset, "tiny");

  // Wrong shape: rewrite the file with one tensor transposed-shaped.
  SafetensorsContents c = read_safetensors(weights);
  std::vector<TensorRef> refs;
  for (auto& [name, t] : c.tensors) refs.push_back({name, t.shape, t.data.data()});
  auto bad_shape = refs;
  bad_shape[0].shape = {1, numel(bad_shape[0].shape)};
  write_safetensors(weights, bad_shape);
  EXPECT_NE(error_of([&] { load_model(ckpt); }).find("has shape"), std::string::npos) << error_of([&] { load_model(ckpt); });

  auto extra = refs;
  const float one = 1.f;
  extra.push_back({"blocks.9.attn.w_q", {1}, &one});
  write_safetensors(weights, extra);
  EXPECT_NE(error_of([&] { load_model(ckpt); }).find("unknown tensor 'blocks.9.attn.w_q'"), std::string::npos);

  auto missing = refs;
  missing.pop_back();
  write_safetensors(weights, missing);
  EXPECT_NE(error_of([&] { load_model(ckpt); }).find("is missing"), std::string::npos);

  write_safetensors(weights, refs);
  fs::resize_file(weights, fs::file_size(weights) - 10);
  EXPECT_NE(error_of([&] { load_model(ckpt); }).find("truncated"), std::string::npos);
}

TEST(train_checkpoint, atomic_write_replaces_and_leaves_no_temporaries) {
  TempDir dir("atomic");
  write_file_atomic(dir.str("latest"), "a\n");
  write_file_atomic(dir.str("latest"), "b\n");
  std::ifstream in(dir.str("latest"));
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "b");
  int files = 0;
  for (auto& e : fs::directory_iterator(dir.path)) files += e.is_regular_file();
  EXPECT_EQ(files, 1);
}

TEST(train_data, tokenizer_and_vocabulary_mismatches_are_refused) {
  TempDir dir("mismatch");
  prepare_small_corpus(dir);
  TrainOptions o = tiny_run(dir, "run");
  o.preset = "phase8-small";  // vocabulary 50257 against byte-level data
  EXPECT_NE(error_of([&] { train(o, [](const std::string&) {}); }).find("vocab_size"), std::string::npos);
  o.preset = "tiny";
  o.overrides = {"windw=3"};
  EXPECT_NE(error_of([&] { train(o, [](const std::string&) {}); }).find("unknown field 'windw'"), std::string::npos);
}

TEST(prepare_corpus, splits_train_and_validation_and_reads_jsonl) {
  TempDir dir("prepare");
  {
    std::ofstream j(dir.str("docs.jsonl"));
    for (int i = 0; i < 400; ++i) j << nlohmann::json{{"text", "document " + std::to_string(i) + std::string(40, 'x')}}.dump() << "\n";
  }
  PrepareOptions o;
  o.inputs = {dir.str("docs.jsonl")};
  o.out_dir = dir.str("out");
  o.val_fraction = 0.25;
  const PrepareResult r = prepare_corpus(ByteTokenizer(), o);
  EXPECT_GT(r.val_tokens, 0);
  EXPECT_EQ(r.train_tokens + r.val_tokens, int64_t(read_corpus_file(dir.str("docs.jsonl")).size()));
  {
    std::ofstream j(dir.str("bad.jsonl"));
    j << "{\"text\": \"ok\"}\n{\"txt\": 1}\n";
  }
  o.inputs = {dir.str("bad.jsonl")};
  EXPECT_NE(error_of([&] { prepare_corpus(ByteTokenizer(), o); }).find("bad.jsonl:2"), std::string::npos);
}

}  // namespace muse::test
