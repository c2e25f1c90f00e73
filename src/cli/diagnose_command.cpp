#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "data/prepare.h"
#include "diag/diagnose.h"
#include "train/checkpoint.h"

namespace muse::cli {

namespace {

struct DiagnoseOptions {
  std::string model_dir, text_file, pairs;
  int seq = 0;
  int64_t max_tokens = 8192;
  int pairs_count = 1000;
  uint64_t seed = 1234;
  bool json = false;
  DiagOptions diag;
};

}  // namespace

void add_diagnose_command(CLI::App& app) {
  auto o = std::make_shared<DiagnoseOptions>();
  CLI::App* cmd = app.add_subcommand(
      "diagnose",
      "Entailment-cone and persistent-homology diagnostics of a model's hidden states on a text.\n"
      "Each token's residual h (output of block --layer) becomes the Poincare-ball point exp_c(h/sqrt(D)) of that\n"
      "block's curvature c. Entailment: the cone energy E = relu(exterior angle - half-aperture) of adjacent token\n"
      "pairs (earlier token = premise) and of --pairs. Topology: Vietoris-Rips persistence (H0, H1) of up to\n"
      "--ph-points token points: Betti numbers, persistent entropy, total persistence, and a circular-reasoning\n"
      "flag. See docs/DIAGNOSTICS.md for what each number means.");
  cmd->add_option("--model,-m", o->model_dir, "Checkpoint or run directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--text,-t", o->text_file, "Text file, tokenized with the model's tokenizer")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--layer,-l", o->diag.layer, "Block whose output is measured (-1: the last, before LN_final)")
      ->capture_default_str();
  cmd->add_option("--pairs", o->pairs,
                  "Phrase pairs: a file of \"premise<TAB>hypothesis[<TAB>label]\" lines (label 1 entails, 0 does not),\n"
                  "or \"wordnet\" for WordNet noun hypernym pairs (hypernym = premise; Debian wordnet-base)");
  cmd->add_option("--pairs-count", o->pairs_count, "WordNet pairs to sample (0: all ~75k)")->capture_default_str();
  cmd->add_option("--seq,-n", o->seq, "Tokens per window: the text is run in windows of this length (default: the "
                                      "training sequence length)");
  cmd->add_option("--max-tokens", o->max_tokens, "Read at most this many tokens of the text (0: all)")
      ->capture_default_str();
  cmd->add_option("--cone-k", o->diag.cone.K, "Aperture constant K of the cones")->capture_default_str();
  cmd->add_option("--cone-violation", o->diag.cone.violation, "A pair violates when its energy exceeds this (rad)")
      ->capture_default_str();
  cmd->add_option("--ph-points", o->diag.topology.max_points, "Token points kept for persistent homology (seeded sample)")
      ->capture_default_str()
      ->check(CLI::Range(2, 4096));
  cmd->add_option("--ph-max-edge", o->diag.topology.max_edge, "Filtration bound, as a fraction of the cloud's diameter")
      ->capture_default_str();
  cmd->add_option("--ph-scale", o->diag.topology.scale, "Betti numbers at this fraction of the diameter (<= --ph-max-edge)")
      ->capture_default_str();
  cmd->add_option("--ph-circular", o->diag.topology.circular,
                  "Flag circular reasoning when an H1 bar is longer than this fraction of the diameter")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "Seed of the point and pair samples")->capture_default_str();
  cmd->add_flag("--json", o->json, "Print one JSON object instead of text");
  cmd->callback([o] {
    LoadedModel m = load_model(o->model_dir);
    const ModelConfig& c = m.model.config();
    int seq = o->seq > 0 ? o->seq : m.trainer_state.value("seq", 256);
    if (c.pos_embedding == PosEmbedding::learned) seq = std::min(seq, c.max_seq);
    std::vector<int32_t> ids = m.tokenizer->encode(read_corpus_file(o->text_file));
    if (o->max_tokens > 0 && int64_t(ids.size()) > o->max_tokens) ids.resize(size_t(o->max_tokens));
    if (ids.size() < 2) throw std::invalid_argument(o->text_file + ": fewer than two tokens");
    std::vector<std::vector<int32_t>> windows;
    for (size_t first = 0; first < ids.size(); first += size_t(seq))
      windows.emplace_back(ids.begin() + first, ids.begin() + std::min(ids.size(), first + size_t(seq)));

    DiagOptions d = o->diag;
    d.topology.seed = o->seed;
    std::vector<TokenPair> pairs;
    int64_t dropped = 0;
    if (!o->pairs.empty()) pairs = tokenize_pairs(load_pairs(o->pairs, o->pairs_count, o->seed), *m.tokenizer, &dropped);
    DiagReport report = diagnose(m.model, windows, pairs, d);
    if (!o->pairs.empty()) {
      report.has_pairs = true;
      report.pair_source = o->pairs;
      report.pairs_dropped = dropped;
    }
    if (o->json) {
      nlohmann::json j = to_json(report);
      j["model"] = m.dir;
      j["text"] = o->text_file;
      j["seq"] = seq;
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("muse diagnose: %s on %s (%zu windows of <= %d tokens)\n\n%s", m.dir.c_str(), o->text_file.c_str(),
                  windows.size(), seq, to_text(report).c_str());
    }
  });
}

}  // namespace muse::cli
