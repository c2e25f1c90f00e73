// Recurrent decoding (SPEC §4): prefill + token-by-token decode against one full forward of the same
// sequence, snapshot/restore, batched streams, position limits and the size of the state.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "infer/decoder.h"
#include "model/model.h"
#include "support/decoder_checks.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

constexpr int kWindow = 4;

// A small model of each architecture; Phase 7 keeps its learned positions (max_seq covers the tests).
ModelConfig small_config(Arch arch, AttnMode mode) {
  ModelConfig c = find_preset("tiny").model;
  c.arch = arch;
  c.attn_mode = mode;
  c.d_model = 16;
  c.n_heads = 2;
  c.vocab_size = 37;
  c.embedding = EmbeddingKind::htt;
  c.htt_rank = 3;
  c.ssm_rank = 6;
  c.window = kWindow;
  c.ffn_rank = 4;
  c.max_seq = 64;
  if (arch == Arch::phase7) {
    c.ffn = FfnKind::none;
    c.pos_embedding = PosEmbedding::learned;
  }
  if (arch == Arch::gpt) c.ffn = FfnKind::dense;
  return c;
}

// Largest |decode − forward| over the real vocabulary, relative to the logit scale max(1, max |logit|).
template <typename T>
double relative_error(const T* decoded, const T* forward, int V, double scale) {
  double worst = 0;
  for (int v = 0; v < V; ++v) worst = std::max(worst, std::abs(double(decoded[v]) - double(forward[v])));
  return worst / std::max(1.0, scale);
}

// For each prompt length P: prefill P tokens, then decode the rest of the sequence one token at a time;
// the logits at every position must match the full forward's within tol (relative to the logit scale).
template <typename T>
void expect_decode_equals_forward(const ModelConfig& c, const std::vector<int>& prompt_lengths, int total, double tol,
                                  uint64_t seed) {
  Model<T> model = make_model<T>(c, seed);
  Rng rng(seed + 2);
  const std::vector<int32_t> ids = random_ids(total, c.vocab_size, rng);
  model.forward(ids.data(), 1, total);
  const int Vp = c.padded_vocab();
  const std::vector<T> full(model.logits(), model.logits() + size_t(total) * Vp);
  double scale = 0;
  for (int t = 0; t < total; ++t)
    for (int v = 0; v < c.vocab_size; ++v) scale = std::max(scale, std::abs(double(full[size_t(t) * Vp + v])));

  Decoder<T> decoder(model);
  for (int P : prompt_lengths) {
    SCOPED_TRACE("prompt length " + std::to_string(P));
    const T* logits = decoder.prefill(0, ids.data(), P);
    EXPECT_LE(relative_error(logits, &full[size_t(P - 1) * Vp], c.vocab_size, scale), tol) << "after the prefill";
    for (int v = c.vocab_size; v < Vp; ++v) ASSERT_EQ(logits[v], T(0)) << "padded logit " << v;
    for (int t = P; t < total; ++t) {
      logits = decoder.step(0, ids[t]);
      ASSERT_LE(relative_error(logits, &full[size_t(t) * Vp], c.vocab_size, scale), tol) << "decode step at " << t;
    }
    EXPECT_EQ(decoder.position(0), total);
  }
}

const std::vector<int> kPromptLengths = {1, kWindow - 1, kWindow, kWindow + 1, 5 * kWindow + 3};
constexpr int kTotal = 5 * kWindow + 3 + 2 * kWindow + 1;  // decoding runs well past the longest prompt

// Tolerances. float64: the decoder and the forward differ only in summation order (GEMM shapes, the
// factored head), so 1e-10 of the logit scale. float32: ~1e-4 of the logit scale covers the rounding
// of the two routes (measured ~1e-6; the HTT factored head agrees with the materialised one to 1e-5).
constexpr double kTolDouble = 1e-10;
constexpr double kTolFloat = 1e-4;

}  // namespace

TEST(decode_equals_forward, phase8_sliding) {
  expect_decode_equals_forward<double>(small_config(Arch::phase8, AttnMode::sliding), kPromptLengths, kTotal,
                                       kTolDouble, 11);
}

TEST(decode_equals_forward, phase8_block) {
  expect_decode_equals_forward<double>(small_config(Arch::phase8, AttnMode::block), kPromptLengths, kTotal, kTolDouble,
                                       12);
}

TEST(decode_equals_forward, phase7_block) {
  expect_decode_equals_forward<double>(small_config(Arch::phase7, AttnMode::block), kPromptLengths, kTotal, kTolDouble,
                                       13);
}

TEST(decode_equals_forward, phase7_sliding) {
  expect_decode_equals_forward<double>(small_config(Arch::phase7, AttnMode::sliding), kPromptLengths, kTotal,
                                       kTolDouble, 14);
}

TEST(decode_equals_forward, gpt_baseline) {
  expect_decode_equals_forward<double>(small_config(Arch::gpt, AttnMode::sliding), kPromptLengths, kTotal, kTolDouble,
                                       15);
}

// Every Phase 8 switch, the other position modes and the dense table take their own decode paths.
TEST(decode_equals_forward, phase8_ablations_positions_and_dense_embedding) {
  const std::vector<std::string> variants = {"bk_hopping=false",      "key_gate=false",      "linear_attn=false",
                                             "rank_mask=false",       "curvature_mix=false", "pos_embedding=none",
                                             "pos_embedding=learned", "embedding=dense",     "ffn=none"};
  for (const std::string& v : variants) {
    SCOPED_TRACE(v);
    ModelConfig c = small_config(Arch::phase8, AttnMode::sliding);
    apply_override(c, v);
    expect_decode_equals_forward<double>(c, {1, kWindow + 1}, 3 * kWindow, kTolDouble, 16);
  }
}

TEST(decode_equals_forward, float32_phase8_and_phase7) {
  for (auto [arch, mode] : {std::pair{Arch::phase8, AttnMode::sliding}, std::pair{Arch::phase7, AttnMode::block}}) {
    SCOPED_TRACE(to_string(arch));
    ModelConfig c = small_config(arch, mode);
    c.d_model = 32;
    c.n_heads = 4;
    c.vocab_size = 300;
    expect_decode_equals_forward<float>(c, kPromptLengths, kTotal, kTolFloat, 17);
  }
}

TEST(decode_snapshot, restore_continues_identically_twice) {
  const ModelConfig c = small_config(Arch::phase8, AttnMode::sliding);
  Model<float> model = make_model<float>(c, 21);
  Decoder<float> decoder(model);
  Rng rng(22);
  const auto prompt = random_ids(7, c.vocab_size, rng);
  decoder.prefill(0, prompt.data(), int(prompt.size()));
  const DecodeState<float> saved = decoder.snapshot(0);
  const auto continuation = random_ids(3 * kWindow, c.vocab_size, rng);
  auto run = [&] {
    std::vector<float> all;
    for (int32_t id : continuation) {
      const float* logits = decoder.step(0, id);
      all.insert(all.end(), logits, logits + c.padded_vocab());
    }
    return all;
  };
  const std::vector<float> first = run();
  decoder.restore(0, saved);
  EXPECT_EQ(decoder.position(0), 7);
  const std::vector<float> second = run();
  decoder.restore(0, saved);
  const std::vector<float> third = run();
  EXPECT_EQ(first, second);  // bit-identical: the state is the whole story
  EXPECT_EQ(first, third);
}

TEST(decode_batched, streams_match_separate_decoding) {
  for (Arch arch : {Arch::phase8, Arch::gpt}) {
    SCOPED_TRACE(to_string(arch));
    const ModelConfig c = small_config(arch, AttnMode::sliding);
    Model<double> model = make_model<double>(c, 31);
    Rng rng(32);
    const int streams = 3, steps = 2 * kWindow;
    const std::vector<int> prompt_lengths = {1, kWindow + 2, 3 * kWindow};
    std::vector<std::vector<int32_t>> prompts, tokens;
    for (int s = 0; s < streams; ++s) {
      prompts.push_back(random_ids(prompt_lengths[s], c.vocab_size, rng));
      tokens.push_back(random_ids(steps, c.vocab_size, rng));
    }
    Decoder<double> batched(model, streams);
    for (int s = 0; s < streams; ++s) batched.prefill(s, prompts[s].data(), prompt_lengths[s]);
    std::vector<std::vector<double>> together(streams);
    for (int t = 0; t < steps; ++t) {
      std::vector<int32_t> step_tokens;
      for (int s = 0; s < streams; ++s) step_tokens.push_back(tokens[s][t]);
      const double* logits = batched.step(step_tokens.data());
      for (int s = 0; s < streams; ++s)
        together[s].insert(together[s].end(), logits + size_t(s) * c.padded_vocab(),
                           logits + size_t(s + 1) * c.padded_vocab());
    }
    // A subset of streams steps on its own while the others wait.
    const int only = 1;
    const int32_t extra = 5;
    const double* subset = batched.step(&only, &extra, 1);
    const std::vector<double> subset_logits(subset, subset + c.padded_vocab());
    EXPECT_EQ(batched.position(0), prompt_lengths[0] + steps);
    EXPECT_EQ(batched.position(1), prompt_lengths[1] + steps + 1);

    for (int s = 0; s < streams; ++s) {
      Decoder<double> alone(model);
      alone.prefill(0, prompts[s].data(), prompt_lengths[s]);
      for (int t = 0; t < steps; ++t) {
        const double* logits = alone.step(0, tokens[s][t]);
        for (int v = 0; v < c.vocab_size; ++v)
          ASSERT_NEAR(logits[v], together[s][size_t(t) * c.padded_vocab() + v], 1e-10)
              << "stream " << s << " step " << t;
      }
      if (s == only) {
        const double* logits = alone.step(0, extra);
        for (int v = 0; v < c.vocab_size; ++v) ASSERT_NEAR(logits[v], subset_logits[v], 1e-10);
      }
    }
  }
}

TEST(decode_positions, learned_positions_stop_at_max_seq_with_a_clear_error) {
  ModelConfig c = small_config(Arch::phase7, AttnMode::block);
  c.max_seq = 8;
  Model<float> model = make_model<float>(c, 41);
  Decoder<float> decoder(model);
  expect_decoding_stops_at_max_seq_8(decoder);
}

TEST(decode_positions, alibi_and_none_decode_far_past_max_seq_in_constant_state) {
  for (const char* pos : {"pos_embedding=alibi", "pos_embedding=none"}) {
    SCOPED_TRACE(pos);
    ModelConfig c = small_config(Arch::phase8, AttnMode::sliding);
    apply_override(c, pos);
    c.max_seq = 8;  // unused by these position modes
    Model<float> model = make_model<float>(c, 42);
    Decoder<float> decoder(model);
    const int32_t first = 1;
    decoder.prefill(0, &first, 1);
    size_t bytes = 0;
    for (int t = 1; t < 600; ++t) {
      const float* logits = decoder.step(0, t % c.vocab_size);
      if (t == 2 * kWindow) bytes = decoder.state_bytes(0);
      for (int v = 0; v < c.vocab_size; ++v) ASSERT_TRUE(std::isfinite(logits[v])) << "step " << t;
    }
    EXPECT_EQ(decoder.position(0), 600);
    EXPECT_EQ(decoder.state_bytes(0), bytes) << "the MUSE state must not grow with the context";
  }
}

TEST(decode_state, gpt_kv_cache_grows_with_the_context) {
  const ModelConfig c = small_config(Arch::gpt, AttnMode::sliding);
  Model<float> model = make_model<float>(c, 43);
  Decoder<float> decoder(model);
  const int32_t first = 1;
  decoder.prefill(0, &first, 1);
  const size_t before = decoder.state_bytes(0);
  decoder.step(0, 2);
  EXPECT_EQ(decoder.state_bytes(0), before + size_t(c.n_layers) * 2 * c.d_model * sizeof(float));
}

TEST(decode_errors, bad_tokens_streams_and_states_are_refused) {
  const ModelConfig c = small_config(Arch::phase8, AttnMode::sliding);
  Model<float> model = make_model<float>(c, 44);
  Decoder<float> decoder(model, 2);
  expect_bad_input_refused(decoder, c.vocab_size, DecodeState<float>{});
}

}  // namespace muse::test
