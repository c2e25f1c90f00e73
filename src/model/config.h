// Model configuration: every architectural field of SPEC §2, the presets of §2.11, JSON round trip,
// `--set key=value` overrides and validation that names the offending field.
#pragma once
#include <nlohmann/json_fwd.hpp>

#include <string>
#include <vector>

namespace muse {

enum class Arch { phase7, phase8, gpt };
enum class AttnMode { block, sliding };
enum class PosEmbedding { alibi, learned, none };
enum class EmbeddingKind { htt, dense };
enum class FfnKind { none, lowrank, dense };

struct ModelConfig {
  Arch arch = Arch::phase8;
  int d_model = 64;
  int n_layers = 2;
  int n_heads = 4;
  int vocab_size = 256;
  EmbeddingKind embedding = EmbeddingKind::dense;
  int htt_rank = 8;
  int ssm_rank = 8;
  int window = 16;
  AttnMode attn_mode = AttnMode::sliding;
  PosEmbedding pos_embedding = PosEmbedding::alibi;
  int max_seq = 1024;       // N_max of learned positions (unused otherwise)
  FfnKind ffn = FfnKind::lowrank;
  int ffn_rank = 16;        // ρ of the low-rank FFN
  double j_max = 1.0;       // hopping amplitude bound of the BK core
  // Phase 8 ablation switches (SPEC §2.8); ignored by phase7 and gpt.
  bool bk_hopping = true;
  bool key_gate = true;
  bool linear_attn = true;
  bool rank_mask = true;
  bool curvature_mix = true;

  int head_dim() const { return d_model / n_heads; }
  // Vocabulary rounded up to a multiple of 128 (padded rows are zero and masked).
  int padded_vocab() const { return (vocab_size + 127) / 128 * 128; }
};

// Training hyper-parameters that a preset sets (SPEC §2.10); the trainer owns the rest.
struct TrainDefaults {
  double lr = 3e-3;
  int seq_len = 128;
  int batch = 16;
};

struct Preset {
  std::string name;
  std::string summary;
  ModelConfig model;
  TrainDefaults train;
};

const std::vector<Preset>& presets();
// Throws std::invalid_argument listing the known presets when the name is unknown.
const Preset& find_preset(const std::string& name);

// Throws std::invalid_argument("config: <field>: <what is wrong>") on the first invalid field.
void validate(const ModelConfig& config);

nlohmann::json to_json(const ModelConfig& config);
// Unknown keys and wrongly typed values are refused with the key's name.
ModelConfig model_config_from_json(const nlohmann::json& j);

// Applies one "key=value" override (e.g. "window=32", "rank_mask=false", "arch=gpt").
void apply_override(ModelConfig& config, const std::string& assignment);

std::string to_string(Arch a);
std::string to_string(AttnMode m);
std::string to_string(PosEmbedding p);
std::string to_string(EmbeddingKind e);
std::string to_string(FfnKind f);

}  // namespace muse
