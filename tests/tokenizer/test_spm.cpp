#include <gtest/gtest.h>

#include <filesystem>
#include <functional>

#include "tokenizer/spm_tokenizer.h"
#include "tokenizer/tokenizer_test_support.h"

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

}  // namespace

TEST(spm_train, bpe_and_unigram_models_round_trip_any_text) {
  for (const std::string type : {"bpe", "unigram"}) {
    const SpmTokenizer spm(trained_spm_model(type));
    EXPECT_EQ(spm.kind(), "spm");
    EXPECT_EQ(spm.vocab_size(), 400) << type;
    const std::vector<int32_t> ids = spm.encode("the model learns the words");
    EXPECT_LT(ids.size(), 12u) << type << ": trained pieces should cover whole words";
    std::vector<std::string> texts = varied_corpus();  // unseen scripts and emoji go through byte pieces
    texts.push_back(training_text());
    texts.push_back("  two leading spaces, inner   runs,\ttabs\nand newlines\n\n");
    for (const std::string& text : texts) {
      const std::vector<int32_t> encoded = spm.encode(text);
      EXPECT_EQ(spm.decode(encoded), text) << type;
      // The pieces' surfaces spell the text after the dummy-prefix space the model adds.
      std::string surfaces;
      for (int32_t id : encoded) surfaces += spm.token_bytes(id);
      EXPECT_EQ(surfaces, text.empty() ? "" : " " + text) << type;
    }
  }
}

TEST(spm_save, saved_folder_loads_the_same_model) {
  ScratchDir dir("spm_save");
  const auto bpe = make_tokenizer("spm:" + trained_spm_model("bpe"));
  bpe->save(dir.str());
  EXPECT_TRUE(fs::exists(dir.str("spm.model")));
  const auto loaded = load_tokenizer(dir.str());
  EXPECT_EQ(loaded->kind(), "spm");
  EXPECT_EQ(loaded->fingerprint(), bpe->fingerprint());
  EXPECT_EQ(loaded->encode("the small models"), bpe->encode("the small models"));
  EXPECT_NE(bpe->fingerprint(), make_tokenizer("spm:" + trained_spm_model("unigram"))->fingerprint());
}

TEST(spm_errors, bad_models_ids_and_training_requests_are_refused) {
  ScratchDir dir("spm_errors");
  dir.write("bogus.model", "this is not a protobuf");
  std::string error = error_of([&] { make_tokenizer("spm:" + dir.str("bogus.model")); });
  EXPECT_NE(error.find("bogus.model: not a SentencePiece model"), std::string::npos) << error;
  EXPECT_NE(error_of([&] { make_tokenizer("spm:"); }).find("needs a model path"), std::string::npos);

  const SpmTokenizer spm(trained_spm_model("unigram"));
  EXPECT_NE(error_of([&] { spm.decode({5, 400}); }).find("400"), std::string::npos);
  EXPECT_THROW(spm.token_bytes(-1), std::out_of_range);

  dir.write("tiny.txt", "only a few words here\n");
  SpmTrainOptions o;
  o.inputs = {dir.str("tiny.txt")};
  o.out_dir = dir.str("out");
  o.vocab_size = 5000;  // far more pieces than the text has
  error = error_of([&] { train_sentencepiece(o); });
  EXPECT_NE(error.find("tokenizer train:"), std::string::npos) << error;
  EXPECT_NE(error.find("5000"), std::string::npos) << error;
  o.vocab_size = 100;
  EXPECT_NE(error_of([&] { train_sentencepiece(o); }).find("too small"), std::string::npos);
  o.vocab_size = 300;
  o.inputs = {dir.str("missing.txt")};
  EXPECT_NE(error_of([&] { train_sentencepiece(o); }).find("missing.txt: no such input file"), std::string::npos);
}

}  // namespace muse::test
