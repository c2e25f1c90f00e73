// Sampling controls (SPEC §4) against hand-computed distributions, stop strings across token boundaries,
// and the chat template.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>

#include "infer/chat_template.h"
#include "infer/sampler.h"

namespace muse::test {

namespace {

SamplingOptions with(double temperature) {
  SamplingOptions o;
  o.temperature = temperature;
  return o;
}

std::vector<double> softmax(const std::vector<double>& l) {
  const double m = *std::max_element(l.begin(), l.end());
  std::vector<double> p(l.size());
  double s = 0;
  for (size_t i = 0; i < l.size(); ++i) s += p[i] = std::exp(l[i] - m);
  for (double& x : p) x /= s;
  return p;
}

// Logits whose softmax at temperature 1 is exactly `probs` (up to rounding).
std::vector<float> logits_for(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(float(std::log(p)));
  return l;
}

void expect_distribution(const std::vector<double>& got, const std::vector<double>& want, double tol = 1e-6) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "token " << i;
}

}  // namespace

TEST(sample_greedy, temperature_zero_takes_the_largest_logit_lowest_id_on_ties) {
  Sampler s(with(0), 5);
  const std::vector<float> l = {0.5f, 3.0f, -1.0f, 3.0f, 2.0f};
  EXPECT_EQ(s.sample(l.data()), 1);
  expect_distribution(s.probabilities(l.data()), {0, 1, 0, 0, 0});
}

TEST(sample_temperature, softmax_of_logits_over_temperature) {
  const std::vector<float> l = {1.0f, 2.0f, 3.0f, 0.5f};
  for (double t : {0.5, 1.0, 2.0}) {
    Sampler s(with(t), 4);
    expect_distribution(s.probabilities(l.data()), softmax({1 / t, 2 / t, 3 / t, 0.5 / t}));
  }
}

TEST(sample_top_k, keeps_the_k_most_probable_ties_towards_the_lower_id) {
  SamplingOptions o = with(1);
  o.top_k = 2;
  Sampler s(o, 5);
  const std::vector<float> l = {3.0f, 1.0f, 2.0f, 2.0f, 0.0f};  // 2 and 3 tie for second place
  const double a = std::exp(3.0), b = std::exp(2.0);
  expect_distribution(s.probabilities(l.data()), {a / (a + b), 0, b / (a + b), 0, 0});
}

TEST(sample_top_p, keeps_the_smallest_head_reaching_p) {
  const std::vector<float> l = logits_for({0.5, 0.3, 0.15, 0.05});
  SamplingOptions o = with(1);
  o.top_p = 0.75;  // 0.5 < 0.75 ≤ 0.8
  expect_distribution(Sampler(o, 4).probabilities(l.data()), {0.625, 0.375, 0, 0});
  o.top_p = 0.45;  // the most probable token alone
  expect_distribution(Sampler(o, 4).probabilities(l.data()), {1, 0, 0, 0});
  o.top_p = 0.9;  // 0.8 < 0.9 ≤ 0.95
  expect_distribution(Sampler(o, 4).probabilities(l.data()), {0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0});
}

TEST(sample_top_p, large_vocabulary_matches_a_full_sort) {
  // 5000 tokens of similar probability: the kept head is far wider than the first partial sort.
  const int V = 5000;
  Rng rng(3);
  std::vector<float> l(V);
  for (float& x : l) x = float(0.3 * rng.normal());
  SamplingOptions o = with(0.7);
  o.top_p = 0.6;
  const std::vector<double> got = Sampler(o, V).probabilities(l.data());
  std::vector<double> scaled(V);
  for (int v = 0; v < V; ++v) scaled[v] = l[v] / 0.7;
  const std::vector<double> p = softmax(scaled);
  std::vector<int> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
  std::vector<double> want(V, 0.0);
  double cumulative = 0;
  int kept = 0;
  while (cumulative < 0.6) cumulative += p[order[kept++]];
  EXPECT_GT(kept, 1000);
  for (int i = 0; i < kept; ++i) want[order[i]] = p[order[i]] / cumulative;
  expect_distribution(got, want, 1e-9);
}

TEST(sample_min_p, drops_tokens_below_min_p_times_the_top) {
  const std::vector<float> l = logits_for({0.5, 0.3, 0.15, 0.05});
  SamplingOptions o = with(1);
  o.min_p = 0.2;  // threshold 0.1
  expect_distribution(Sampler(o, 4).probabilities(l.data()), {0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0});
}

TEST(sample_filters, compose_in_order_top_k_then_top_p_then_min_p) {
  const std::vector<float> l = logits_for({0.4, 0.25, 0.2, 0.1, 0.05});
  SamplingOptions o = with(1);
  o.top_k = 4;     // {0.4, 0.25, 0.2, 0.1} / 0.95
  o.top_p = 0.85;  // cumulative 0.421, 0.684, 0.895 → keep three
  o.min_p = 0.55;  // of the top 0.4/0.85 → drops 0.2/0.85
  expect_distribution(Sampler(o, 5).probabilities(l.data()), {0.4 / 0.65, 0.25 / 0.65, 0, 0, 0});
}

TEST(sample_penalties, repetition_divides_positive_and_multiplies_negative_logits) {
  SamplingOptions o = with(1);
  o.repetition_penalty = 2.0;
  Sampler s(o, 4);
  const std::vector<int32_t> context = {0, 1};
  s.add_context(context.data(), 2);
  const std::vector<float> l = {2.0f, -2.0f, 1.0f, -1.0f};
  // Seen: 2 → 1, −2 → −4 (both less likely); unseen tokens keep their logits.
  expect_distribution(s.probabilities(l.data()), softmax({1.0, -4.0, 1.0, -1.0}));
}

TEST(sample_penalties, presence_and_frequency_count_this_completion_only) {
  SamplingOptions o = with(1);
  o.presence_penalty = 0.5;
  o.frequency_penalty = 0.25;
  Sampler s(o, 3);
  const std::vector<int32_t> context = {0};
  s.add_context(context.data(), 1);  // context alone: no presence/frequency penalty
  s.add_generated(2);
  s.add_generated(2);
  s.add_generated(1);
  const std::vector<float> l = {1.0f, 1.0f, 1.0f};
  expect_distribution(s.probabilities(l.data()), softmax({1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 0.5}));
  s.begin_completion();
  expect_distribution(s.probabilities(l.data()), softmax({1.0, 1.0, 1.0}));
}

TEST(sample_penalties, greedy_sees_the_penalised_logits) {
  SamplingOptions o = with(0);
  o.repetition_penalty = 3.0;
  Sampler s(o, 3);
  const std::vector<int32_t> context = {1};
  s.add_context(context.data(), 1);
  const std::vector<float> l = {1.0f, 2.0f, 0.5f};  // 2 / 3 < 1: token 0 wins
  EXPECT_EQ(s.sample(l.data()), 0);
}

TEST(sample_seed, same_seed_same_tokens_and_frequencies_follow_the_distribution) {
  const std::vector<float> l = logits_for({0.5, 0.3, 0.15, 0.05});
  SamplingOptions o = with(1);
  o.seed = 9;
  Sampler a(o, 4), b(o, 4);
  std::vector<int> counts(4, 0);
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) {
    const int32_t x = a.sample(l.data());
    ASSERT_EQ(x, b.sample(l.data()));
    ++counts[x];
  }
  const std::vector<double> p = {0.5, 0.3, 0.15, 0.05};
  for (int v = 0; v < 4; ++v) EXPECT_NEAR(counts[v] / double(draws), p[v], 0.015) << "token " << v;
  o.seed = 10;
  Sampler c(o, 4);
  Sampler d(with(1), 4);
  int same = 0;
  for (int i = 0; i < 50; ++i) same += c.sample(l.data()) == d.sample(l.data());
  EXPECT_LT(same, 50);
}

TEST(sample_options, out_of_range_values_are_refused_by_flag_name) {
  auto message = [](SamplingOptions o) {
    try {
      validate(o);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  SamplingOptions o;
  o.temperature = -1;
  EXPECT_NE(message(o).find("--temperature"), std::string::npos);
  o = {};
  o.top_p = 0;
  EXPECT_NE(message(o).find("--top-p"), std::string::npos);
  o = {};
  o.top_k = -3;
  EXPECT_NE(message(o).find("--top-k"), std::string::npos);
  o = {};
  o.min_p = 1.5;
  EXPECT_NE(message(o).find("--min-p"), std::string::npos);
  o = {};
  o.repetition_penalty = 0;
  EXPECT_NE(message(o).find("--repetition-penalty"), std::string::npos);
  EXPECT_EQ(message(SamplingOptions{}), "accepted");
}

TEST(sample_stop, stop_string_straddling_tokens_is_never_shown) {
  StopStrings stop({"\nUser:"});
  std::string shown;
  for (const char* piece : {"Hello", " wor", "ld\nU", "se"}) {
    shown += stop.push(piece);
    EXPECT_FALSE(stop.stopped());
  }
  EXPECT_EQ(shown, "Hello world");  // "\nUse" is held back: it may become the stop string
  shown += stop.push("r: and more");
  EXPECT_TRUE(stop.stopped());
  EXPECT_EQ(shown, "Hello world");
  EXPECT_EQ(stop.push("later"), "");
}

TEST(sample_stop, held_back_text_is_released_when_it_cannot_match) {
  StopStrings stop({"\nUser:", "END"});
  EXPECT_EQ(stop.push("a\nUs"), "a");
  EXPECT_EQ(stop.push("ual E"), "\nUsual ");
  EXPECT_EQ(stop.push("N"), "");
  EXPECT_EQ(stop.flush(), "EN");
  EXPECT_FALSE(stop.stopped());
}

TEST(sample_stop, earliest_of_several_stop_strings_wins_inside_one_token) {
  StopStrings stop({"cd", "b"});
  EXPECT_EQ(stop.push("abcde"), "a");
  EXPECT_TRUE(stop.stopped());
  StopStrings none({});
  EXPECT_EQ(none.push("anything"), "anything");
}

TEST(sample_chat_template, default_layout_and_json_round_trip) {
  const ChatTemplate t = default_chat_template();
  EXPECT_EQ(t.user_turn("hi"), "User: hi\n");
  EXPECT_EQ(t.assistant_prefix(), "Assistant: ");
  EXPECT_EQ(t.assistant_suffix(), "\n");
  const ChatTemplate back = chat_template_from_json(to_json(t));
  EXPECT_EQ(back.user, t.user);
  EXPECT_EQ(back.assistant, t.assistant);
  EXPECT_EQ(back.system, t.system);
}

TEST(sample_chat_template, malformed_templates_are_refused_naming_the_key) {
  auto message = [](const char* text) {
    try {
      chat_template_from_json(nlohmann::json::parse(text));
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(message(R"({"user": "U: {message}", "assistant": "A:"})").find("\"assistant\""), std::string::npos);
  EXPECT_NE(message(R"({"user": "{message}{message}", "assistant": "{message}"})").find("\"user\""), std::string::npos);
  EXPECT_NE(message(R"({"user": "{message}", "assistant": "{message}", "bot": "x"})").find("\"bot\""),
            std::string::npos);
  EXPECT_NE(message(R"({"user": 3, "assistant": "{message}"})").find("\"user\""), std::string::npos);
  EXPECT_NE(message(R"({"assistant": "{message}"})").find("\"user\" is missing"), std::string::npos);
  EXPECT_EQ(message(R"({"system": "S\n", "user": "Q: {message}\n", "assistant": "A: {message}"})"), "accepted");
}

}  // namespace muse::test
