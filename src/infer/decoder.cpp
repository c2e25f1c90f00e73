#include "infer/decoder.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/device.h"
#include "model/muse_block.h"
#include "ops/bk.h"
#include "ops/causal_attn.h"
#include "ops/ffn.h"
#include "ops/hybrid.h"
#include "ops/layernorm.h"
#include "ops/linear.h"
#include "ops/linear_attn.h"

namespace muse {

namespace {

// Grows a scratch buffer to at least n elements (step widths vary; buffers never shrink).
template <typename T>
T* fit(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

bool is_muse(const ModelConfig& c) { return c.arch != Arch::gpt; }
bool uses_linear_attn(const ModelConfig& c) { return c.arch == Arch::phase8 && c.linear_attn; }

}  // namespace

template <typename T>
Decoder<T>::Decoder(const Model<T>& model, int streams) : model_(model), config_(model.config()) {
  if (streams < 1) throw std::invalid_argument("decoder: streams must be at least 1, got " + std::to_string(streams));
  ParamTable table;
  layout_ = build_layout(config_, table);
  if (layout_.htt_a != kAbsent) {
    htt_ = htt_shape(config_.vocab_size, config_.d_model, config_.htt_rank);
    A_hat_.resize(size_t(htt_.v1) * htt_.r * htt_.d1);
    B_hat_.resize(size_t(htt_.v2) * htt_.r * htt_.d2);
    std::vector<T> A_norm(size_t(htt_.v1) * htt_.r), B_norm(size_t(htt_.v2) * htt_.r);
    const T* p = model_.params().data();
    htt_normalize_cores<T>(A_hat_.data(), A_norm.data(), B_hat_.data(), B_norm.data(), p + layout_.htt_a,
                           p + layout_.htt_b, htt_);
  }
  states_.resize(streams);
  for (DecodeState<T>& s : states_) empty_state(s);
}

template <typename T>
void Decoder<T>::empty_state(DecodeState<T>& s) const {
  const ModelConfig& c = config_;
  const int D = c.d_model, H = c.n_heads, dh = c.head_dim();
  s.position = 0;
  s.layers.assign(layout_.blocks.size(), LayerDecodeState<T>{});
  if (!is_muse(c)) return;
  for (size_t l = 0; l < layout_.blocks.size(); ++l) {
    LayerDecodeState<T>& st = s.layers[l];
    local_attn_decode_reset(st.window, attn_config(c, 1, 1), layout_.blocks[l].key_gate_w != kAbsent);
    st.ssm_S.assign(c.ssm_rank, T(0));
    st.ssm_conv_tail.assign(2 * size_t(D), T(0));
    if (uses_linear_attn(c)) {
      st.lin_S.assign(size_t(H) * dh * dh, T(0));
      st.lin_z.assign(size_t(D), T(0));
    }
  }
}

template <typename T>
void Decoder<T>::check_stream(int stream) const {
  if (stream < 0 || stream >= streams())
    throw std::out_of_range("decoder: stream " + std::to_string(stream) + " does not exist (this decoder has " +
                            std::to_string(streams()) + ")");
}

template <typename T>
void Decoder<T>::check_token(int32_t id) const {
  if (id < 0 || id >= config_.vocab_size)
    throw std::invalid_argument("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                std::to_string(config_.vocab_size) + ")");
}

template <typename T>
void Decoder<T>::check_position(int position) const {
  if (config_.pos_embedding == PosEmbedding::learned && position >= config_.max_seq)
    throw std::invalid_argument("position " + std::to_string(position) + " is past max_seq = " +
                                std::to_string(config_.max_seq) + " of this model's learned positions (the context " +
                                "holds at most " + std::to_string(config_.max_seq) + " tokens)");
}

template <typename T>
int Decoder<T>::position(int stream) const {
  check_stream(stream);
  return states_[stream].position;
}

template <typename T>
void Decoder<T>::reset(int stream) {
  check_stream(stream);
  empty_state(states_[stream]);
}

template <typename T>
DecodeState<T> Decoder<T>::snapshot(int stream) const {
  check_stream(stream);
  return states_[stream];
}

template <typename T>
void Decoder<T>::restore(int stream, const DecodeState<T>& state) {
  check_stream(stream);
  if (state.layers.size() != layout_.blocks.size())
    throw std::invalid_argument("decoder: the state has " + std::to_string(state.layers.size()) +
                                " layers, the model " + std::to_string(layout_.blocks.size()));
  states_[stream] = state;
}

template <typename T>
size_t Decoder<T>::state_bytes(int stream) const {
  check_stream(stream);
  size_t n = 0;
  for (const LayerDecodeState<T>& st : states_[stream].layers) {
    n += (st.window.keys.size() + st.window.values.size() + st.window.log_mu.size()) * sizeof(T) +
         st.window.key_norms.size() * sizeof(TangentNorm<T>);
    n += (3 + st.ssm_S.size() + st.ssm_conv_tail.size() + st.lin_S.size() + st.lin_z.size()) * sizeof(T);
    n += (st.kv_keys.size() + st.kv_values.size()) * sizeof(T);
  }
  return n;
}

// x [rows, D] = E[ids] (+ P[positions]), as the model's forward embeds.
template <typename T>
void Decoder<T>::embed(T* x, const int32_t* ids, const int* positions, int rows) {
  const T* p = model_.params().data();
  const int D = config_.d_model;
  if (layout_.embed != kAbsent)
    embedding_lookup_forward<T>(x, p + layout_.embed, ids, rows, D);
  else
    htt_embedding_rows<T>(x, ids, rows, A_hat_.data(), B_hat_.data(), p + layout_.htt_theta, htt_);
  if (layout_.positions != kAbsent)
    for (int r = 0; r < rows; ++r)
      for (int i = 0; i < D; ++i) x[size_t(r) * D + i] += p[layout_.positions + size_t(positions[r]) * D + i];
}

// logits [rows, Vp] = LN_final(h)·Eᵀ through the factored HTT head or the dense table.
template <typename T>
void Decoder<T>::head(T* logits, const T* h, int rows) {
  const T* p = model_.params().data();
  const int D = config_.d_model;
  T* x = fit(u_, size_t(rows) * D);
  layernorm_forward<T>(x, fit(mean_, rows), fit(rstd_, rows), nullptr, h, p + layout_.final_gain,
                       p + layout_.final_bias, rows, D);
  if (layout_.embed != kAbsent)
    linear_forward<T>(logits, x, p + layout_.embed, nullptr, rows, D, config_.padded_vocab());
  else
    htt_factored_head_forward<T>(logits, x, A_hat_.data(), B_hat_.data(), p + layout_.htt_theta, rows, htt_);
}

// The state after the parallel forward of layer l over a whole prompt of N tokens (acts of one sequence).
template <typename T>
void Decoder<T>::handover(int l, DecodeState<T>& s, const BlockActs<T>& a, int N) {
  const ModelConfig& c = config_;
  const BlockLayout& b = layout_.blocks[l];
  const T* p = model_.params().data();
  const size_t D = c.d_model;
  LayerDecodeState<T>& st = s.layers[l];
  if (!is_muse(c)) {
    st.kv_keys.assign(a.k.begin(), a.k.begin() + N * D);
    st.kv_values.assign(a.v.begin(), a.v.begin() + N * D);
    return;
  }
  const bool gated = b.key_gate_w != kAbsent, hopping = b.bk_w_J != kAbsent;
  local_attn_decode_prefill(st.window, a.k.data(), a.v.data(), gated ? a.log_mu.data() : nullptr, curvature(p[b.c_raw]),
                            N, attn_config(c, 1, N));
  bk_decode_prefill(st.bk_g_prev, hopping ? &st.bk_prev_half : nullptr, a.u.data(), a.g.data(), bk_params(b, p, c),
                    hopping, N, int(D));
  SsmDecodeState<T> ssm;
  ssm_decode_prefill(ssm, a.u.data(), a.ssm_saved, ssm_config(c, 1, N));
  st.ssm_S = std::move(ssm.S);
  st.ssm_conv_tail = std::move(ssm.conv_tail);
  if (uses_linear_attn(c)) {
    st.lin_S = a.lin_S;
    st.lin_z = a.lin_z;
  }
}

template <typename T>
const T* Decoder<T>::prefill(int stream, const int32_t* ids, int n) {
  check_stream(stream);
  if (n < 1) throw std::invalid_argument("prefill: the prompt is empty");
  for (int i = 0; i < n; ++i) check_token(ids[i]);
  check_position(n - 1);
  DecodeState<T>& s = states_[stream];
  empty_state(s);
  const ModelConfig& c = config_;
  const size_t D = c.d_model;
  const T* p = model_.params().data();
  // The embedding and the blocks run exactly as the model's forward does, one layer at a time through one
  // reused set of activations, so a long prompt needs one layer's activations, not L of them.
  std::vector<int> positions(n);
  for (int i = 0; i < n; ++i) positions[i] = i;
  BlockActs<T> a;  // released on return: a long prompt's activations are not kept while decoding
  a.h_in.resize(n * D);
  embed(a.h_in.data(), ids, positions.data(), n);
  std::vector<T> out(n * D);
  for (size_t l = 0; l < layout_.blocks.size(); ++l) {
    block_forward(out.data(), a, layout_.blocks[l], p, c, 1, n);
    handover(int(l), s, a, n);
    a.h_in.swap(out);
  }
  s.position = n;
  head(fit(logits_, size_t(c.padded_vocab())), a.h_in.data() + (n - 1) * D, 1);
  return logits_.data();
}

template <typename T>
void Decoder<T>::muse_layer_step(int l, T* h_out, const T* h, const int* streams, int rows) {
  const ModelConfig& c = config_;
  const BlockLayout& b = layout_.blocks[l];
  const T* p = model_.params().data();
  const int D = c.d_model, H = c.n_heads;
  const size_t RD = size_t(rows) * D;
  const bool gated = b.key_gate_w != kAbsent, hopping = b.bk_w_J != kAbsent;
  auto layer = [&](int r) -> LayerDecodeState<T>& { return states_[streams[r]].layers[l]; };

  T* u = fit(u_, RD);
  T* delta = fit(delta_, rows);
  layernorm_forward<T>(u, fit(mean_, rows), fit(rstd_, rows), delta, h, p + b.ln_gain, p + b.ln_bias, rows, D);

  // BK: gather g_{t−1} and w_J,prev·u_{t−1}, one step, scatter.
  T* g_prev = fit(g_prev_, 2 * size_t(rows));
  T* prev_half = fit(prev_half_, rows);
  for (int r = 0; r < rows; ++r) {
    g_prev[2 * r] = layer(r).bk_g_prev[0];
    g_prev[2 * r + 1] = layer(r).bk_g_prev[1];
    prev_half[r] = layer(r).bk_prev_half;
  }
  T* g = fit(g_, 2 * size_t(rows));
  T* F = fit(F_, 3 * size_t(rows));
  bk_decode_step<T>(g, F, g_prev, hopping ? prev_half : nullptr, u, bk_params(b, p, c), hopping, rows, D);
  for (int r = 0; r < rows; ++r) {
    layer(r).bk_g_prev[0] = g_prev[2 * r];
    layer(r).bk_g_prev[1] = g_prev[2 * r + 1];
    layer(r).bk_prev_half = prev_half[r];
  }

  T* q = fit(q_, RD);
  T* k = fit(k_, RD);
  T* v = fit(v_, RD);
  linear_forward<T>(q, u, p + b.w_q, nullptr, rows, D, D);
  linear_forward<T>(k, u, p + b.w_k, nullptr, rows, D, D);
  linear_forward<T>(v, u, p + b.w_v, nullptr, rows, D, D);
  T* mu = fit(mu_, size_t(rows) * H);
  T* log_mu = fit(log_mu_, size_t(rows) * H);
  if (gated) {
    bk_gate_forward<T>(mu, F, p + b.key_gate_w, p + b.key_gate_b, rows, H);
    for (int i = 0; i < rows * H; ++i) log_mu[i] = std::log(mu[i]);
  }

  const T c_val = curvature(p[b.c_raw]);
  const LocalAttnConfig cfg = attn_config(c, 1, 1);
  const bool linear = uses_linear_attn(c);
  T* o_loc = fit(o_loc_, RD);
  T* o_lin = fit(o_lin_, RD);
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int r = 0; r < rows; ++r) {
    LayerDecodeState<T>& st = layer(r);
    const size_t at = size_t(r) * D;
    local_attn_decode_push(st.window, k + at, v + at, gated ? log_mu + size_t(r) * H : nullptr, c_val,
                           states_[streams[r]].position, cfg);
    local_attn_decode_step(o_loc + at, st.window, q + at, c_val, p + b.beta, cfg);
    if (linear)
      linear_attn_decode_step(o_lin + at, st.lin_S.data(), st.lin_z.data(), q + at, k + at, v + at,
                              gated ? mu + size_t(r) * H : nullptr, D, H);
  }
  const T* mixed = o_loc;
  if (linear) {
    const T mix_c = c.curvature_mix ? c_val : T(kCurvatureMixCentre);
    curvature_mix_forward<T>(fit(mixed_, RD), o_loc, o_lin, mix_c, rows, D);
    mixed = mixed_.data();
  }
  T* y_att = fit(y_att_, RD);
  linear_forward<T>(y_att, mixed, p + b.w_o, nullptr, rows, D, D);

  // AR-SSM: gather the streams' states into one batch, one step, scatter.
  const int R = c.ssm_rank;
  ssm_batch_.S.resize(size_t(rows) * R);
  ssm_batch_.conv_tail.resize(2 * RD);
  for (int r = 0; r < rows; ++r) {
    std::copy(layer(r).ssm_S.begin(), layer(r).ssm_S.end(), ssm_batch_.S.begin() + size_t(r) * R);
    std::copy(layer(r).ssm_conv_tail.begin(), layer(r).ssm_conv_tail.end(),
              ssm_batch_.conv_tail.begin() + 2 * size_t(r) * D);
  }
  T* y_glob = fit(y_glob_, RD);
  ssm_decode_step<T>(y_glob, ssm_batch_, u, delta, F, ssm_params(b, p), ssm_config(c, rows, 1));
  for (int r = 0; r < rows; ++r) {
    std::copy_n(ssm_batch_.S.begin() + size_t(r) * R, R, layer(r).ssm_S.begin());
    std::copy_n(ssm_batch_.conv_tail.begin() + 2 * size_t(r) * D, 2 * D, layer(r).ssm_conv_tail.begin());
  }

  T* xi = fit(xi_, rows);
  if (c.arch == Arch::phase8)
    bk_gate_forward<T>(xi, F, p + b.xi_w, p + b.xi_b, rows, 1);
  else
    phase7_gate_forward<T>(xi, g, p[b.xi_s], rows);
  T* h_mid = b.ffn_v1 == kAbsent ? h_out : fit(h_mid_, RD);
  const ResidualMixSaved<T> mix{fit(capped_, RD), fit(mix_mean_, rows), fit(mix_rstd_, rows)};
  residual_mix_forward<T>(h_mid, mix, h, y_att, y_glob, xi, p + b.ln_h_gain, p + b.ln_h_bias, rows, D);
  if (b.ffn_v1 == kAbsent) return;

  const int rho = c.ffn_rank, Fw = ffn_hidden(D);
  T* u2 = fit(u2_, RD);
  layernorm_forward<T>(u2, fit(mean_, rows), fit(rstd_, rows), nullptr, h_mid, p + b.ln_ffn_gain, p + b.ln_ffn_bias,
                       rows, D);
  const LowRankFfnSaved<T> ffn{fit(low1_, size_t(rows) * rho), fit(pre_, size_t(rows) * Fw),
                               fit(hidden_, size_t(rows) * Fw), fit(low2_, size_t(rows) * rho)};
  lowrank_ffn_forward<T>(h_out, ffn, u2, ffn_params(b, p), rows, D, rho);
  for (size_t i = 0; i < RD; ++i) h_out[i] += h_mid[i];
}

template <typename T>
void Decoder<T>::gpt_layer_step(int l, T* h_out, const T* h, const int* streams, int rows) {
  const ModelConfig& c = config_;
  const BlockLayout& b = layout_.blocks[l];
  const T* p = model_.params().data();
  const int D = c.d_model, H = c.n_heads, Fw = ffn_hidden(D);
  const size_t RD = size_t(rows) * D;
  T* u = fit(u_, RD);
  layernorm_forward<T>(u, fit(mean_, rows), fit(rstd_, rows), nullptr, h, p + b.ln_gain, p + b.ln_bias, rows, D);
  T* q = fit(q_, RD);
  T* k = fit(k_, RD);
  T* v = fit(v_, RD);
  linear_forward<T>(q, u, p + b.w_q, nullptr, rows, D, D);
  linear_forward<T>(k, u, p + b.w_k, nullptr, rows, D, D);
  linear_forward<T>(v, u, p + b.w_v, nullptr, rows, D, D);
  T* o = fit(o_loc_, RD);
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int r = 0; r < rows; ++r) {
    LayerDecodeState<T>& st = states_[streams[r]].layers[l];
    const size_t at = size_t(r) * D;
    st.kv_keys.insert(st.kv_keys.end(), k + at, k + at + D);
    st.kv_values.insert(st.kv_values.end(), v + at, v + at + D);
    causal_attn_decode_step(o + at, q + at, st.kv_keys.data(), st.kv_values.data(), int(st.kv_keys.size() / D), H, D,
                            c.pos_embedding == PosEmbedding::alibi);
  }
  T* y_att = fit(y_att_, RD);
  T* h_mid = fit(h_mid_, RD);
  linear_forward<T>(y_att, o, p + b.w_o, nullptr, rows, D, D);
  for (size_t i = 0; i < RD; ++i) h_mid[i] = h[i] + y_att[i];
  T* u2 = fit(u2_, RD);
  layernorm_forward<T>(u2, fit(mean_, rows), fit(rstd_, rows), nullptr, h_mid, p + b.ln_ffn_gain, p + b.ln_ffn_bias,
                       rows, D);
  const DenseMlpParams<T> mp{p + b.mlp_w1, p + b.mlp_b1, p + b.mlp_w2, p + b.mlp_b2};
  dense_mlp_forward<T>(h_out, {fit(pre_, size_t(rows) * Fw), fit(hidden_, size_t(rows) * Fw)}, u2, mp, rows, D);
  for (size_t i = 0; i < RD; ++i) h_out[i] += h_mid[i];
}

template <typename T>
const T* Decoder<T>::step(const int* streams, const int32_t* tokens, int count) {
  if (count < 1) throw std::invalid_argument("decoder step: no streams given");
  std::vector<int> positions(count);
  for (int r = 0; r < count; ++r) check_stream(streams[r]);
  require_distinct_streams(streams, count);
  for (int r = 0; r < count; ++r) {
    check_token(tokens[r]);
    positions[r] = states_[streams[r]].position;
    check_position(positions[r]);
  }
  const size_t RD = size_t(count) * config_.d_model;
  T* x = fit(x_, RD);
  T* y = fit(y_, RD);
  embed(x, tokens, positions.data(), count);
  for (size_t l = 0; l < layout_.blocks.size(); ++l) {
    if (is_muse(config_))
      muse_layer_step(int(l), y, x, streams, count);
    else
      gpt_layer_step(int(l), y, x, streams, count);
    std::swap(x, y);
  }
  head(fit(logits_, size_t(count) * config_.padded_vocab()), x, count);
  for (int r = 0; r < count; ++r) ++states_[streams[r]].position;
  return logits_.data();
}

template <typename T>
const T* Decoder<T>::step(const int32_t* tokens) {
  std::vector<int> all(streams());
  for (int s = 0; s < streams(); ++s) all[s] = s;
  return step(all.data(), tokens, streams());
}

template <typename T>
const T* Decoder<T>::step(int stream, int32_t token) {
  return step(&stream, &token, 1);
}

template <typename T>
const T* Decoder<T>::feed(int stream, const int32_t* ids, int n) {
  if (n < 1) throw std::invalid_argument("feed: no tokens given");
  const T* logits = nullptr;
  for (int i = 0; i < n; ++i) logits = step(stream, ids[i]);
  return logits;
}

void require_distinct_streams(const int* streams, int count) {
  for (int r = 0; r < count; ++r)
    for (int e = 0; e < r; ++e)
      if (streams[e] == streams[r])
        throw std::invalid_argument("decoder step: stream " + std::to_string(streams[r]) + " given twice");
}

std::string resolve_decode_device(const std::string& requested, const ModelConfig& config) {
  if (requested == "auto" && config.arch == Arch::gpt) return "cpu";
  return resolve_device(requested);
}

template class Decoder<float>;
template class Decoder<double>;

}  // namespace muse
