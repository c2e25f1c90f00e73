// Where each parameter tensor of a model lives in the flat parameter array (offsets into the table),
// and how it is initialised (SPEC §2.10). Built once from the config; absent tensors hold kAbsent.
#pragma once
#include <cstddef>
#include <vector>

#include "model/config.h"
#include "model/params.h"
#include "ops/ssm.h"

namespace muse {

inline constexpr size_t kAbsent = size_t(-1);

// Offsets of one block's tensors. Phase 7/8 blocks use the MUSE fields, gpt blocks the gpt ones.
struct BlockLayout {
  size_t ln_gain = kAbsent, ln_bias = kAbsent;
  // BK core (§2.4)
  size_t bk_w_v = kAbsent, bk_b_v = kAbsent, bk_w_J = kAbsent, bk_b_J = kAbsent, bk_eps_p = kAbsent, bk_E0 = kAbsent;
  // attention projections (shared by the local and linear paths, and by gpt)
  size_t w_q = kAbsent, w_k = kAbsent, w_v = kAbsent, w_o = kAbsent;
  size_t beta = kAbsent, c_raw = kAbsent;                    // hyperbolic temperature per head, curvature
  size_t key_gate_w = kAbsent, key_gate_b = kAbsent;         // μ = σ(w_G·F + b_G) [H, 3], [H]
  // AR-SSM (§2.6)
  size_t conv = kAbsent;                                     // [3, D]
  size_t ssm_w1 = kAbsent, ssm_b1 = kAbsent, ssm_w2 = kAbsent, ssm_b2 = kAbsent;
  size_t ssm_w_u = kAbsent, ssm_w_v = kAbsent, ssm_w_o = kAbsent, ssm_b_o = kAbsent;
  size_t ssm_ell = kAbsent;                                  // decay logits (Phase 8)
  size_t rank_w1 = kAbsent, rank_b1 = kAbsent, rank_w2 = kAbsent, rank_b2 = kAbsent;  // MLP_r 1→32→1
  size_t pi_w = kAbsent, pi_b = kAbsent;                     // physics gate σ(w_π·F + b_π)
  // hybrid gate: Phase 8 ξ = σ(w_ξ·F + b_ξ); Phase 7 ξ = σ(s·|Im g|)
  size_t xi_w = kAbsent, xi_b = kAbsent, xi_s = kAbsent;
  size_t ln_h_gain = kAbsent, ln_h_bias = kAbsent;
  // low-rank FFN (§2.9) or the gpt MLP, each behind its own LayerNorm
  size_t ln_ffn_gain = kAbsent, ln_ffn_bias = kAbsent;
  size_t ffn_v1 = kAbsent, ffn_u1 = kAbsent, ffn_b1 = kAbsent, ffn_v2 = kAbsent, ffn_u2 = kAbsent, ffn_b2 = kAbsent;
  size_t mlp_w1 = kAbsent, mlp_b1 = kAbsent, mlp_w2 = kAbsent, mlp_b2 = kAbsent;
};

struct ModelLayout {
  // embedding: dense table [Vp, D] or HTT cores
  size_t embed = kAbsent;
  size_t htt_a = kAbsent, htt_b = kAbsent, htt_theta = kAbsent;
  size_t positions = kAbsent;  // [max_seq, D]
  std::vector<BlockLayout> blocks;
  size_t final_gain = kAbsent, final_bias = kAbsent;
};

// Registers every tensor of `config` in `table` (names like "blocks.3.attn.w_q") and returns the offsets.
ModelLayout build_layout(const ModelConfig& config, ParamTable& table);

}  // namespace muse
