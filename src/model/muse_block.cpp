#include "model/muse_block.h"

#include <algorithm>
#include <cmath>

#include "common/math.h"
#include "ops/bk.h"
#include "ops/causal_attn.h"
#include "ops/ffn.h"
#include "ops/hybrid.h"
#include "ops/layernorm.h"
#include "ops/linear.h"
#include "ops/linear_attn.h"
#include "ops/local_attn.h"
#include "ops/ssm.h"

namespace muse {

namespace {

template <typename T>
void resize(std::vector<T>& v, size_t n) {
  if (v.size() != n) v.resize(n);
}

template <typename T>
void zeroed(std::vector<T>& v, size_t n) {
  v.assign(n, T(0));
}

template <typename T>
const T* at(const T* base, size_t offset) {
  return offset == kAbsent ? nullptr : base + offset;
}
template <typename T>
T* at(T* base, size_t offset) {
  return offset == kAbsent ? nullptr : base + offset;
}

// The BK and AR-SSM parameter and gradient structs share their field names, so one function fills either
// kind from the flat array (parameters or gradients) at the layout's offsets.
template <class Fields, class Ptr>
Fields bk_fields(const BlockLayout& b, Ptr base) {
  Fields f;
  f.w_v = at(base, b.bk_w_v);
  f.b_v = at(base, b.bk_b_v);
  f.w_J = at(base, b.bk_w_J);
  f.b_J = at(base, b.bk_b_J);
  f.eps_p = at(base, b.bk_eps_p);
  f.E0 = at(base, b.bk_E0);
  return f;
}

template <class Fields, class Ptr>
Fields ssm_fields(const BlockLayout& b, Ptr base) {
  Fields f;
  f.conv = at(base, b.conv);
  f.W1 = at(base, b.ssm_w1);
  f.b1 = at(base, b.ssm_b1);
  f.W2 = at(base, b.ssm_w2);
  f.b2 = at(base, b.ssm_b2);
  f.WU = at(base, b.ssm_w_u);
  f.WV = at(base, b.ssm_w_v);
  f.WO = at(base, b.ssm_w_o);
  f.bO = at(base, b.ssm_b_o);
  f.ell = at(base, b.ssm_ell);
  f.r_w1 = at(base, b.rank_w1);
  f.r_b1 = at(base, b.rank_b1);
  f.r_w2 = at(base, b.rank_w2);
  f.r_b2 = at(base, b.rank_b2);
  f.w_pi = at(base, b.pi_w);
  f.b_pi = at(base, b.pi_b);
  return f;
}

}  // namespace

LocalAttnConfig attn_config(const ModelConfig& c, int B, int N) {
  LocalAttnConfig cfg;
  cfg.B = B;
  cfg.N = N;
  cfg.H = c.n_heads;
  cfg.D = c.d_model;
  cfg.window = c.window;
  cfg.sliding = c.attn_mode == AttnMode::sliding;
  cfg.alibi = c.pos_embedding == PosEmbedding::alibi;
  return cfg;
}

template <typename T>
BkParams<T> bk_params(const BlockLayout& b, const T* p, const ModelConfig& c) {
  BkParams<T> bp = bk_fields<BkParams<T>>(b, p);
  bp.j_max = T(c.j_max);
  return bp;
}

template <typename T>
SsmParams<T> ssm_params(const BlockLayout& b, const T* p) {
  return ssm_fields<SsmParams<T>>(b, p);
}

template <typename T>
SsmGrads<T> ssm_grads(const BlockLayout& b, T* g) {
  return ssm_fields<SsmGrads<T>>(b, g);
}

template <typename T>
BkGrads<T> bk_grads(const BlockLayout& b, T* g) {
  return bk_fields<BkGrads<T>>(b, g);
}

SsmConfig ssm_config(const ModelConfig& c, int B, int N) {
  SsmConfig sc;
  sc.B = B;
  sc.N = N;
  sc.D = c.d_model;
  sc.R = c.ssm_rank;
  sc.decay = c.arch == Arch::phase8;
  sc.rank_mask = c.arch == Arch::phase8 && c.rank_mask;
  return sc;
}

template <typename T>
LowRankFfnParams<T> ffn_params(const BlockLayout& b, const T* p) {
  return {p + b.ffn_v1, p + b.ffn_u1, p + b.ffn_b1, p + b.ffn_v2, p + b.ffn_u2, p + b.ffn_b2};
}
template <typename T>
LowRankFfnGrads<T> ffn_grads(const BlockLayout& b, T* g) {
  return {g + b.ffn_v1, g + b.ffn_u1, g + b.ffn_b1, g + b.ffn_v2, g + b.ffn_u2, g + b.ffn_b2};
}
template <typename T>
DenseMlpParams<T> mlp_params(const BlockLayout& b, const T* p) {
  return {p + b.mlp_w1, p + b.mlp_b1, p + b.mlp_w2, p + b.mlp_b2};
}
template <typename T>
DenseMlpGrads<T> mlp_grads(const BlockLayout& b, T* g) {
  return {g + b.mlp_w1, g + b.mlp_b1, g + b.mlp_w2, g + b.mlp_b2};
}

namespace {

// ---- the gpt baseline block: h += W_o·attn(LN(h)); h += MLP(LN(h)) ---------------------------------

template <typename T>
void gpt_block_forward(T* h_out, BlockActs<T>& a, const BlockLayout& b, const T* p, const ModelConfig& c, int B,
                       int N) {
  const int D = c.d_model, H = c.n_heads, F = ffn_hidden(D);
  const size_t rows = size_t(B) * N, RD = rows * D;
  resize(a.u, RD), resize(a.ln_mean, rows), resize(a.ln_rstd, rows);
  layernorm_forward<T>(a.u.data(), a.ln_mean.data(), a.ln_rstd.data(), nullptr, a.h_in.data(), p + b.ln_gain,
                       p + b.ln_bias, int(rows), D);
  resize(a.q, RD), resize(a.k, RD), resize(a.v, RD);
  linear_forward<T>(a.q.data(), a.u.data(), p + b.w_q, nullptr, int(rows), D, D);
  linear_forward<T>(a.k.data(), a.u.data(), p + b.w_k, nullptr, int(rows), D, D);
  linear_forward<T>(a.v.data(), a.u.data(), p + b.w_v, nullptr, int(rows), D, D);
  resize(a.o_loc, RD), resize(a.lse, rows * H);
  causal_attn_forward<T>(a.o_loc.data(), a.lse.data(), a.q.data(), a.k.data(), a.v.data(), B, N, H, D,
                         c.pos_embedding == PosEmbedding::alibi);
  resize(a.y_att, RD), resize(a.h_mid, RD);
  linear_forward<T>(a.y_att.data(), a.o_loc.data(), p + b.w_o, nullptr, int(rows), D, D);
  for (size_t i = 0; i < RD; ++i) a.h_mid[i] = a.h_in[i] + a.y_att[i];

  resize(a.u2, RD), resize(a.ln2_mean, rows), resize(a.ln2_rstd, rows);
  layernorm_forward<T>(a.u2.data(), a.ln2_mean.data(), a.ln2_rstd.data(), nullptr, a.h_mid.data(), p + b.ln_ffn_gain,
                       p + b.ln_ffn_bias, int(rows), D);
  resize(a.ffn_pre, rows * F), resize(a.ffn_hidden, rows * F);
  dense_mlp_forward<T>(h_out, {a.ffn_pre.data(), a.ffn_hidden.data()}, a.u2.data(), mlp_params(b, p), int(rows), D);
  for (size_t i = 0; i < RD; ++i) h_out[i] += a.h_mid[i];
}

template <typename T>
void gpt_block_backward(T* dh, ModelState<T>& s, BlockActs<T>& a, const BlockLayout& b, const T* p, T* g,
                        const ModelConfig& c) {
  const int D = c.d_model, H = c.n_heads, B = s.B, N = s.N;
  const size_t rows = size_t(B) * N, RD = rows * D;
  // MLP branch: dh flows to h_mid unchanged, plus through LN_mlp and the MLP.
  zeroed(s.du2, RD);
  dense_mlp_backward<T>(s.du2.data(), mlp_grads(b, g), dh, {a.ffn_pre.data(), a.ffn_hidden.data()}, a.u2.data(),
                        mlp_params(b, p), int(rows), D);
  layernorm_backward<T>(dh, g + b.ln_ffn_gain, g + b.ln_ffn_bias, s.du2.data(), nullptr, a.h_mid.data(),
                        p + b.ln_ffn_gain, a.ln2_mean.data(), a.ln2_rstd.data(), int(rows), D);
  // Attention branch.
  zeroed(s.dmixed, RD);
  linear_backward<T>(s.dmixed.data(), g + b.w_o, nullptr, dh, a.o_loc.data(), p + b.w_o, int(rows), D, D);
  zeroed(s.dq, RD), zeroed(s.dk, RD), zeroed(s.dv, RD);
  causal_attn_backward<T>(s.dq.data(), s.dk.data(), s.dv.data(), s.dmixed.data(), a.q.data(), a.k.data(), a.v.data(),
                          a.o_loc.data(), a.lse.data(), B, N, H, D, c.pos_embedding == PosEmbedding::alibi);
  zeroed(s.du, RD);
  linear_backward<T>(s.du.data(), g + b.w_q, nullptr, s.dq.data(), a.u.data(), p + b.w_q, int(rows), D, D);
  linear_backward<T>(s.du.data(), g + b.w_k, nullptr, s.dk.data(), a.u.data(), p + b.w_k, int(rows), D, D);
  linear_backward<T>(s.du.data(), g + b.w_v, nullptr, s.dv.data(), a.u.data(), p + b.w_v, int(rows), D, D);
  layernorm_backward<T>(dh, g + b.ln_gain, g + b.ln_bias, s.du.data(), nullptr, a.h_in.data(), p + b.ln_gain,
                        a.ln_mean.data(), a.ln_rstd.data(), int(rows), D);
}

// ---- the MUSE block (Phase 7 and Phase 8) -------------------------------------------------------------

template <typename T>
void muse_block_forward(T* h_out, BlockActs<T>& a, const BlockLayout& b, const T* p, const ModelConfig& c, int B,
                        int N) {
  const bool phase8 = c.arch == Arch::phase8;
  const bool hopping = b.bk_w_J != kAbsent, gate = b.key_gate_w != kAbsent;
  const bool use_linear = phase8 && c.linear_attn;
  const int D = c.d_model, H = c.n_heads;
  const size_t rows = size_t(B) * N, RD = rows * D;

  resize(a.u, RD), resize(a.ln_mean, rows), resize(a.ln_rstd, rows), resize(a.delta, rows);
  layernorm_forward<T>(a.u.data(), a.ln_mean.data(), a.ln_rstd.data(), a.delta.data(), a.h_in.data(), p + b.ln_gain,
                       p + b.ln_bias, int(rows), D);

  resize(a.g, rows * 2), resize(a.F, rows * 3), resize(a.bk_v, rows), resize(a.bk_J, rows), resize(a.bk_J2, rows);
  const BkSaved<T> bk_saved{a.bk_v.data(), a.bk_J.data(), a.bk_J2.data()};
  bk_layer_forward<T>(a.g.data(), a.F.data(), bk_saved, a.u.data(), bk_params(b, p, c), hopping, B, N, D);

  resize(a.q, RD), resize(a.k, RD), resize(a.v, RD);
  linear_forward<T>(a.q.data(), a.u.data(), p + b.w_q, nullptr, int(rows), D, D);
  linear_forward<T>(a.k.data(), a.u.data(), p + b.w_k, nullptr, int(rows), D, D);
  linear_forward<T>(a.v.data(), a.u.data(), p + b.w_v, nullptr, int(rows), D, D);

  if (gate) {
    resize(a.mu, rows * H), resize(a.log_mu, rows * H);
    bk_gate_forward<T>(a.mu.data(), a.F.data(), p + b.key_gate_w, p + b.key_gate_b, int(rows), H);
    for (size_t i = 0; i < rows * H; ++i) a.log_mu[i] = std::log(a.mu[i]);
  }
  const T c_val = curvature(p[b.c_raw]);
  resize(a.o_loc, RD), resize(a.lse, rows * H);
  local_attn_forward<T>(a.o_loc.data(), a.lse.data(), a.q.data(), a.k.data(), a.v.data(), c_val, p + b.beta,
                        gate ? a.log_mu.data() : nullptr, attn_config(c, B, N));
  const T* mixed = a.o_loc.data();
  if (use_linear) {
    resize(a.o_lin, RD), resize(a.zeta, rows * H), resize(a.mixed, RD);
    resize(a.lin_S, size_t(B) * H * (D / H) * (D / H)), resize(a.lin_z, size_t(B) * D);
    linear_attn_forward<T>(a.o_lin.data(), a.zeta.data(), a.lin_S.data(), a.lin_z.data(), a.q.data(), a.k.data(),
                           a.v.data(), gate ? a.mu.data() : nullptr, B, N, D, H);
    // Without the curvature mix the paths are averaged: α(0.55) = 1/2 exactly.
    const T mix_c = c.curvature_mix ? c_val : T(kCurvatureMixCentre);
    curvature_mix_forward<T>(a.mixed.data(), a.o_loc.data(), a.o_lin.data(), mix_c, int(rows), D);
    mixed = a.mixed.data();
  }
  resize(a.y_att, RD);
  linear_forward<T>(a.y_att.data(), mixed, p + b.w_o, nullptr, int(rows), D, D);

  resize(a.y_glob, RD);
  const SsmConfig sc = ssm_config(c, B, N);
  ssm_forward<T>(a.y_glob.data(), a.ssm_saved, a.u.data(), a.delta.data(), a.F.data(), ssm_params(b, p), sc);

  resize(a.xi, rows);
  if (phase8)
    bk_gate_forward<T>(a.xi.data(), a.F.data(), p + b.xi_w, p + b.xi_b, int(rows), 1);
  else
    phase7_gate_forward<T>(a.xi.data(), a.g.data(), p[b.xi_s], int(rows));

  resize(a.mix_capped, RD), resize(a.mix_mean, rows), resize(a.mix_rstd, rows), resize(a.h_mid, RD);
  const ResidualMixSaved<T> mix_saved{a.mix_capped.data(), a.mix_mean.data(), a.mix_rstd.data()};
  residual_mix_forward<T>(a.h_mid.data(), mix_saved, a.h_in.data(), a.y_att.data(), a.y_glob.data(), a.xi.data(),
                          p + b.ln_h_gain, p + b.ln_h_bias, int(rows), D);

  if (b.ffn_v1 == kAbsent) {
    std::copy(a.h_mid.begin(), a.h_mid.end(), h_out);
    return;
  }
  const int rho = c.ffn_rank, F = ffn_hidden(D);
  resize(a.u2, RD), resize(a.ln2_mean, rows), resize(a.ln2_rstd, rows);
  layernorm_forward<T>(a.u2.data(), a.ln2_mean.data(), a.ln2_rstd.data(), nullptr, a.h_mid.data(), p + b.ln_ffn_gain,
                       p + b.ln_ffn_bias, int(rows), D);
  resize(a.ffn_low1, rows * rho), resize(a.ffn_pre, rows * F), resize(a.ffn_hidden, rows * F),
      resize(a.ffn_low2, rows * rho);
  const LowRankFfnSaved<T> ffn_saved{a.ffn_low1.data(), a.ffn_pre.data(), a.ffn_hidden.data(), a.ffn_low2.data()};
  lowrank_ffn_forward<T>(h_out, ffn_saved, a.u2.data(), ffn_params(b, p), int(rows), D, rho);
  for (size_t i = 0; i < RD; ++i) h_out[i] += a.h_mid[i];
}

template <typename T>
void muse_block_backward(T* dh, ModelState<T>& s, BlockActs<T>& a, const BlockLayout& b, const T* p, T* g,
                         const ModelConfig& c) {
  const bool phase8 = c.arch == Arch::phase8;
  const bool hopping = b.bk_w_J != kAbsent, gate = b.key_gate_w != kAbsent;
  const bool use_linear = phase8 && c.linear_attn;
  const int D = c.d_model, H = c.n_heads, B = s.B, N = s.N;
  const size_t rows = size_t(B) * N, RD = rows * D;

  // FFN sub-block: h_out = h_mid + FFN(LN_ffn(h_mid)).
  if (b.ffn_v1 != kAbsent) {
    const int rho = c.ffn_rank;
    zeroed(s.du2, RD);
    const LowRankFfnSaved<T> ffn_saved{a.ffn_low1.data(), a.ffn_pre.data(), a.ffn_hidden.data(), a.ffn_low2.data()};
    lowrank_ffn_backward<T>(s.du2.data(), ffn_grads(b, g), dh, ffn_saved, a.u2.data(), ffn_params(b, p), int(rows), D, rho);
    layernorm_backward<T>(dh, g + b.ln_ffn_gain, g + b.ln_ffn_bias, s.du2.data(), nullptr, a.h_mid.data(),
                          p + b.ln_ffn_gain, a.ln2_mean.data(), a.ln2_rstd.data(), int(rows), D);
  }

  // Mix: h_mid = h_in + LN_h(cap30(ξ·y_att + (1−ξ)·y_glob)); dh keeps flowing to h_in unchanged.
  zeroed(s.dy_att, RD), zeroed(s.dy_glob, RD), zeroed(s.dxi, rows);
  const ResidualMixSaved<T> mix_saved{a.mix_capped.data(), a.mix_mean.data(), a.mix_rstd.data()};
  residual_mix_backward<T>(nullptr, s.dy_att.data(), s.dy_glob.data(), s.dxi.data(), g + b.ln_h_gain,
                           g + b.ln_h_bias, dh, mix_saved, a.y_att.data(), a.y_glob.data(), a.xi.data(),
                           p + b.ln_h_gain, int(rows), D);
  zeroed(s.dF, rows * 3), zeroed(s.dg, rows * 2);
  if (phase8)
    bk_gate_backward<T>(s.dF.data(), g + b.xi_w, g + b.xi_b, s.dxi.data(), a.xi.data(), a.F.data(), p + b.xi_w,
                        int(rows), 1);
  else
    phase7_gate_backward<T>(s.dg.data(), g + b.xi_s, s.dxi.data(), a.xi.data(), a.g.data(), p[b.xi_s], int(rows));

  // Global path.
  zeroed(s.du, RD), zeroed(s.ddelta, rows);
  const SsmConfig sc = ssm_config(c, B, N);
  ssm_backward<T>(s.du.data(), s.ddelta.data(), s.dF.data(), ssm_grads(b, g), s.dy_glob.data(), a.u.data(),
                  a.delta.data(), a.F.data(), ssm_params(b, p), a.ssm_saved, sc);

  // Local/linear attention.
  const T c_val = curvature(p[b.c_raw]);
  T dc = 0;
  zeroed(s.dmixed, RD);
  linear_backward<T>(s.dmixed.data(), g + b.w_o, nullptr, s.dy_att.data(), use_linear ? a.mixed.data() : a.o_loc.data(),
                     p + b.w_o, int(rows), D, D);
  zeroed(s.dq, RD), zeroed(s.dk, RD), zeroed(s.dv, RD);
  if (gate) zeroed(s.dmu, rows * H), zeroed(s.dlog_mu, rows * H);
  const T* do_loc = s.dmixed.data();
  if (use_linear) {
    zeroed(s.do_loc, RD), zeroed(s.do_lin, RD);
    const T mix_c = c.curvature_mix ? c_val : T(kCurvatureMixCentre);
    curvature_mix_backward<T>(s.do_loc.data(), s.do_lin.data(), c.curvature_mix ? &dc : nullptr, s.dmixed.data(),
                              a.o_loc.data(), a.o_lin.data(), mix_c, int(rows), D);
    linear_attn_backward<T>(s.dq.data(), s.dk.data(), s.dv.data(), gate ? s.dmu.data() : nullptr, s.do_lin.data(),
                            a.zeta.data(), a.q.data(), a.k.data(), a.v.data(), gate ? a.mu.data() : nullptr, B, N, D, H);
    do_loc = s.do_loc.data();
  }
  local_attn_backward<T>(s.dq.data(), s.dk.data(), s.dv.data(), &dc, g + b.beta, gate ? s.dlog_mu.data() : nullptr,
                         do_loc, a.o_loc.data(), a.lse.data(), a.q.data(), a.k.data(), a.v.data(), c_val, p + b.beta,
                         gate ? a.log_mu.data() : nullptr, attn_config(c, B, N));
  g[b.c_raw] += dc * curvature_grad(p[b.c_raw]);
  if (gate) {
    for (size_t i = 0; i < rows * H; ++i) s.dmu[i] += s.dlog_mu[i] / a.mu[i];
    bk_gate_backward<T>(s.dF.data(), g + b.key_gate_w, g + b.key_gate_b, s.dmu.data(), a.mu.data(), a.F.data(),
                        p + b.key_gate_w, int(rows), H);
  }
  linear_backward<T>(s.du.data(), g + b.w_q, nullptr, s.dq.data(), a.u.data(), p + b.w_q, int(rows), D, D);
  linear_backward<T>(s.du.data(), g + b.w_k, nullptr, s.dk.data(), a.u.data(), p + b.w_k, int(rows), D, D);
  linear_backward<T>(s.du.data(), g + b.w_v, nullptr, s.dv.data(), a.u.data(), p + b.w_v, int(rows), D, D);

  // BK core.
  const BkSaved<T> bk_saved{a.bk_v.data(), a.bk_J.data(), a.bk_J2.data()};
  bk_layer_backward<T>(s.du.data(), bk_grads(b, g), phase8 ? nullptr : s.dg.data(), s.dF.data(), a.u.data(), a.g.data(), bk_saved,
                       bk_params(b, p, c), hopping, B, N, D);

  layernorm_backward<T>(dh, g + b.ln_gain, g + b.ln_bias, s.du.data(), s.ddelta.data(), a.h_in.data(), p + b.ln_gain,
                        a.ln_mean.data(), a.ln_rstd.data(), int(rows), D);
}

}  // namespace

template <typename T>
void block_forward(T* h_out, BlockActs<T>& acts, const BlockLayout& layout, const T* params, const ModelConfig& c,
                   int B, int N) {
  if (c.arch == Arch::gpt)
    gpt_block_forward(h_out, acts, layout, params, c, B, N);
  else
    muse_block_forward(h_out, acts, layout, params, c, B, N);
}

template <typename T>
void block_backward(T* dh, ModelState<T>& state, BlockActs<T>& acts, const BlockLayout& layout, const T* params,
                    T* grads, const ModelConfig& c) {
  if (c.arch == Arch::gpt)
    gpt_block_backward(dh, state, acts, layout, params, grads, c);
  else
    muse_block_backward(dh, state, acts, layout, params, grads, c);
}

#define MUSE_BLOCK_PARTS_INSTANTIATE(T)                                                   \
  template BkParams<T> bk_params<T>(const BlockLayout&, const T*, const ModelConfig&);  \
  template SsmParams<T> ssm_params<T>(const BlockLayout&, const T*);                    \
  template LowRankFfnParams<T> ffn_params<T>(const BlockLayout&, const T*);            \
  template SsmGrads<T> ssm_grads<T>(const BlockLayout&, T*);                           \
  template BkGrads<T> bk_grads<T>(const BlockLayout&, T*);                             \
  template LowRankFfnGrads<T> ffn_grads<T>(const BlockLayout&, T*);                    \
  template DenseMlpParams<T> mlp_params<T>(const BlockLayout&, const T*);              \
  template DenseMlpGrads<T> mlp_grads<T>(const BlockLayout&, T*);
MUSE_BLOCK_PARTS_INSTANTIATE(float)
MUSE_BLOCK_PARTS_INSTANTIATE(double)
#undef MUSE_BLOCK_PARTS_INSTANTIATE

template void block_forward<float>(float*, BlockActs<float>&, const BlockLayout&, const float*, const ModelConfig&,
                                   int, int);
template void block_forward<double>(double*, BlockActs<double>&, const BlockLayout&, const double*,
                                    const ModelConfig&, int, int);
template void block_backward<float>(float*, ModelState<float>&, BlockActs<float>&, const BlockLayout&, const float*,
                                    float*, const ModelConfig&);
template void block_backward<double>(double*, ModelState<double>&, BlockActs<double>&, const BlockLayout&,
                                     const double*, double*, const ModelConfig&);

}  // namespace muse
