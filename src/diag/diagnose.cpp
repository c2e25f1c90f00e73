#include "diag/diagnose.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <unordered_map>

#include "ops/poincare.h"

namespace muse {

using nlohmann::json;

namespace {

// Phrases per forward: bounds the activations kept by the model.
constexpr size_t kPhraseChunk = 256;

template <typename T> T row_norm(const T* x, int D) {
  T s = 0;
  for (int e = 0; e < D; ++e) s += x[e] * x[e];
  return std::sqrt(s);
}

// Phrases sorted by token count and cut into groups whose longest phrase is at most 1.5× + 1 the
// shortest (and at most kPhraseChunk phrases): each group runs as one right-padded batch. Exact lengths
// would need no padding but one forward per distinct length, and small forwards are dominated by their
// fixed costs (measured on `tiny`: 25 exact-length groups per step made the order loss 5× slower).
std::vector<std::vector<size_t>> length_groups(const std::vector<const std::vector<int32_t>*>& phrases) {
  std::vector<size_t> order(phrases.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return phrases[a]->size() < phrases[b]->size(); });
  std::vector<std::vector<size_t>> groups;
  size_t shortest = 0;
  for (size_t k : order) {
    const size_t len = phrases[k]->size();
    if (groups.empty() || groups.back().size() == kPhraseChunk || 2 * len > 3 * shortest + 2) {
      groups.emplace_back();
      shortest = len;
    }
    groups.back().push_back(k);
  }
  return groups;
}

// Runs one group as a right-padded batch (the padding repeats each phrase's last token; the model is
// causal, so padding after a phrase cannot change its last token's point). Returns the rows of the
// phrases' last tokens in the batch.
template <typename T>
std::vector<size_t> forward_group(Model<T>& model, const std::vector<const std::vector<int32_t>*>& phrases,
                                  const std::vector<size_t>& group) {
  const int B = int(group.size());
  int N = 0;
  for (size_t k : group) N = std::max(N, int(phrases[k]->size()));
  std::vector<int32_t> ids(size_t(B) * N);
  std::vector<size_t> last_rows;
  for (int b = 0; b < B; ++b) {
    const std::vector<int32_t>& p = *phrases[group[b]];
    for (int t = 0; t < N; ++t) ids[size_t(b) * N + t] = p[std::min(size_t(t), p.size() - 1)];
    last_rows.push_back(size_t(b) * N + p.size() - 1);
  }
  model.forward(ids.data(), B, N);
  return last_rows;
}

json stats_json(const ConeStats& s) {
  return {{"pairs", s.pairs},
          {"skipped", s.skipped},
          {"violations", s.violations},
          {"violation_rate", s.violation_rate},
          {"mean_energy", s.mean_energy},
          {"mean_half_aperture", s.mean_half_aperture},
          {"mean_exterior_angle", s.mean_exterior_angle}};
}

json dimension_json(const DimensionSummary& d) {
  return {{"bars", d.bars},
          {"essential", d.essential},
          {"betti", d.betti},
          {"entropy", d.entropy},
          {"normalized_entropy", d.normalized_entropy},
          {"total_persistence", d.total_persistence},
          {"longest", d.longest}};
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  return buf;
}

std::string stats_text(const ConeStats& s) {
  return format("%lld pairs (%lld skipped): violation rate %.4f, mean energy %.4f rad, mean half-aperture %.4f rad, "
                "mean exterior angle %.4f rad",
                (long long)s.pairs, (long long)s.skipped, s.violation_rate, s.mean_energy, s.mean_half_aperture,
                s.mean_exterior_angle);
}

}  // namespace

int resolve_layer(const ModelConfig& config, int layer) {
  const int k = layer < 0 ? config.n_layers + layer : layer;
  if (layer < -1 || k < 0 || k >= config.n_layers)
    throw std::invalid_argument("--layer " + std::to_string(layer) + " is outside the model's blocks 0.." +
                                std::to_string(config.n_layers - 1) + " (−1: the last)");
  return k;
}

template <typename T> double diag_curvature(const Model<T>& model, int layer) {
  return model.config().arch == Arch::gpt ? kGptCurvature : model.curvature(layer);
}

template <typename T> int residual_to_ball(T* p, const T* h, int rows, int D, T c) {
  const T inv_sqrt_d = T(1) / std::sqrt(T(D)), sqrt_c = std::sqrt(c);
  std::vector<T> v(h, h + size_t(rows) * D);
  for (T& x : v) x *= inv_sqrt_d;
  poincare_exp_forward<T>(p, v.data(), c, rows, D);
  int clamped = 0;
  const T limit = T(1 - kBallMargin);
  for (int r = 0; r < rows; ++r) {
    T* pr = p + size_t(r) * D;
    const T s = sqrt_c * row_norm(pr, D);
    if (s <= limit) continue;
    ++clamped;
    for (int e = 0; e < D; ++e) pr[e] *= limit / s;
  }
  return clamped;
}

template <typename T> void residual_to_ball_backward(T* dh, T* dc, const T* dp, const T* h, int rows, int D, T c) {
  const T inv_sqrt_d = T(1) / std::sqrt(T(D)), sqrt_c = std::sqrt(c);
  std::vector<T> v(h, h + size_t(rows) * D), p(size_t(rows) * D), g(dp, dp + size_t(rows) * D);
  for (T& x : v) x *= inv_sqrt_d;
  poincare_exp_forward<T>(p.data(), v.data(), c, rows, D);
  for (int r = 0; r < rows; ++r)
    if (sqrt_c * row_norm(p.data() + size_t(r) * D, D) > T(1 - kBallMargin))
      std::fill(g.begin() + size_t(r) * D, g.begin() + size_t(r + 1) * D, T(0));  // clamped: constant norm
  std::vector<T> dv(size_t(rows) * D, T(0));
  poincare_exp_backward<T>(dv.data(), dc, g.data(), v.data(), c, rows, D);
  if (dh)
    for (size_t i = 0; i < dv.size(); ++i) dh[i] += dv[i] * inv_sqrt_d;
}

template int residual_to_ball<float>(float*, const float*, int, int, float);
template int residual_to_ball<double>(double*, const double*, int, int, double);
template void residual_to_ball_backward<float>(float*, float*, const float*, const float*, int, int, float);
template void residual_to_ball_backward<double>(double*, double*, const double*, const double*, int, int, double);

template <typename T>
std::vector<double> model_points(const Model<T>& model, int layer, const std::vector<size_t>& rows, double c,
                                 int* clamped) {
  const int D = model.config().d_model;
  const T* h = model.residual(layer);
  std::vector<double> hd(rows.size() * D), points(rows.size() * D);
  for (size_t i = 0; i < rows.size(); ++i)
    for (int e = 0; e < D; ++e) hd[i * D + e] = h[rows[i] * D + e];
  const int n = residual_to_ball<double>(points.data(), hd.data(), int(rows.size()), D, c);
  if (clamped) *clamped += n;
  return points;
}

std::vector<PhrasePair> read_pair_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open pair file");
  std::vector<PhrasePair> pairs;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    std::vector<std::string> fields;
    std::stringstream ss(line);
    for (std::string f; std::getline(ss, f, '\t');) fields.push_back(f);
    const std::string where = path + ":" + std::to_string(number) + ": ";
    if (fields.size() < 2 || fields.size() > 3)
      throw std::runtime_error(where + "expected \"premise<TAB>hypothesis\" or \"premise<TAB>hypothesis<TAB>label\", got " +
                               std::to_string(fields.size()) + " tab-separated field(s)");
    PhrasePair p{fields[0], fields[1], 1};
    if (p.premise.empty() || p.hypothesis.empty()) throw std::runtime_error(where + "empty phrase");
    if (fields.size() == 3) {
      if (fields[2] != "0" && fields[2] != "1")
        throw std::runtime_error(where + "label must be 1 (entails) or 0 (does not), got \"" + fields[2] + "\"");
      p.label = fields[2] == "1";
    }
    pairs.push_back(std::move(p));
  }
  if (pairs.empty()) throw std::runtime_error(path + ": no pairs");
  return pairs;
}

std::vector<PhrasePair> wordnet_pairs(const std::string& path, int count, uint64_t seed) {
  std::ifstream in(path);
  if (!in)
    throw std::runtime_error(path + ": cannot open the WordNet noun database (Debian package wordnet-base, "
                             "installed by scripts/setup-debian.sh)");
  // data.noun: "offset lex_filenum ss_type w_cnt(hex) {word lex_id}×w_cnt p_cnt {symbol offset pos st}×p_cnt | gloss";
  // the licence header lines start with a space.
  std::unordered_map<std::string, std::string> lemma;
  std::vector<std::pair<std::string, std::string>> hypernym_links;  // (synset offset, hypernym offset)
  std::string line;
  std::vector<std::string_view> f;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.empty() || line[0] == ' ') continue;
    const std::string_view fields(line.data(), std::min(line.size(), line.find(" | ")));
    f.clear();
    for (size_t at = 0; at < fields.size();) {
      const size_t end = std::min(fields.size(), fields.find(' ', at));
      if (end > at) f.push_back(fields.substr(at, end - at));
      at = end + 1;
    }
    const std::string where = path + ":" + std::to_string(number) + ": ";
    const int w_cnt = f.size() > 4 ? int(std::strtol(std::string(f[3]).c_str(), nullptr, 16)) : 0;
    const size_t p_at = 4 + 2 * size_t(w_cnt);
    if (w_cnt < 1 || f.size() <= p_at) throw std::runtime_error(where + "not a WordNet data line");
    const int p_cnt = std::atoi(std::string(f[p_at]).c_str());
    if (f.size() < p_at + 1 + 4 * size_t(p_cnt)) throw std::runtime_error(where + "truncated WordNet data line");
    for (int i = 0; i < p_cnt; ++i) {
      const size_t k = p_at + 1 + 4 * size_t(i);
      if (f[k] == "@" && f[k + 2] == "n") hypernym_links.emplace_back(f[0], f[k + 1]);
    }
    std::string word(f[4]);
    std::replace(word.begin(), word.end(), '_', ' ');
    lemma.emplace(f[0], std::move(word));
  }
  std::vector<PhrasePair> all;
  for (const auto& [synset, hypernym] : hypernym_links) {
    const auto hyper = lemma.find(hypernym);
    if (hyper == lemma.end()) throw std::runtime_error(path + ": hypernym pointer to unknown synset " + hypernym);
    all.push_back({hyper->second, lemma.at(synset), 1});
  }
  if (all.empty()) throw std::runtime_error(path + ": no hypernym pointers found");
  if (count <= 0 || size_t(count) >= all.size()) return all;
  std::vector<PhrasePair> picked;
  for (int i : subsample_indices(int(all.size()), count, seed)) picked.push_back(all[i]);
  return picked;
}

std::vector<PhrasePair> load_pairs(const std::string& spec, int count, uint64_t seed) {
  return spec == "wordnet" ? wordnet_pairs(kWordnetNouns, count, seed) : read_pair_file(spec);
}

std::vector<TokenPair> tokenize_pairs(const std::vector<PhrasePair>& pairs, const Tokenizer& tokenizer,
                                      int64_t* dropped) {
  auto encode = [&](const std::string& phrase) {
    std::vector<int32_t> ids = tokenizer.encode(phrase);
    if (ids.size() > size_t(kMaxPhraseTokens)) ids.erase(ids.begin(), ids.end() - kMaxPhraseTokens);
    return ids;
  };
  std::vector<TokenPair> out;
  for (const PhrasePair& p : pairs) {
    TokenPair t{encode(p.premise), encode(p.hypothesis), p.label};
    if (t.premise.empty() || t.hypothesis.empty()) {
      if (dropped) ++*dropped;
      continue;
    }
    out.push_back(std::move(t));
  }
  return out;
}

template <typename T>
std::vector<double> phrase_points(Model<T>& model, const std::vector<const std::vector<int32_t>*>& phrases,
                                  int layer, double c) {
  const int D = model.config().d_model;
  std::vector<double> points(phrases.size() * D);
  for (const std::vector<size_t>& group : length_groups(phrases)) {
    const std::vector<double> p = model_points(model, layer, forward_group(model, phrases, group), c);
    for (size_t i = 0; i < group.size(); ++i) std::copy_n(p.data() + i * D, D, points.data() + group[i] * D);
  }
  return points;
}

template <typename T>
void pair_points(Model<T>& model, const std::vector<TokenPair>& pairs, int layer, double c,
                 std::vector<double>* premises, std::vector<double>* hypotheses) {
  const int D = model.config().d_model;
  std::vector<const std::vector<int32_t>*> phrases;
  for (const TokenPair& p : pairs) phrases.push_back(&p.premise), phrases.push_back(&p.hypothesis);
  const std::vector<double> points = phrase_points(model, phrases, layer, c);
  premises->resize(pairs.size() * D);
  hypotheses->resize(pairs.size() * D);
  for (size_t i = 0; i < pairs.size(); ++i) {
    std::copy_n(points.data() + (2 * i) * D, D, premises->data() + i * D);
    std::copy_n(points.data() + (2 * i + 1) * D, D, hypotheses->data() + i * D);
  }
}

DiagReport diagnose(Model<float>& model, const std::vector<std::vector<int32_t>>& windows,
                    const std::vector<TokenPair>& pairs, const DiagOptions& o) {
  const int D = model.config().d_model;
  if (!(o.cone.K > 0)) throw std::invalid_argument("--cone-k must be positive");
  DiagReport r;
  r.layer = resolve_layer(model.config(), o.layer);
  r.curvature = diag_curvature(model, r.layer);
  r.gpt_curvature = model.config().arch == Arch::gpt;
  const double c = r.curvature;

  std::vector<double> points, premises, hypotheses;
  for (const std::vector<int32_t>& w : windows) {
    if (w.empty()) continue;
    const int n = int(w.size());
    model.forward(w.data(), 1, n);
    std::vector<size_t> rows(n);
    std::iota(rows.begin(), rows.end(), 0);
    const std::vector<double> p = model_points(model, r.layer, rows, c, &r.clamped);
    points.insert(points.end(), p.begin(), p.end());
    premises.insert(premises.end(), p.begin(), p.end() - D);
    hypotheses.insert(hypotheses.end(), p.begin() + D, p.end());
  }
  r.tokens = int64_t(points.size() / D);
  if (r.tokens < 2) throw std::invalid_argument("diagnose: the text has fewer than two tokens");
  r.adjacent = cone_stats(premises.data(), hypotheses.data(), int(premises.size() / D), D, c, o.cone);
  r.topology = topology_report(points.data(), int(r.tokens), D, c, o.topology);

  if (!pairs.empty()) {
    r.has_pairs = true;
    std::vector<TokenPair> groups[2];
    for (const TokenPair& p : pairs) groups[p.label ? 1 : 0].push_back(p);
    for (int label = 1; label >= 0; --label) {
      if (groups[label].empty()) continue;
      pair_points(model, groups[label], r.layer, c, &premises, &hypotheses);
      (label ? r.pairs : r.non_pairs) =
          cone_stats(premises.data(), hypotheses.data(), int(groups[label].size()), D, c, o.cone);
    }
  }
  return r;
}

json to_json(const DiagReport& r) {
  const TopologyReport& t = r.topology;
  json topology = {{"points", t.points},
                   {"total_points", t.total_points},
                   {"diameter", t.diameter},
                   {"filtration_bound", t.bound},
                   {"scale", t.scale},
                   {"h0", dimension_json(t.dim[0])},
                   {"h1", dimension_json(t.dim[1])},
                   {"longest_h1_over_diameter", t.diameter > 0 ? t.dim[1].longest / t.diameter : 0.0},
                   {"circular_reasoning", t.circular}};
  json entail = {{"adjacent", stats_json(r.adjacent)}};
  if (r.has_pairs) {
    json pairs = stats_json(r.pairs);
    pairs["source"] = r.pair_source;
    pairs["dropped_empty"] = r.pairs_dropped;
    entail["pairs"] = pairs;
    if (r.non_pairs.pairs > 0) entail["non_entailing_pairs"] = stats_json(r.non_pairs);
  }
  return {{"layer", r.layer},     {"curvature", r.curvature}, {"curvature_fixed_for_gpt", r.gpt_curvature},
          {"tokens", r.tokens},   {"points_clamped", r.clamped}, {"entailment", entail},
          {"topology", topology}};
}

std::string to_text(const DiagReport& r) {
  const TopologyReport& t = r.topology;
  std::string s;
  s += format("layer %d, curvature c = %.4f%s, %lld token points", r.layer, r.curvature,
              r.gpt_curvature ? " (arch gpt has none: fixed)" : "", (long long)r.tokens);
  if (r.clamped) s += format(" (%d clamped at the ball's edge)", r.clamped);
  s += "\n\nentailment cones (E = relu(Ξ − ψ); a pair violates when E > the threshold)\n";
  s += "  adjacent tokens:  " + stats_text(r.adjacent) + "\n";
  if (r.has_pairs) {
    s += "  pairs (" + r.pair_source + "):  " + stats_text(r.pairs) + "\n";
    if (r.pairs_dropped) s += format("    %lld pairs dropped: a phrase encodes to no token\n", (long long)r.pairs_dropped);
    if (r.non_pairs.pairs > 0) s += "  non-entailing pairs (label 0):  " + stats_text(r.non_pairs) + "\n";
  }
  s += format("\npersistent homology (Vietoris-Rips on Poincare distances, %d of %d points)\n", t.points,
              t.total_points);
  s += format("  diameter %.4f, filtration bound %.4f, scale %.4f\n", t.diameter, t.bound, t.scale);
  for (int d = 0; d < 2; ++d) {
    const DimensionSummary& m = t.dim[d];
    s += format("  H%d: %d bars (%d alive at the bound), Betti %d at the scale, entropy %.4f (normalised %.4f), "
                "total persistence %.4f, longest %.4f\n",
                d, m.bars, m.essential, m.betti, m.entropy, m.normalized_entropy, m.total_persistence, m.longest);
  }
  s += format("  circular reasoning: %s (longest H1 bar = %.3f x diameter)\n", t.circular ? "YES" : "no",
              t.diameter > 0 ? t.dim[1].longest / t.diameter : 0.0);
  return s;
}

template <typename T>
double topology_loss(const Model<T>& model, int B, int N, int layer, const TopologyOptions& o, double g,
                     std::vector<T>* dh, double* dc) {
  const int D = model.config().d_model;
  const double c = diag_curvature(model, layer);
  const T* h = model.residual(layer);
  dh->assign(size_t(B) * N * D, T(0));
  double loss = 0;
  for (int b = 0; b < B; ++b) {
    const std::vector<int> idx = subsample_indices(N, o.max_points, o.seed + uint64_t(b));
    const int n = int(idx.size());
    std::vector<double> hr(size_t(n) * D), p(size_t(n) * D), dp(size_t(n) * D, 0.0), dhr(size_t(n) * D, 0.0);
    for (int i = 0; i < n; ++i)
      for (int e = 0; e < D; ++e) hr[size_t(i) * D + e] = h[(size_t(b) * N + idx[i]) * D + e];
    residual_to_ball<double>(p.data(), hr.data(), n, D, c);
    double dc_row = 0;
    loss += h0_regularizer<double>(dp.data(), &dc_row, g / B, p.data(), n, D, c, o.margin) / B;
    residual_to_ball_backward<double>(dhr.data(), &dc_row, dp.data(), hr.data(), n, D, c);
    for (int i = 0; i < n; ++i)
      for (int e = 0; e < D; ++e) (*dh)[(size_t(b) * N + idx[i]) * D + e] += T(dhr[size_t(i) * D + e]);
    *dc += dc_row;
  }
  return loss;
}

template <typename T>
double entail_loss_step(Model<T>& model, const std::vector<TokenPair>& pairs, int layer, const ConeOptions& o,
                        double g) {
  const int D = model.config().d_model;
  const double c = diag_curvature(model, layer);
  const size_t P = pairs.size();
  std::vector<const std::vector<int32_t>*> phrases;  // premise of pair i at 2i, its hypothesis at 2i + 1
  for (const TokenPair& p : pairs) phrases.push_back(&p.premise), phrases.push_back(&p.hypothesis);
  std::vector<uint8_t> labels(P);
  for (size_t i = 0; i < P; ++i) labels[i] = pairs[i].label;

  // Pass 1: the points, the loss and its gradient with respect to the points.
  std::vector<double> x, y;
  pair_points(model, pairs, layer, c, &x, &y);
  std::vector<double> dx(P * D, 0.0), dy(P * D, 0.0);
  double dc = 0;
  const double loss = order_loss<double>(dx.data(), dy.data(), &dc, g, x.data(), y.data(), labels, D, c, o);

  // Pass 2: each group again (the model keeps one forward's activations), backward from its
  // phrases' last tokens at the block. The cone part of ∂/∂c rides with the first group.
  for (const std::vector<size_t>& group : length_groups(phrases)) {
    const std::vector<size_t> last_rows = forward_group(model, phrases, group);
    const int n = int(group.size());
    size_t N = 0;  // the batch's (padded) length
    for (size_t k : group) N = std::max(N, phrases[k]->size());
    const T* h = model.residual(layer);
    std::vector<double> hg(size_t(n) * D), dp(size_t(n) * D), dhg(size_t(n) * D, 0.0);
    for (int i = 0; i < n; ++i) {
      const size_t k = group[i];
      const double* d = (k % 2 == 0 ? dx.data() : dy.data()) + (k / 2) * D;
      for (int e = 0; e < D; ++e) hg[size_t(i) * D + e] = h[last_rows[i] * D + e], dp[size_t(i) * D + e] = d[e];
    }
    double dc_group = dc;
    dc = 0;
    residual_to_ball_backward<double>(dhg.data(), &dc_group, dp.data(), hg.data(), n, D, c);
    std::vector<T> dh(n * N * D, T(0));
    for (int i = 0; i < n; ++i)
      for (int e = 0; e < D; ++e) dh[last_rows[i] * D + e] = T(dhg[size_t(i) * D + e]);
    const ResidualGrad<T> extra{layer, dh.data(), dc_group};  // a gpt block has no curvature: dc is dropped
    model.backward(0.0, &extra);
  }
  return loss;
}

#define MUSE_INSTANTIATE_DIAG(T)                                                                               \
  template double diag_curvature<T>(const Model<T>&, int);                                                    \
  template std::vector<double> model_points<T>(const Model<T>&, int, const std::vector<size_t>&, double, int*); \
  template std::vector<double> phrase_points<T>(Model<T>&, const std::vector<const std::vector<int32_t>*>&, int, \
                                                double);                                                       \
  template void pair_points<T>(Model<T>&, const std::vector<TokenPair>&, int, double, std::vector<double>*,     \
                               std::vector<double>*);                                                          \
  template double topology_loss<T>(const Model<T>&, int, int, int, const TopologyOptions&, double,            \
                                   std::vector<T>*, double*);                                                  \
  template double entail_loss_step<T>(Model<T>&, const std::vector<TokenPair>&, int, const ConeOptions&, double);
MUSE_INSTANTIATE_DIAG(float)
MUSE_INSTANTIATE_DIAG(double)
#undef MUSE_INSTANTIATE_DIAG

std::vector<TokenPair> sample_order_pairs(const std::vector<TokenPair>& pairs, int count, Rng& rng) {
  std::vector<const TokenPair*> positives, negatives;
  for (const TokenPair& p : pairs) (p.label ? positives : negatives).push_back(&p);
  if (positives.empty()) throw std::invalid_argument("the order loss needs at least one entailing (label 1) pair");
  std::vector<TokenPair> out;
  for (int i = 0; i < count; ++i) {
    const TokenPair& p = *positives[rng.below(positives.size())];
    out.push_back(p);
    if (negatives.empty())
      out.push_back({p.hypothesis, p.premise, 0});
    else
      out.push_back(*negatives[rng.below(negatives.size())]);
  }
  return out;
}

}  // namespace muse
