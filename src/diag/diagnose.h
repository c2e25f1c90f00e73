// The Phase 8 diagnostics on a model (SPEC §5): the residual stream of a chosen block is mapped to the
// Poincaré ball of that block's curvature, p_t = exp_c(h_t/√D), and measured with entailment cones
// (diag/entailment.h) and persistent homology (diag/topology.h). Also the two optional training losses
// that read those points (the cone order loss and the H0 regulariser), with their gradients handed to the
// model's backward at the chosen block.
//
// Phrase points: a phrase's point is the model's point at its last token when the phrase is run alone,
// from the start of a sequence. Phrases of similar token count run together as one right-padded batch;
// the model is causal, so padding after a phrase's last token cannot change that token's point.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "common/rng.h"
#include "diag/entailment.h"
#include "diag/topology.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace muse {

inline constexpr double kBallMargin = 1e-5;           // points are kept within (1 − 1e-5)/√c of the origin
inline constexpr int kMaxPhraseTokens = 64;           // longer phrases keep their last 64 tokens
inline constexpr const char* kWordnetNouns = "/usr/share/wordnet/data.noun";  // Debian wordnet-base
inline constexpr double kGptCurvature = 1.0;          // arch = gpt has no curvature: its points use c = 1

struct DiagOptions {
  int layer = -1;  // block whose output is read; −1: the last block (the input of LN_final)
  ConeOptions cone;
  TopologyOptions topology;
};

// The block index `layer` stands for (−1: the last), refusing indices outside the model.
int resolve_layer(const ModelConfig& config, int layer);
// The curvature the diagnostics use for a block: its c, or kGptCurvature for arch = gpt.
template <typename T> double diag_curvature(const Model<T>& model, int layer);

// p = exp_c(h/√D) row by row, with norms clamped to (1 − 1e-5)/√c (in fp32 tanh reaches 1 once
// √c‖h‖/√D ≳ 9); returns how many rows were clamped. Clamped rows get no gradient in the backward, which
// adds ∂/∂h into dh and ∂/∂c into *dc (either may be null).
template <typename T> int residual_to_ball(T* p, const T* h, int rows, int D, T c);
template <typename T> void residual_to_ball_backward(T* dh, T* dc, const T* dp, const T* h, int rows, int D, T c);

// Ball points (double) of rows [rows] of the model's last forward at block `layer`.
template <typename T>
std::vector<double> model_points(const Model<T>& model, int layer, const std::vector<size_t>& rows, double c,
                                 int* clamped = nullptr);

// --- phrase pairs ---------------------------------------------------------------------------------------
struct PhrasePair {
  std::string premise, hypothesis;
  uint8_t label = 1;  // 1: the premise's cone should hold the hypothesis, 0: it should not
};

// A pair file: one pair per line, "premise<TAB>hypothesis" or "premise<TAB>hypothesis<TAB>label" with
// label 1 or 0; blank lines and lines starting with '#' are skipped. Errors name the file and line.
std::vector<PhrasePair> read_pair_file(const std::string& path);

// WordNet noun hypernymy from a data.noun file: for each synset with a '@' (hypernym) pointer, the pair
// (premise = the hypernym's first lemma, hypothesis = the synset's first lemma), underscores as spaces
// ("animal" → "dog": the general concept is the cone's apex). `count` pairs drawn without replacement
// with the seed (all when count ≤ 0 or larger than the list), in file order.
std::vector<PhrasePair> wordnet_pairs(const std::string& data_noun_path, int count, uint64_t seed);

// "wordnet" (the built-in list, `count` pairs) or the path of a pair file.
std::vector<PhrasePair> load_pairs(const std::string& spec, int count, uint64_t seed);

struct TokenPair {
  std::vector<int32_t> premise, hypothesis;
  uint8_t label = 1;
};
// Tokenizes the pairs; pairs with a phrase that encodes to no token are dropped (counted in *dropped).
std::vector<TokenPair> tokenize_pairs(const std::vector<PhrasePair>& pairs, const Tokenizer& tokenizer,
                                      int64_t* dropped = nullptr);

// Ball points [phrases, D] of the phrases' last tokens.
template <typename T>
std::vector<double> phrase_points(Model<T>& model, const std::vector<const std::vector<int32_t>*>& phrases,
                                  int layer, double c);

// Premise and hypothesis points of each pair, [pairs, D] each.
template <typename T>
void pair_points(Model<T>& model, const std::vector<TokenPair>& pairs, int layer, double c,
                 std::vector<double>* premises, std::vector<double>* hypotheses);

// --- the report -----------------------------------------------------------------------------------------
struct DiagReport {
  int layer = 0;
  double curvature = 0;
  bool gpt_curvature = false;  // the model has no curvature; kGptCurvature was used
  int64_t tokens = 0;          // token points
  int clamped = 0;             // points clamped at the ball's edge
  ConeStats adjacent;          // adjacent token pairs (premise = the earlier token)
  bool has_pairs = false;
  std::string pair_source;
  int64_t pairs_dropped = 0;   // pairs with an empty phrase
  ConeStats pairs;             // the user's pairs (label 1 only: the violation rate of claimed entailments)
  ConeStats non_pairs;         // label-0 pairs, when the list has any
  TopologyReport topology;
};

// Runs the model on each window of token ids (each its own sequence) and measures the points; `pairs`
// (may be empty) are measured as phrase pairs.
DiagReport diagnose(Model<float>& model, const std::vector<std::vector<int32_t>>& windows,
                    const std::vector<TokenPair>& pairs, const DiagOptions& options);

nlohmann::json to_json(const DiagReport& report);
std::string to_text(const DiagReport& report);

// --- training losses (float for training, double for gradient checks) ------------------------------------
// The H0 regulariser on the model's last forward [B, N]: the mean over the B rows of
// Σ_{MST edges} relu(w − margin) over the row's tokens (≤ max_points, sub-sampled with seed + row).
// ∂(g·loss)/∂h is written into dh ([B·N, D], resized and zeroed) and ∂(g·loss)/∂c into *dc. Returns
// the loss (unscaled).
template <typename T>
double topology_loss(const Model<T>& model, int B, int N, int layer, const TopologyOptions& options, double g,
                     std::vector<T>* dh, double* dc);

// The order loss on labelled pairs (diag/entailment.h) and a backward of g·loss into the model's
// gradients at block `layer`: forwards of the phrases for the loss, then per group of similar-length
// phrases a forward and a backward from their last tokens (the last forward is replaced). Returns the loss.
template <typename T>
double entail_loss_step(Model<T>& model, const std::vector<TokenPair>& pairs, int layer,
                        const ConeOptions& options, double g);

// `count` pairs for one step of the order loss, drawn with rng: positives, and as negatives the list's
// label-0 pairs or, when it has none, the drawn positives reversed (entailment is asymmetric).
std::vector<TokenPair> sample_order_pairs(const std::vector<TokenPair>& pairs, int count, Rng& rng);

}  // namespace muse
