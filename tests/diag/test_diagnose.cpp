// The diagnostics on a model: points of a block, phrase points, the report, the two losses' gradients
// through the whole model, and the trainer's --diagnostics-every / loss weights.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "data/prepare.h"
#include "diag/diagnose.h"
#include "support/gradcheck.h"
#include "support/train_fixture.h"
#include "support/test_util.h"
#include "tokenizer/byte_tokenizer.h"
#include "train/trainer.h"

namespace muse::test {

namespace fs = std::filesystem;

namespace {

ModelConfig small_config() {
  ModelConfig c = find_preset("tiny").model;
  c.d_model = 16;
  c.n_heads = 2;
  c.vocab_size = 40;
  c.htt_rank = 3;
  c.ssm_rank = 6;
  c.window = 4;
  c.ffn_rank = 4;
  return c;
}

template <typename T>
void jitter(Model<T>& m, Rng& rng, double scale) {
  for (auto& p : m.params()) p += T(scale * rng.normal());
}

// Views of every parameter tensor for expect_gradients_match, and a loss that copies them back first.
struct ParamViews {
  std::vector<std::vector<double>> values, grads;
  std::vector<GradTensor> tensors;
  ParamViews(Model<double>& m) {
    for (const ParamInfo& info : m.table().entries()) {
      values.emplace_back(m.params().begin() + info.offset, m.params().begin() + info.offset + info.size);
      grads.emplace_back(m.grads().begin() + info.offset, m.grads().begin() + info.offset + info.size);
    }
    size_t i = 0;
    for (const ParamInfo& info : m.table().entries()) tensors.push_back({info.name, &values[i], &grads[i]}), ++i;
  }
  void write_back(Model<double>& m) const {
    size_t k = 0;
    for (const ParamInfo& info : m.table().entries())
      std::copy(values[k].begin(), values[k].end(), m.params().begin() + info.offset), ++k;
  }
};


}  // namespace

TEST(topology_grad, regulariser_through_the_whole_model_float64) {
  // CE + w·R(points of block 0): the regulariser's gradient enters the backward between the blocks,
  // and its curvature part reaches block 0's c_raw.
  const ModelConfig c = small_config();
  Model<double> m(c);
  m.init(3);
  Rng rng(4);
  jitter(m, rng, 0.05);
  const int B = 2, N = 9, layer = 0;
  const double w = 0.7;
  const auto ids = random_ids(B * N, c.vocab_size, rng), targets = random_ids(B * N, c.vocab_size, rng);
  TopologyOptions o;
  o.margin = 0;  // every MST edge counts: no relu kink
  std::vector<double> dh;
  double dc = 0;
  auto loss = [&] {
    m.forward(ids.data(), B, N);
    return m.loss(targets.data()) + w * topology_loss(m, B, N, layer, o, 0.0, &dh, &dc);
  };
  loss();
  m.zero_grads();
  dc = 0;
  m.forward(ids.data(), B, N);
  m.loss(targets.data());
  const double R = topology_loss(m, B, N, layer, o, w, &dh, &dc);
  EXPECT_GT(R, 0.0);
  const ResidualGrad<double> extra{layer, dh.data(), dc};
  m.backward(1.0, &extra);
  ParamViews views(m);
  GradCheckOptions go;
  go.rel_tol = 1e-5;  // SPEC §3: whole model
  go.coordinates = 2;
  expect_gradients_match([&] { views.write_back(m); return loss(); }, views.tensors, go);
}

TEST(entail_grad, order_loss_through_the_whole_model_float64) {
  const ModelConfig c = small_config();
  Model<double> m(c);
  m.init(5);
  Rng rng(6);
  jitter(m, rng, 0.05);
  std::vector<TokenPair> pairs;
  for (int i = 0; i < 4; ++i)  // phrases of 1–7 tokens, two groups of lengths
    pairs.push_back({random_ids(1 + rng.below(7), c.vocab_size, rng), random_ids(1 + rng.below(7), c.vocab_size, rng),
                     uint8_t(i % 2)});
  ConeOptions o;
  o.margin = 10;  // every negative is inside the margin (E ≤ π): no hinge kink
  const int layer = 1;
  auto loss = [&] {
    std::vector<double> x, y;
    pair_points(m, pairs, layer, m.curvature(layer), &x, &y);
    std::vector<uint8_t> labels;
    for (const TokenPair& p : pairs) labels.push_back(p.label);
    return order_loss<double>(nullptr, nullptr, nullptr, 1.0, x.data(), y.data(), labels, c.d_model,
                              m.curvature(layer), o);
  };
  m.zero_grads();
  const double L = entail_loss_step(m, pairs, layer, o, 1.0);
  EXPECT_NEAR(L, loss(), 1e-12);
  ParamViews views(m);
  GradCheckOptions go;
  go.rel_tol = 1e-5;
  go.coordinates = 2;
  expect_gradients_match([&] { views.write_back(m); return loss(); }, views.tensors, go);
}

TEST(entail_pairs, phrase_point_is_the_point_of_the_phrase_run_alone) {
  const ModelConfig c = small_config();
  Model<float> m(c);
  m.init(8);
  Rng rng(9);
  jitter(m, rng, 0.05);
  std::vector<std::vector<int32_t>> phrases;
  for (int len : {1, 3, 3, 4, 9, 2, 13}) phrases.push_back(random_ids(len, c.vocab_size, rng));
  std::vector<const std::vector<int32_t>*> refs;
  for (const auto& p : phrases) refs.push_back(&p);
  const int layer = 1, D = c.d_model;
  const double curv = m.curvature(layer);
  const std::vector<double> together = phrase_points(m, refs, layer, curv);
  for (size_t i = 0; i < phrases.size(); ++i) {
    m.forward(phrases[i].data(), 1, int(phrases[i].size()));
    const std::vector<double> alone = model_points(m, layer, {phrases[i].size() - 1}, curv);
    for (int e = 0; e < D; ++e) EXPECT_NEAR(together[i * D + e], alone[e], 1e-6) << "phrase " << i;
  }
}

TEST(topology_diagnose, report_on_a_small_model) {
  const ModelConfig c = small_config();
  Model<float> m(c);
  m.init(10);
  Rng rng(11);
  jitter(m, rng, 0.1);
  const std::vector<std::vector<int32_t>> windows = {random_ids(20, c.vocab_size, rng),
                                                     random_ids(13, c.vocab_size, rng)};
  std::vector<TokenPair> pairs = {{{1, 2}, {3}, 1}, {{4}, {5, 6, 7}, 1}, {{8}, {9}, 0}};
  DiagOptions o;
  const DiagReport r = diagnose(m, windows, pairs, o);
  EXPECT_EQ(r.layer, c.n_layers - 1);
  EXPECT_NEAR(r.curvature, m.curvature(c.n_layers - 1), 1e-7);
  EXPECT_EQ(r.tokens, 33);
  EXPECT_EQ(r.adjacent.pairs, 19 + 12);  // adjacent pairs never straddle two windows
  EXPECT_EQ(r.pairs.pairs, 2);
  EXPECT_EQ(r.non_pairs.pairs, 1);
  EXPECT_EQ(r.topology.points, 33);
  EXPECT_GT(r.topology.diameter, 0.0);
  EXPECT_EQ(r.topology.dim[0].bars, 33);  // 32 merges + the whole cloud (distinct random points)
  EXPECT_GE(r.adjacent.violation_rate, 0.0);
  EXPECT_LE(r.adjacent.violation_rate, 1.0);
  const nlohmann::json j = to_json(r);
  for (const char* key : {"layer", "curvature", "tokens", "entailment", "topology"}) EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_TRUE(j["topology"]["h1"].contains("entropy"));
  EXPECT_TRUE(j["topology"].contains("circular_reasoning"));
  EXPECT_NE(to_text(r).find("circular reasoning"), std::string::npos);
  // An explicit block, and one outside the model.
  o.layer = 0;
  EXPECT_EQ(diagnose(m, windows, {}, o).layer, 0);
  o.layer = c.n_layers;
  EXPECT_THROW(diagnose(m, windows, {}, o), std::invalid_argument);
}

TEST(topology_train, diagnostics_and_auxiliary_losses_are_logged_and_resume_exactly) {
  TempDir dir("diag_train");
  {
    std::ofstream text(dir.str("corpus.txt"));
    for (int i = 0; i < 600; ++i) text << "Line " << i << ": the quick brown fox jumps over the lazy dog.\n";
  }
  PrepareOptions p;
  p.inputs = {dir.str("corpus.txt")};
  p.out_dir = dir.str("data");
  p.val_fraction = 0.1;
  prepare_corpus(ByteTokenizer(), p);
  std::ofstream(dir.str("pairs.tsv")) << "animal\tdog\nfruit\tapple\ntool\thammer\n";

  auto run = [&](const std::string& out, bool aux) {
    TrainOptions o = tiny_run(dir, out);
    o.steps = 4;
    o.seq = 24;
    o.eval_windows = 2;
    o.checkpoint_every = 2;
    o.diagnostics_every = 2;
    o.pairs = dir.str("pairs.tsv");
    if (aux) o.entail_weight = 0.5, o.topology_weight = 0.05;
    return o;
  };
  auto lines_of = [](const TrainOptions& o) {
    std::vector<nlohmann::json> lines;
    train(o, [&](const std::string& l) { lines.push_back(nlohmann::json::parse(l)); });
    return lines;
  };
  const std::vector<nlohmann::json> with = lines_of(run("with", true)), without = lines_of(run("without", false));
  ASSERT_EQ(with.size(), 5u);  // the step-0 evaluation, then steps 1–4
  for (int s = 1; s <= 4; ++s) {
    SCOPED_TRACE(s);
    EXPECT_TRUE(with[s].contains("entail_loss"));
    EXPECT_TRUE(with[s].contains("topology_loss"));
    EXPECT_GT(with[s]["topology_loss"].get<double>(), 0.0);
    EXPECT_FALSE(without[s].contains("entail_loss"));
    EXPECT_EQ(with[s].contains("diagnostics"), s % 2 == 0);
    if (s % 2 == 0) {
      const nlohmann::json& d = with[s]["diagnostics"];
      EXPECT_EQ(d["tokens"].get<int>(), 24);
      EXPECT_EQ(d["entailment"]["pairs"]["pairs"].get<int>(), 3);
      EXPECT_TRUE(d["topology"]["h0"].contains("betti"));
    }
  }
  // Step 1's loss is computed before any update; later steps see weights the auxiliary gradients moved.
  EXPECT_EQ(with[1]["loss"], without[1]["loss"]);
  EXPECT_NE(with[2]["loss"], without[2]["loss"]);

  // Resuming from step 2 draws the same auxiliary samples: the same losses, bit for bit.
  fs::create_directories(dir.path / "resumed" / "checkpoints");
  fs::copy(dir.path / "with" / "checkpoints" / "step-00000002", dir.path / "resumed" / "checkpoints" / "step-00000002",
           fs::copy_options::recursive);
  std::ofstream(dir.str("resumed/latest")) << "checkpoints/step-00000002\n";
  TrainOptions r = run("resumed", true);
  r.resume = true;
  const std::vector<nlohmann::json> resumed = lines_of(r);
  ASSERT_EQ(resumed.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(resumed[i]["loss"], with[3 + i]["loss"]);
    EXPECT_EQ(resumed[i]["entail_loss"], with[3 + i]["entail_loss"]);
    EXPECT_EQ(resumed[i]["topology_loss"], with[3 + i]["topology_loss"]);
  }
}

}  // namespace muse::test
