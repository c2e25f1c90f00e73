// The recurrent GPU decoder (infer/cuda_decoder.h) against the CPU decoder (infer/decoder.h) and the CPU
// model's full forward, from the same parameters: every decode step after prompts of W−1, W, W+1 and 5W+3
// tokens (and 1), on the tiny preset and on variants that take every path of the kernels, and with
// LayerNorm rows whose mean dwarfs their spread; batched streams at
// different positions; graphs and overlapped launches against plain launches; the state hand-over in both
// directions.
//
// Tolerances (fp32 on both sides): logits within 1e-4 × max(1, max |logit|) of the CPU decoder's and of the
// forward's (the CPU decoder's own float test allows the same against the forward; the routes differ in
// summation order, in libm against CUDA's special functions, and in the head: CPU factored, GPU against
// the materialised E); a stream's logits in a batched step equal, bit for bit, its logits stepped alone
// (no sum depends on the other rows), and graphs and overlapped launches do not change a bit. States
// handed over agree within 1e-4 × (1 + |value|).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/rng.h"
#include "cuda/gpu_support.h"
#include "infer/cuda_decoder.h"
#include "infer/decoder.h"
#include "model/config.h"
#include "model/cuda_model.h"
#include "model/model.h"
#include "support/decoder_checks.h"
#include "support/test_util.h"

namespace muse::test {
namespace {

constexpr double kTolLogits = 1e-4;
constexpr double kTolState = 1e-4;

struct Variant {
  std::string name;
  std::vector<std::string> overrides;  // on top of the tiny preset
};

void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

ModelConfig variant_config(const std::vector<std::string>& overrides) {
  ModelConfig c = find_preset("tiny").model;
  c.vocab_size = 301;  // pads to 384: the padded logits must stay 0
  c.max_seq = 128;     // learned positions: room for every test sequence
  for (const std::string& o : overrides) apply_override(c, o);
  validate(c);
  return c;
}

// Largest |a − b| over the real vocabulary, relative to the logit scale max(1, scale).
double relative_error(const float* a, const float* b, int V, double scale) {
  double worst = 0;
  for (int v = 0; v < V; ++v) worst = std::max(worst, std::abs(double(a[v]) - double(b[v])));
  return worst / std::max(1.0, scale);
}

double max_abs(const float* x, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, double(std::abs(x[i])));
  return m;
}

void expect_padding_zero(const float* logits, const ModelConfig& c, const std::string& where) {
  for (int v = c.vocab_size; v < c.padded_vocab(); ++v)
    ASSERT_EQ(logits[v], 0.f) << where << ": padded logit " << v;
}

// For each prompt length P: prefill P tokens on both decoders, then decode the rest of `ids` one token at a
// time; every position's GPU logits must match the CPU decoder's and the full forward's.
void expect_gpu_decode_matches_cpu(const ModelConfig& c, const Model<float>& model, const std::vector<int>& prompts,
                                   const std::vector<int32_t>& ids, bool against_forward) {
  const int total = int(ids.size()), Vp = c.padded_vocab(), V = c.vocab_size;
  std::vector<float> full;
  double scale = 0;
  if (against_forward) {
    Model<float> forward_model(c);
    forward_model.params() = model.params();
    forward_model.forward(ids.data(), 1, total);
    full.assign(forward_model.logits(), forward_model.logits() + size_t(total) * Vp);
    scale = max_abs(full.data(), full.size());
  }
  Decoder<float> cpu(model);
  cuda::Decoder gpu(model);
  for (int P : prompts) {
    SCOPED_TRACE("prompt length " + std::to_string(P));
    const float* cpu_logits = cpu.prefill(0, ids.data(), P);
    gpu.prefill(0, ids.data(), P);
    const float* gpu_logits = gpu.host_logits();
    if (!against_forward) scale = std::max(scale, max_abs(cpu_logits, V));
    EXPECT_LE(relative_error(gpu_logits, cpu_logits, V, scale), kTolLogits) << "prefill against the CPU decoder";
    if (against_forward) {
      EXPECT_LE(relative_error(gpu_logits, &full[size_t(P - 1) * Vp], V, scale), kTolLogits)
          << "prefill against the forward";
    }
    expect_padding_zero(gpu_logits, c, "prefill");
    for (int t = P; t < total; ++t) {
      cpu_logits = cpu.step(0, ids[t]);
      gpu.step(0, ids[t]);
      gpu_logits = gpu.host_logits();
      ASSERT_LE(relative_error(gpu_logits, cpu_logits, V, scale), kTolLogits) << "step at position " << t;
      if (against_forward) {
        ASSERT_LE(relative_error(gpu_logits, &full[size_t(t) * Vp], V, scale), kTolLogits)
            << "step at position " << t << " against the forward";
      }
      expect_padding_zero(gpu_logits, c, "step at position " + std::to_string(t));
    }
    EXPECT_EQ(gpu.position(0), total);
  }
}

// Every switch the CPU decoder handles, and widths that take the kernels' scalar (non-float4) paths.
const std::vector<Variant>& variants() {
  static const std::vector<Variant> v = {
      {"phase8_tiny", {}},
      {"no_bk_hopping", {"bk_hopping=false"}},
      {"no_key_gate", {"key_gate=false"}},
      {"no_linear_attn", {"linear_attn=false"}},
      {"no_rank_mask", {"rank_mask=false"}},
      {"no_curvature_mix", {"curvature_mix=false"}},
      {"no_ffn", {"ffn=none"}},
      {"learned_positions", {"pos_embedding=learned"}},
      {"no_positions", {"pos_embedding=none"}},
      {"dense_embedding", {"embedding=dense"}},
      {"block_window", {"attn_mode=block"}},
      {"phase8_every_switch_off",
       {"bk_hopping=false", "key_gate=false", "linear_attn=false", "rank_mask=false", "curvature_mix=false"}},
      {"phase7", {"arch=phase7", "attn_mode=block", "ffn=none", "pos_embedding=learned"}},
      {"phase7_sliding_lowrank_ffn", {"arch=phase7", "pos_embedding=learned"}},
      // d_h = 10, D = 30, ρ = 6: no 16-byte rows anywhere.
      {"odd_widths", {"d_model=30", "n_heads=3", "ffn_rank=6", "ssm_rank=7", "htt_rank=5"}},
  };
  return v;
}

class CudaDecoderVariants : public ::testing::TestWithParam<Variant> {};

TEST_P(CudaDecoderVariants, decode_matches_cpu_decoder_and_forward) {
  MUSE_REQUIRE_GPU();
  const ModelConfig c = variant_config(GetParam().overrides);
  const Model<float> model = make_model<float>(c, 11);
  const int W = c.window;
  Rng rng(12);
  const std::vector<int32_t> ids = random_ids(size_t(7 * W + 4), c.vocab_size, rng);  // decodes past 5W+3
  expect_gpu_decode_matches_cpu(c, model, {1, W - 1, W, W + 1, 5 * W + 3}, ids, true);
}

INSTANTIATE_TEST_SUITE_P(decode_cuda, CudaDecoderVariants, ::testing::ValuesIn(variants()),
                         [](const auto& info) { return info.param.name; });

// The decode kernels' LayerNorm takes the variance from sums shifted by the row's first element, where the
// CPU takes two passes: rows whose mean is far larger than their spread must still match. With the dense
// table (rows spread 0.02) and learned positions (0.01), every position row is offset by 8, so that the
// residual stream of every layer has a mean about 360 times its spread: an unshifted Σx²/D − mean² loses
// whole per cents of the variance there, while the CPU's own rounding of x − mean stays near 2e-5 of the
// spread. (Offsetting E instead would offset the tied head too, whose logits would then carry 8·Σh.)
TEST(decode_cuda, layernorm_rows_with_a_large_mean_match_cpu_decoder) {
  MUSE_REQUIRE_GPU();
  const ModelConfig c = variant_config({"embedding=dense", "pos_embedding=learned"});
  Model<float> model = make_model<float>(c, 13);
  const ParamInfo& positions = model.table().find("embed.positions");
  for (size_t i = 0; i < positions.size; ++i) model.params()[positions.offset + i] += 8.f;
  Rng rng(14);
  const std::vector<int32_t> ids = random_ids(size_t(2 * c.window + 3), c.vocab_size, rng);
  expect_gpu_decode_matches_cpu(c, model, {1, c.window + 1}, ids, true);
}

// The width of phase8-small (D = 512, H = 8, W = 64, V = 50257 with the HTT head) on two layers: d_h = 64,
// a vocabulary that takes many GEMV tiles per block.
TEST(decode_cuda, phase8_small_width_matches_cpu_decoder) {
  MUSE_REQUIRE_GPU();
  ModelConfig c = find_preset("phase8-small").model;
  c.n_layers = 2;
  const Model<float> model = make_model<float>(c, 21);
  const int W = c.window;
  Rng rng(22);
  const std::vector<int32_t> ids = random_ids(size_t(5 * W + 3 + 8), c.vocab_size, rng);
  expect_gpu_decode_matches_cpu(c, model, {1, W + 1, 5 * W + 3}, ids, false);
}

// Ten streams (two chunks of eight rows) at different positions step together, then a subset steps in a
// scrambled order: each stream's logits equal those it gets stepping alone, and the CPU decoder's.
TEST(decode_cuda, batched_streams_at_different_positions_match_single_streams) {
  MUSE_REQUIRE_GPU();
  const ModelConfig c = variant_config({});
  const Model<float> model = make_model<float>(c, 31);
  const int W = c.window, Vp = c.padded_vocab(), steps = W + 3;
  const std::vector<int> prompt_lengths = {1, 2, W - 1, W, W + 1, 2 * W, 3 * W + 5, 5 * W + 3, 7, 40};
  const int streams = int(prompt_lengths.size());
  Rng rng(32);
  std::vector<std::vector<int32_t>> prompts, tokens;
  for (int s = 0; s < streams; ++s) {
    prompts.push_back(random_ids(prompt_lengths[s], c.vocab_size, rng));
    tokens.push_back(random_ids(steps, c.vocab_size, rng));
  }
  const std::vector<int> subset = {7, 2, 9};
  const std::vector<int32_t> subset_tokens = {5, 17, 300};

  cuda::Decoder batched(model, streams);
  std::vector<std::vector<float>> together(streams);  // per stream: prefill row, then every step's row
  for (int s = 0; s < streams; ++s) {
    batched.prefill(s, prompts[s].data(), prompt_lengths[s]);
    const float* logits = batched.host_logits();
    together[s].assign(logits, logits + Vp);
  }
  for (int t = 0; t < steps; ++t) {
    std::vector<int32_t> step_tokens;
    for (int s = 0; s < streams; ++s) step_tokens.push_back(tokens[s][t]);
    batched.step(step_tokens.data());
    const float* logits = batched.host_logits();
    for (int s = 0; s < streams; ++s)
      together[s].insert(together[s].end(), logits + size_t(s) * Vp, logits + size_t(s + 1) * Vp);
  }
  batched.step(subset.data(), subset_tokens.data(), int(subset.size()));
  const float* subset_logits = batched.host_logits();
  const std::vector<float> subset_rows(subset_logits, subset_logits + subset.size() * Vp);
  for (int s = 0; s < streams; ++s) {
    const bool in_subset = std::find(subset.begin(), subset.end(), s) != subset.end();
    EXPECT_EQ(batched.position(s), prompt_lengths[s] + steps + (in_subset ? 1 : 0)) << "stream " << s;
  }

  for (int s = 0; s < streams; ++s) {
    SCOPED_TRACE("stream " + std::to_string(s));
    cuda::Decoder alone(model);
    Decoder<float> cpu(model);
    std::vector<float> alone_rows;
    alone.prefill(0, prompts[s].data(), prompt_lengths[s]);
    const float* cpu_logits = cpu.prefill(0, prompts[s].data(), prompt_lengths[s]);
    const float* logits = alone.host_logits();
    const double scale = max_abs(cpu_logits, c.vocab_size);
    EXPECT_LE(relative_error(logits, cpu_logits, c.vocab_size, scale), kTolLogits) << "prefill";
    alone_rows.assign(logits, logits + Vp);
    for (int t = 0; t < steps; ++t) {
      alone.step(0, tokens[s][t]);
      cpu_logits = cpu.step(0, tokens[s][t]);
      logits = alone.host_logits();
      ASSERT_LE(relative_error(logits, cpu_logits, c.vocab_size, scale), kTolLogits) << "step " << t;
      alone_rows.insert(alone_rows.end(), logits, logits + Vp);
    }
    EXPECT_EQ(alone_rows, together[s]) << "batched logits differ from the stream's own";
    const auto it = std::find(subset.begin(), subset.end(), s);
    if (it != subset.end()) {
      const size_t row = size_t(it - subset.begin());
      alone.step(0, subset_tokens[row]);
      logits = alone.host_logits();
      EXPECT_EQ(std::vector<float>(logits, logits + Vp),
                std::vector<float>(subset_rows.begin() + row * Vp, subset_rows.begin() + (row + 1) * Vp))
          << "subset step";
    }
  }
}

// The same prompts and steps with graphs on or off and launches overlapped or not: bit-identical logits.
// Steps alternate between both streams and one, so each run captures (or replays) two step shapes.
TEST(decode_cuda, graphs_and_overlapped_launches_give_the_plain_launches_logits) {
  MUSE_REQUIRE_GPU();
  const ModelConfig c = variant_config({});
  const Model<float> model = make_model<float>(c, 41);
  const int W = c.window, Vp = c.padded_vocab();
  Rng rng(42);
  const std::vector<int32_t> prompt_a = random_ids(W + 3, c.vocab_size, rng), prompt_b = random_ids(5, c.vocab_size, rng);
  const std::vector<int32_t> tokens = random_ids(size_t(4 * W), c.vocab_size, rng);
  auto run = [&](bool graphs, bool overlap) {
    cuda::Decoder decoder(model, 2);
    decoder.set_graphs(graphs);
    decoder.set_overlapped_launches(overlap);
    std::vector<float> all;
    decoder.prefill(0, prompt_a.data(), int(prompt_a.size()));
    decoder.prefill(1, prompt_b.data(), int(prompt_b.size()));
    for (size_t t = 0; t + 1 < tokens.size(); t += 2) {
      if (t % 4 == 0) {
        decoder.step(tokens.data() + t);  // both streams
        const float* logits = decoder.host_logits();
        all.insert(all.end(), logits, logits + 2 * size_t(Vp));
      } else {
        decoder.step(1, tokens[t]);
        const float* logits = decoder.host_logits();
        all.insert(all.end(), logits, logits + Vp);
      }
    }
    return all;
  };
  const std::vector<float> plain = run(false, false);
  EXPECT_EQ(run(true, false), plain) << "graphs";
  EXPECT_EQ(run(false, true), plain) << "overlapped launches";
  EXPECT_EQ(run(true, true), plain) << "graphs with overlapped launches";
}

// Compares two states of the same model (ring in logical order: oldest key first).
void expect_states_close(const DecodeState<float>& a, const DecodeState<float>& b, const ModelConfig& c) {
  ASSERT_EQ(a.position, b.position);
  ASSERT_EQ(a.layers.size(), b.layers.size());
  const int W = c.window, D = c.d_model, H = c.n_heads;
  auto close = [](float x, float y) { return std::abs(double(x) - double(y)) <= kTolState * (1 + std::abs(double(y))); };
  auto expect_all_close = [&](const std::vector<float>& x, const std::vector<float>& y, const std::string& what) {
    ASSERT_EQ(x.size(), y.size()) << what;
    for (size_t i = 0; i < x.size(); ++i) ASSERT_TRUE(close(x[i], y[i])) << what << "[" << i << "]: " << x[i] << " vs " << y[i];
  };
  for (size_t l = 0; l < a.layers.size(); ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const LayerDecodeState<float>& x = a.layers[l];
    const LayerDecodeState<float>& y = b.layers[l];
    ASSERT_EQ(x.window.count, y.window.count);
    for (int m = 0; m < x.window.count; ++m) {
      const int sx = (x.window.start + m) % W, sy = (y.window.start + m) % W;
      for (int i = 0; i < D; ++i) {
        ASSERT_TRUE(close(x.window.keys[size_t(sx) * D + i], y.window.keys[size_t(sy) * D + i])) << "key " << m;
        ASSERT_TRUE(close(x.window.values[size_t(sx) * D + i], y.window.values[size_t(sy) * D + i])) << "value " << m;
      }
      for (int h = 0; h < H; ++h) {
        const TangentNorm<float>& nx = x.window.key_norms[size_t(sx) * H + h];
        const TangentNorm<float>& ny = y.window.key_norms[size_t(sy) * H + h];
        ASSERT_TRUE(close(nx.norm, ny.norm) && close(nx.a, ny.a) && close(nx.ls2a, ny.ls2a) && close(nx.coth2a, ny.coth2a))
            << "key norms " << m << " head " << h;
        if (!x.window.log_mu.empty()) {
          ASSERT_TRUE(close(x.window.log_mu[size_t(sx) * H + h], y.window.log_mu[size_t(sy) * H + h])) << "log mu " << m;
        }
      }
    }
    ASSERT_EQ(x.window.log_mu.empty(), y.window.log_mu.empty());
    EXPECT_TRUE(close(x.bk_g_prev[0], y.bk_g_prev[0]) && close(x.bk_g_prev[1], y.bk_g_prev[1])) << "g_{t−1}";
    EXPECT_TRUE(close(x.bk_prev_half, y.bk_prev_half)) << "w_J,prev·u";
    expect_all_close(x.ssm_S, y.ssm_S, "SSM state");
    expect_all_close(x.ssm_conv_tail, y.ssm_conv_tail, "conv tail");
    expect_all_close(x.lin_S, y.lin_S, "linear-attention S");
    expect_all_close(x.lin_z, y.lin_z, "linear-attention z");
  }
}

// The GPU state after a prompt equals the CPU decoder's; either decoder continues from the other's state; a
// GPU snapshot restored on the GPU continues bit-identically. Sliding window (the ring wrapped) and block
// mode (at and past a block boundary).
TEST(decode_cuda, states_hand_over_between_cpu_and_gpu_decoders) {
  MUSE_REQUIRE_GPU();
  for (const char* mode : {"attn_mode=sliding", "attn_mode=block"}) {
    const ModelConfig c = variant_config({mode});
    const Model<float> model = make_model<float>(c, 51);
    const int W = c.window, Vp = c.padded_vocab();
    for (int P : {2 * W, 2 * W + 5}) {
      SCOPED_TRACE(std::string(mode) + ", prompt length " + std::to_string(P));
      Rng rng(52 + P);
      const std::vector<int32_t> prompt = random_ids(P, c.vocab_size, rng);
      const std::vector<int32_t> more = random_ids(size_t(W + 2), c.vocab_size, rng);
      Decoder<float> cpu(model);
      cuda::Decoder gpu(model);
      const float* cpu_prefill = cpu.prefill(0, prompt.data(), P);
      const double scale = max_abs(cpu_prefill, c.vocab_size);
      gpu.prefill(0, prompt.data(), P);
      const DecodeState<float> gpu_state = gpu.snapshot(0), cpu_state = cpu.snapshot(0);
      expect_states_close(gpu_state, cpu_state, c);

      auto continue_gpu = [&](cuda::Decoder& d) {
        std::vector<float> all;
        for (int32_t id : more) {
          d.step(0, id);
          const float* logits = d.host_logits();
          all.insert(all.end(), logits, logits + Vp);
        }
        return all;
      };
      auto continue_cpu = [&](Decoder<float>& d) {
        std::vector<float> all;
        for (int32_t id : more) {
          const float* logits = d.step(0, id);
          all.insert(all.end(), logits, logits + Vp);
        }
        return all;
      };
      auto expect_rows_close = [&](const std::vector<float>& x, const std::vector<float>& y, const char* what) {
        ASSERT_EQ(x.size(), y.size());
        for (size_t t = 0; t < more.size(); ++t)
          EXPECT_LE(relative_error(&x[t * Vp], &y[t * Vp], c.vocab_size, scale), kTolLogits) << what << ", step " << t;
      };
      const std::vector<float> gpu_first = continue_gpu(gpu);
      const std::vector<float> cpu_first = continue_cpu(cpu);
      expect_rows_close(gpu_first, cpu_first, "GPU from its prefill against CPU from its prefill");

      gpu.restore(0, gpu_state);
      EXPECT_EQ(gpu.position(0), P);
      EXPECT_EQ(continue_gpu(gpu), gpu_first) << "a restored GPU snapshot continues bit-identically";

      Decoder<float> cpu_from_gpu(model);
      cpu_from_gpu.restore(0, gpu_state);
      expect_rows_close(continue_cpu(cpu_from_gpu), cpu_first, "CPU from the GPU's state");

      cuda::Decoder gpu_from_cpu(model);
      gpu_from_cpu.restore(0, cpu_state);
      expect_rows_close(continue_gpu(gpu_from_cpu), cpu_first, "GPU from the CPU's state");
    }
  }
}

// A decoder on a GPU model's parameters (shared, not copied) decodes exactly as one built from the host model.
TEST(decode_cuda, decoder_on_a_gpu_models_parameters_matches_one_from_the_host_model) {
  MUSE_REQUIRE_GPU();
  const ModelConfig c = variant_config({});
  const Model<float> model = make_model<float>(c, 61);
  cuda::Model gpu_model(c);
  gpu_model.upload_params(model.params().data());
  cuda::Decoder from_host(model), from_gpu_model(gpu_model);
  Rng rng(62);
  const std::vector<int32_t> ids = random_ids(size_t(3 * c.window), c.vocab_size, rng);
  const int P = c.window + 1, Vp = c.padded_vocab();
  from_host.prefill(0, ids.data(), P);
  std::vector<float> a(from_host.host_logits(), from_host.host_logits() + Vp);
  from_gpu_model.prefill(0, ids.data(), P);
  EXPECT_EQ(std::vector<float>(from_gpu_model.host_logits(), from_gpu_model.host_logits() + Vp), a) << "prefill";
  for (size_t t = P; t < ids.size(); ++t) {
    from_host.step(0, ids[t]);
    a.assign(from_host.host_logits(), from_host.host_logits() + Vp);
    from_gpu_model.step(0, ids[t]);
    ASSERT_EQ(std::vector<float>(from_gpu_model.host_logits(), from_gpu_model.host_logits() + Vp), a) << "step " << t;
  }
}

TEST(decode_cuda, learned_positions_stop_at_max_seq_with_a_clear_error) {
  MUSE_REQUIRE_GPU();
  ModelConfig c = variant_config({"pos_embedding=learned"});
  c.max_seq = 8;
  const Model<float> model = make_model<float>(c, 71);
  cuda::Decoder decoder(model);
  expect_decoding_stops_at_max_seq_8(decoder);
}

TEST(decode_cuda, bad_tokens_streams_and_states_are_refused) {
  MUSE_REQUIRE_GPU();
  const ModelConfig c = variant_config({});
  const Model<float> model = make_model<float>(c, 81);
  cuda::Decoder decoder(model, 2);
  expect_bad_input_refused(decoder, c.vocab_size, DecodeState<float>{});
  // A state whose ring does not fit its position.
  const int32_t tokens[2] = {1, 2};
  decoder.prefill(0, tokens, 2);
  DecodeState<float> state = decoder.snapshot(0);
  state.position = 5;
  EXPECT_THROW(decoder.restore(0, state), std::invalid_argument);
  EXPECT_EQ(decoder.position(0), 2);
}

// Needs no GPU: the refusal comes before any device work.
TEST(decode_cuda, gpt_baseline_is_refused_naming_the_setting) {
  const ModelConfig c = variant_config({"arch=gpt", "ffn=dense", "embedding=dense"});
  const Model<float> model(c);
  try {
    cuda::Decoder decoder(model);
    FAIL() << "the GPU decoder accepted arch = gpt";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("arch = gpt"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace muse::test
