#include "model/layout.h"

#include <cmath>
#include <string>

namespace muse {

namespace {

int ceil_sqrt(int n) {
  int r = int(std::sqrt(double(n)));
  while (r * r < n) ++r;
  return r;
}

}  // namespace

ModelLayout build_layout(const ModelConfig& c, ParamTable& t) {
  const int64_t D = c.d_model, H = c.n_heads, R = c.ssm_rank, Vp = c.padded_vocab();
  ModelLayout m;
  if (c.embedding == EmbeddingKind::dense) {
    m.embed = t.add("embed.weight", {Vp, D}, true);
  } else {
    const int v1 = ceil_sqrt(c.vocab_size), v2 = (c.vocab_size + v1 - 1) / v1;
    const int d1 = ceil_sqrt(c.d_model), d2 = (c.d_model + d1 - 1) / d1;
    m.htt_a = t.add("embed.htt_a", {v1, c.htt_rank, d1}, false);
    m.htt_b = t.add("embed.htt_b", {v2, c.htt_rank, d2}, false);
    m.htt_theta = t.add("embed.htt_theta", {c.htt_rank}, false);
  }
  if (c.pos_embedding == PosEmbedding::learned) m.positions = t.add("embed.positions", {c.max_seq, D}, true);

  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blocks." + std::to_string(l) + ".";
    BlockLayout b;
    b.ln_gain = t.add(p + "ln.gain", {D}, false);
    b.ln_bias = t.add(p + "ln.bias", {D}, false);
    if (c.arch == Arch::gpt) {
      b.w_q = t.add(p + "attn.w_q", {D, D}, true);
      b.w_k = t.add(p + "attn.w_k", {D, D}, true);
      b.w_v = t.add(p + "attn.w_v", {D, D}, true);
      b.w_o = t.add(p + "attn.w_o", {D, D}, true);
      b.ln_ffn_gain = t.add(p + "ln_mlp.gain", {D}, false);
      b.ln_ffn_bias = t.add(p + "ln_mlp.bias", {D}, false);
      b.mlp_w1 = t.add(p + "mlp.w1", {4 * D, D}, true);
      b.mlp_b1 = t.add(p + "mlp.b1", {4 * D}, false);
      b.mlp_w2 = t.add(p + "mlp.w2", {D, 4 * D}, true);
      b.mlp_b2 = t.add(p + "mlp.b2", {D}, false);
      m.blocks.push_back(b);
      continue;
    }
    const bool phase8 = c.arch == Arch::phase8;
    const bool hopping = phase8 && c.bk_hopping;
    b.bk_w_v = t.add(p + "bk.w_v", {D}, false);
    b.bk_b_v = t.add(p + "bk.b_v", {1}, false);
    if (hopping) {
      b.bk_w_J = t.add(p + "bk.w_J", {2 * D}, false);
      b.bk_b_J = t.add(p + "bk.b_J", {1}, false);
    }
    b.bk_eps_p = t.add(p + "bk.eps_p", {1}, false);
    // Without hopping E0 only shifts a_t, which b_v already does: it exists only with hopping.
    if (hopping) b.bk_E0 = t.add(p + "bk.E0", {1}, false);

    b.w_q = t.add(p + "attn.w_q", {D, D}, true);
    b.w_k = t.add(p + "attn.w_k", {D, D}, true);
    b.w_v = t.add(p + "attn.w_v", {D, D}, true);
    b.w_o = t.add(p + "attn.w_o", {D, D}, true);
    b.beta = t.add(p + "attn.beta", {H}, false);
    b.c_raw = t.add(p + "attn.c_raw", {1}, false);
    if (phase8 && c.key_gate) {
      b.key_gate_w = t.add(p + "attn.key_gate_w", {H, 3}, false);
      b.key_gate_b = t.add(p + "attn.key_gate_b", {H}, false);
    }

    b.conv = t.add(p + "ssm.conv", {3, D}, false);
    b.ssm_w1 = t.add(p + "ssm.gate_w1", {D / 4, D}, true);
    b.ssm_b1 = t.add(p + "ssm.gate_b1", {D / 4}, false);
    b.ssm_w2 = t.add(p + "ssm.gate_w2", {R, D / 4}, true);
    b.ssm_b2 = t.add(p + "ssm.gate_b2", {R}, false);
    b.ssm_w_u = t.add(p + "ssm.w_u", {R, D}, true);
    b.ssm_w_v = t.add(p + "ssm.w_v", {R, D}, true);
    b.ssm_w_o = t.add(p + "ssm.w_o", {D, R}, true);
    b.ssm_b_o = t.add(p + "ssm.b_o", {D}, false);
    if (phase8) {
      b.ssm_ell = t.add(p + "ssm.decay_logit", {R}, false);
      if (c.rank_mask) {
        b.rank_w1 = t.add(p + "ssm.rank_w1", {kSsmRankHidden}, false);
        b.rank_b1 = t.add(p + "ssm.rank_b1", {kSsmRankHidden}, false);
        b.rank_w2 = t.add(p + "ssm.rank_w2", {kSsmRankHidden}, false);
        b.rank_b2 = t.add(p + "ssm.rank_b2", {1}, false);
        b.pi_w = t.add(p + "ssm.physics_gate_w", {3}, false);
        b.pi_b = t.add(p + "ssm.physics_gate_b", {1}, false);
      }
      b.xi_w = t.add(p + "mix.gate_w", {1, 3}, false);
      b.xi_b = t.add(p + "mix.gate_b", {1}, false);
    } else {
      b.xi_s = t.add(p + "mix.gate_sensitivity", {1}, false);
    }
    b.ln_h_gain = t.add(p + "ln_h.gain", {D}, false);
    b.ln_h_bias = t.add(p + "ln_h.bias", {D}, false);

    if (c.ffn == FfnKind::lowrank) {
      const int64_t rho = c.ffn_rank;
      b.ln_ffn_gain = t.add(p + "ln_ffn.gain", {D}, false);
      b.ln_ffn_bias = t.add(p + "ln_ffn.bias", {D}, false);
      b.ffn_v1 = t.add(p + "ffn.v1", {rho, D}, true);
      b.ffn_u1 = t.add(p + "ffn.u1", {4 * D, rho}, true);
      b.ffn_b1 = t.add(p + "ffn.b1", {4 * D}, false);
      b.ffn_v2 = t.add(p + "ffn.v2", {rho, 4 * D}, true);
      b.ffn_u2 = t.add(p + "ffn.u2", {D, rho}, true);
      b.ffn_b2 = t.add(p + "ffn.b2", {D}, false);
    }
    m.blocks.push_back(b);
  }
  m.final_gain = t.add("final_ln.gain", {D}, false);
  m.final_bias = t.add("final_ln.bias", {D}, false);
  return m;
}

}  // namespace muse
