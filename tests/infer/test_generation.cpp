// The generation loop: greedy decoding against the full forward, stop strings, finish reasons and the
// learned-position limit.
#include <gtest/gtest.h>

#include <algorithm>

#include "infer/generation.h"
#include "model/model.h"
#include "tokenizer/byte_tokenizer.h"

namespace muse::test {

namespace {

ModelConfig byte_model_config() {
  ModelConfig c = find_preset("tiny").model;
  c.d_model = 32;
  c.n_heads = 4;
  c.vocab_size = 256;
  c.window = 4;
  return c;
}

Model<float> byte_model() {
  Model<float> m(byte_model_config());
  m.init(5);
  Rng rng(6);
  for (auto& p : m.params()) p += float(0.05 * rng.normal());
  return m;
}

}  // namespace

TEST(decode_generate, greedy_continuation_is_the_argmax_of_full_forwards) {
  const Model<float> model = byte_model();
  Model<float> reference = byte_model();
  ByteTokenizer tokenizer;
  Decoder<float> decoder(model);
  Sampler sampler(SamplingOptions{.temperature = 0}, 256);
  std::vector<int32_t> ids = tokenizer.encode("muse ");
  const float* logits = decoder.prefill(0, ids.data(), int(ids.size()));
  const GenerationResult r = generate_tokens(decoder, 0, logits, sampler, tokenizer, 12, {}, nullptr);
  ASSERT_EQ(r.tokens.size(), 12u);
  EXPECT_EQ(r.finish, FinishReason::length);
  EXPECT_EQ(decoder.position(0), int(ids.size()) + 12);  // every sampled token was fed back
  std::string text;
  for (int32_t t : r.tokens) {
    reference.forward(ids.data(), 1, int(ids.size()));
    const float* last = reference.logits() + (ids.size() - 1) * size_t(model.config().padded_vocab());
    EXPECT_EQ(t, int32_t(std::max_element(last, last + 256) - last)) << "after " << ids.size() << " tokens";
    ids.push_back(t);
    text += tokenizer.token_bytes(t);
  }
  EXPECT_EQ(r.text, text);
}

TEST(decode_generate, stop_strings_end_the_text_before_them) {
  const Model<float> model = byte_model();
  ByteTokenizer tokenizer;
  const std::vector<int32_t> prompt = tokenizer.encode("the ");
  auto run = [&](const std::vector<std::string>& stop, int max_tokens) {
    Decoder<float> decoder(model);
    Sampler sampler(SamplingOptions{.temperature = 1.0, .seed = 3}, 256);
    const float* logits = decoder.prefill(0, prompt.data(), int(prompt.size()));
    std::string streamed;
    GenerationResult r = generate_tokens(decoder, 0, logits, sampler, tokenizer, max_tokens, stop,
                                         [&](const std::string& s) { streamed += s; });
    EXPECT_EQ(streamed, r.text);
    return r;
  };
  const GenerationResult free_run = run({}, 30);
  std::string full;
  for (int32_t t : free_run.tokens) full += tokenizer.token_bytes(t);
  ASSERT_EQ(full.size(), 30u);
  const std::string stop = full.substr(10, 3);  // spans three tokens of the byte tokenizer
  const GenerationResult stopped = run({stop}, 30);
  EXPECT_EQ(stopped.finish, FinishReason::stop);
  EXPECT_EQ(stopped.text, full.substr(0, full.find(stop)));
  EXPECT_EQ(stopped.tokens.size(), full.find(stop) + stop.size());
}

TEST(decode_generate, an_interrupt_stops_before_the_next_token) {
  const Model<float> model = byte_model();
  ByteTokenizer tokenizer;
  Decoder<float> decoder(model);
  Sampler sampler(SamplingOptions{}, 256);
  const int32_t first = 'a';
  const float* logits = decoder.prefill(0, &first, 1);
  std::atomic<bool> interrupt{true};
  const GenerationResult r = generate_tokens(decoder, 0, logits, sampler, tokenizer, 50, {}, nullptr, &interrupt);
  EXPECT_EQ(r.finish, FinishReason::interrupted);
  EXPECT_TRUE(r.tokens.empty());
}

TEST(decode_generate, learned_positions_limit_names_max_seq) {
  ModelConfig c = byte_model_config();
  c.pos_embedding = PosEmbedding::learned;
  c.max_seq = 32;
  EXPECT_NO_THROW(check_generation_length(c, 12, 20));
  try {
    check_generation_length(c, 12, 21);
    FAIL() << "12 + 21 tokens accepted with max_seq = 32";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("max_seq = 32"), std::string::npos) << e.what();
  }
  c.pos_embedding = PosEmbedding::alibi;
  EXPECT_NO_THROW(check_generation_length(c, 12, 1 << 20));
}

}  // namespace muse::test
