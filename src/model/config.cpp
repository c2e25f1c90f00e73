#include "model/config.h"

#include <nlohmann/json.hpp>

#include <functional>
#include <stdexcept>

#include "ops/ssm.h"

namespace muse {

using nlohmann::json;

namespace {

[[noreturn]] void fail(const std::string& field, const std::string& what) {
  throw std::invalid_argument("config: " + field + ": " + what);
}

template <typename E>
struct EnumNames {
  std::vector<std::pair<E, const char*>> names;

  std::string name(E value) const {
    for (auto& [v, n] : names)
      if (v == value) return n;
    return "?";
  }
  E parse(const std::string& field, const std::string& text) const {
    std::string allowed;
    for (auto& [v, n] : names) {
      if (text == n) return v;
      allowed += (allowed.empty() ? "" : ", ") + std::string(n);
    }
    fail(field, "'" + text + "' is not one of " + allowed);
  }
};

const EnumNames<Arch> kArch{{{Arch::phase7, "phase7"}, {Arch::phase8, "phase8"}, {Arch::gpt, "gpt"}}};
const EnumNames<AttnMode> kAttnMode{{{AttnMode::block, "block"}, {AttnMode::sliding, "sliding"}}};
const EnumNames<PosEmbedding> kPos{
    {{PosEmbedding::alibi, "alibi"}, {PosEmbedding::learned, "learned"}, {PosEmbedding::none, "none"}}};
const EnumNames<EmbeddingKind> kEmbedding{{{EmbeddingKind::htt, "htt"}, {EmbeddingKind::dense, "dense"}}};
const EnumNames<FfnKind> kFfn{{{FfnKind::none, "none"}, {FfnKind::lowrank, "lowrank"}, {FfnKind::dense, "dense"}}};

// One entry per config field: how to read it into JSON and how to set it from JSON with a type check.
struct Field {
  const char* name;
  std::function<json(const ModelConfig&)> get;
  std::function<void(ModelConfig&, const json&)> set;
};

Field int_field(const char* name, int ModelConfig::*member) {
  return {name, [member](const ModelConfig& c) { return json(c.*member); },
          [name, member](ModelConfig& c, const json& v) {
            if (!v.is_number_integer()) fail(name, "expected an integer, got " + v.dump());
            const auto x = v.get<long long>();
            if (x < -(1LL << 31) || x >= (1LL << 31)) fail(name, v.dump() + " is out of range");
            c.*member = int(x);
          }};
}

Field real_field(const char* name, double ModelConfig::*member) {
  return {name, [member](const ModelConfig& c) { return json(c.*member); },
          [name, member](ModelConfig& c, const json& v) {
            if (!v.is_number()) fail(name, "expected a number, got " + v.dump());
            c.*member = v.get<double>();
          }};
}

Field bool_field(const char* name, bool ModelConfig::*member) {
  return {name, [member](const ModelConfig& c) { return json(c.*member); },
          [name, member](ModelConfig& c, const json& v) {
            if (!v.is_boolean()) fail(name, "expected true or false, got " + v.dump());
            c.*member = v.get<bool>();
          }};
}

template <typename E>
Field enum_field(const char* name, E ModelConfig::*member, const EnumNames<E>& names) {
  return {name, [member, &names](const ModelConfig& c) { return json(names.name(c.*member)); },
          [name, member, &names](ModelConfig& c, const json& v) {
            if (!v.is_string()) fail(name, "expected a string, got " + v.dump());
            c.*member = names.parse(name, v.get<std::string>());
          }};
}

const std::vector<Field>& fields() {
  static const std::vector<Field> table = {
      enum_field("arch", &ModelConfig::arch, kArch),
      int_field("d_model", &ModelConfig::d_model),
      int_field("n_layers", &ModelConfig::n_layers),
      int_field("n_heads", &ModelConfig::n_heads),
      int_field("vocab_size", &ModelConfig::vocab_size),
      enum_field("embedding", &ModelConfig::embedding, kEmbedding),
      int_field("htt_rank", &ModelConfig::htt_rank),
      int_field("ssm_rank", &ModelConfig::ssm_rank),
      int_field("window", &ModelConfig::window),
      enum_field("attn_mode", &ModelConfig::attn_mode, kAttnMode),
      enum_field("pos_embedding", &ModelConfig::pos_embedding, kPos),
      int_field("max_seq", &ModelConfig::max_seq),
      enum_field("ffn", &ModelConfig::ffn, kFfn),
      int_field("ffn_rank", &ModelConfig::ffn_rank),
      real_field("j_max", &ModelConfig::j_max),
      bool_field("bk_hopping", &ModelConfig::bk_hopping),
      bool_field("key_gate", &ModelConfig::key_gate),
      bool_field("linear_attn", &ModelConfig::linear_attn),
      bool_field("rank_mask", &ModelConfig::rank_mask),
      bool_field("curvature_mix", &ModelConfig::curvature_mix),
  };
  return table;
}

const Field& find_field(const std::string& name) {
  for (const Field& f : fields())
    if (name == f.name) return f;
  std::string known;
  for (const Field& f : fields()) known += (known.empty() ? "" : ", ") + std::string(f.name);
  throw std::invalid_argument("config: unknown field '" + name + "' (known fields: " + known + ")");
}

ModelConfig make(Arch arch, int D, int L, int H, int vocab, EmbeddingKind emb, int htt_rank, int ssm_rank, int window,
                 AttnMode mode, PosEmbedding pos, FfnKind ffn, int ffn_rank) {
  ModelConfig c;
  c.arch = arch;
  c.d_model = D;
  c.n_layers = L;
  c.n_heads = H;
  c.vocab_size = vocab;
  c.embedding = emb;
  c.htt_rank = htt_rank;
  c.ssm_rank = ssm_rank;
  c.window = window;
  c.attn_mode = mode;
  c.pos_embedding = pos;
  c.max_seq = 1024;
  c.ffn = ffn;
  c.ffn_rank = ffn_rank;
  return c;
}

}  // namespace

const std::vector<Preset>& presets() {
  using A = Arch;
  using M = AttnMode;
  using P = PosEmbedding;
  using E = EmbeddingKind;
  using F = FfnKind;
  static const std::vector<Preset> table = {
      {"phase7-small", "Phase 7, D=512, 8 layers, GPT-2 vocabulary (upstream's small model, working)",
       make(A::phase7, 512, 8, 8, 50257, E::htt, 16, 32, 64, M::block, P::learned, F::none, 64), {1e-3, 256, 8}},
      {"phase7-medium", "Phase 7, D=1024, 16 layers, GPT-2 vocabulary",
       make(A::phase7, 1024, 16, 16, 50257, E::htt, 32, 32, 64, M::block, P::learned, F::none, 64), {6e-4, 512, 4}},
      {"phase8-small", "Phase 8, D=512, 8 layers, GPT-2 vocabulary, every extension on the path to the logits",
       make(A::phase8, 512, 8, 8, 50257, E::htt, 16, 32, 64, M::sliding, P::alibi, F::lowrank, 64), {1e-3, 256, 8}},
      {"phase8-medium", "Phase 8, D=1024, 16 layers, GPT-2 vocabulary",
       make(A::phase8, 1024, 16, 16, 50257, E::htt, 32, 32, 64, M::sliding, P::alibi, F::lowrank, 64), {6e-4, 512, 4}},
      {"demo", "Phase 8, D=128, 4 layers, byte vocabulary: trains on a CPU in minutes (README's main job)",
       make(A::phase8, 128, 4, 4, 256, E::dense, 16, 16, 64, M::sliding, P::alibi, F::lowrank, 32), {3e-3, 128, 16}},
      {"tiny", "Phase 8, D=64, 2 layers: for tests and smoke runs",
       make(A::phase8, 64, 2, 4, 256, E::htt, 8, 8, 16, M::sliding, P::alibi, F::lowrank, 16), {3e-3, 64, 8}},
  };
  return table;
}

const Preset& find_preset(const std::string& name) {
  std::string known;
  for (const Preset& p : presets()) {
    if (p.name == name) return p;
    known += (known.empty() ? "" : ", ") + p.name;
  }
  throw std::invalid_argument("unknown preset '" + name + "' (known presets: " + known + ")");
}

void validate(const ModelConfig& c) {
  auto positive = [](const char* field, long long v) {
    if (v < 1) fail(field, "must be at least 1, got " + std::to_string(v));
  };
  positive("d_model", c.d_model);
  positive("n_layers", c.n_layers);
  positive("n_heads", c.n_heads);
  if (c.d_model % c.n_heads != 0)
    fail("n_heads", "d_model = " + std::to_string(c.d_model) + " is not divisible by n_heads = " +
                        std::to_string(c.n_heads));
  if (c.vocab_size < 2) fail("vocab_size", "must be at least 2, got " + std::to_string(c.vocab_size));
  if (c.embedding == EmbeddingKind::htt) positive("htt_rank", c.htt_rank);
  positive("window", c.window);
  if (c.pos_embedding == PosEmbedding::learned) positive("max_seq", c.max_seq);
  if (c.j_max <= 0) fail("j_max", "must be positive");
  if (c.arch == Arch::gpt) {
    if (c.ffn != FfnKind::dense) fail("ffn", "arch = gpt uses the dense MLP: set ffn=dense");
    return;
  }
  if (c.d_model < 4) fail("d_model", "must be at least 4 (the SSM gate MLP has d_model/4 hidden units)");
  positive("ssm_rank", c.ssm_rank);
  if (c.arch == Arch::phase8 && c.rank_mask && c.ssm_rank <= kSsmRankMin)
    fail("ssm_rank", "must exceed r_min = " + std::to_string(kSsmRankMin) + " for the rank mask (or set rank_mask=false)");
  if (c.ffn == FfnKind::dense) fail("ffn", "phase7/phase8 blocks use ffn=lowrank or ffn=none");
  if (c.ffn == FfnKind::lowrank) positive("ffn_rank", c.ffn_rank);
}

json to_json(const ModelConfig& c) {
  json j = json::object();
  for (const Field& f : fields()) j[f.name] = f.get(c);
  return j;
}

ModelConfig model_config_from_json(const json& j) {
  if (!j.is_object()) throw std::invalid_argument("config: expected a JSON object, got " + j.dump());
  ModelConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) find_field(it.key()).set(c, it.value());
  return c;
}

void apply_override(ModelConfig& c, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw std::invalid_argument("--set: expected key=value, got '" + assignment + "'");
  const std::string key = assignment.substr(0, eq), text = assignment.substr(eq + 1);
  const Field& field = find_field(key);
  // The value's JSON type comes from its spelling: true/false, integers, reals, else a string.
  json value = json::parse(text, nullptr, false);
  if (value.is_discarded() || value.is_object() || value.is_array()) value = text;
  field.set(c, value);
}

std::string to_string(Arch a) { return kArch.name(a); }
std::string to_string(AttnMode m) { return kAttnMode.name(m); }
std::string to_string(PosEmbedding p) { return kPos.name(p); }
std::string to_string(EmbeddingKind e) { return kEmbedding.name(e); }
std::string to_string(FfnKind f) { return kFfn.name(f); }

}  // namespace muse
