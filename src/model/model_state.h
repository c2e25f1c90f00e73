// Activations of the last forward (kept for the backward) and gradient scratch, per block and for the
// whole model. Internal to model/*.cpp.
#pragma once
#include <vector>

#include "model/layout.h"
#include "ops/ssm.h"

namespace muse {

template <typename T>
struct BlockActs {
  std::vector<T> h_in;                        // [rows, D] block input (the residual stream)
  std::vector<T> u, ln_mean, ln_rstd, delta;  // LN(h), its statistics, radius δ = 2‖h‖/√D
  std::vector<T> g, F, bk_v, bk_J, bk_J2;     // BK: g [rows, 2], F [rows, 3], potentials and hoppings
  std::vector<T> q, k, v;                     // [rows, D]
  std::vector<T> mu, log_mu;                  // key gate [rows, H]
  std::vector<T> o_loc, lse;                  // local (or gpt causal) attention output, softmax statistics
  std::vector<T> o_lin, zeta;                 // linear attention output and denominators
  std::vector<T> lin_S, lin_z;                // linear attention state after the last position (decode hand-over)
  std::vector<T> mixed;                       // attention output before W_o
  std::vector<T> y_att, y_glob;               // the two branches [rows, D]
  SsmSaved<T> ssm_saved;                      // AR-SSM activations
  std::vector<T> xi;                          // hybrid gate [rows]
  std::vector<T> mix_capped, mix_mean, mix_rstd;
  std::vector<T> h_mid;                       // after the mix residual: input of the FFN sub-block
  std::vector<T> u2, ln2_mean, ln2_rstd;      // LN_ffn (or gpt LN_mlp)
  std::vector<T> ffn_low1, ffn_pre, ffn_hidden, ffn_low2;
};

template <typename T>
struct ModelState {
  ModelLayout layout;
  int B = 0, N = 0;
  std::vector<int32_t> ids;
  std::vector<T> E;            // materialised embedding / head matrix [Vp, D] (HTT), else unused
  std::vector<T> htt_saved;    // HTT normalised cores for the backward
  std::vector<T> dE;           // gradient of E (HTT only: contracted into the cores)
  std::vector<BlockActs<T>> blocks;
  std::vector<T> h_final, final_mean, final_rstd, x_final;  // last residual, LN_final stats, LN_final(h)
  std::vector<T> logits;       // [rows, Vp]
  std::vector<T> dlogits;      // filled by backward()
  std::vector<int32_t> targets;
  std::vector<T> row_loss, row_lse;  // cross-entropy per row, and the log-sum-exp saved for the backward
  double smoothing = 0;
  int counted = 0;             // targets that are not ignored
  // gradient scratch for the backward, [rows, D] unless noted
  std::vector<T> dh, du, dq, dk, dv, dmixed, do_loc, do_lin, dy_att, dy_glob, du2, dffn;
  std::vector<T> dxi, dF, dg, dmu, dlog_mu, ddelta;
};

}  // namespace muse
