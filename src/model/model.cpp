#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/math.h"
#include "common/rng.h"
#include "model/model_state.h"
#include "model/muse_block.h"
#include "ops/htt.h"
#include "ops/layernorm.h"
#include "ops/linear.h"
#include "ops/xent.h"

namespace muse {

namespace {

template <typename T>
HttShape model_htt_shape(const ModelConfig& c) {
  return htt_shape(c.vocab_size, c.d_model, c.htt_rank);
}

// HTT cores N(0, (0.01/√r)²) and θ ~ U(−π/4, π/4) (SPEC §2.10: cos has zero slope at θ = 0).
template <typename T>
void init_htt_cores(T* p, const ModelLayout& m, const ModelConfig& c, Rng& rng) {
  const HttShape sh = model_htt_shape<T>(c);
  const double std = 0.01 / std::sqrt(double(sh.r));
  for (size_t i = 0; i < size_t(sh.v1) * sh.r * sh.d1; ++i) p[m.htt_a + i] = T(std * rng.normal());
  for (size_t i = 0; i < size_t(sh.v2) * sh.r * sh.d2; ++i) p[m.htt_b + i] = T(std * rng.normal());
  for (int s = 0; s < sh.r; ++s) p[m.htt_theta + s] = T(rng.uniform(-M_PI / 4, M_PI / 4));
}

// The embedding / tied-head matrix E [Vp, D]: the dense table itself, or materialised from the HTT cores
// (once per forward).
template <typename T>
const T* embedding_matrix_forward(ModelState<T>& s, const T* p, const ModelConfig& c) {
  const ModelLayout& m = s.layout;
  if (m.embed != kAbsent) return p + m.embed;
  const HttShape sh = model_htt_shape<T>(c);
  const size_t a = size_t(sh.v1) * sh.r * sh.d1, b = size_t(sh.v2) * sh.r * sh.d2;
  s.E.resize(size_t(sh.Vp) * sh.D);
  // Saved: Â [a], ‖A‖ [v1·r], B̂ [b], ‖B‖ [v2·r].
  s.htt_saved.resize(a + size_t(sh.v1) * sh.r + b + size_t(sh.v2) * sh.r);
  T* A_hat = s.htt_saved.data();
  T* A_norm = A_hat + a;
  T* B_hat = A_norm + size_t(sh.v1) * sh.r;
  T* B_norm = B_hat + b;
  htt_materialize_forward<T>(s.E.data(), A_hat, A_norm, B_hat, B_norm, p + m.htt_a, p + m.htt_b, p + m.htt_theta, sh);
  return s.E.data();
}

template <typename T>
const T* embedding_matrix(const ModelState<T>& s, const T* p) {
  return s.layout.embed != kAbsent ? p + s.layout.embed : s.E.data();
}

// Where dE accumulates: straight into the dense table's gradient, or into a scratch dE that
// embedding_matrix_backward contracts into the HTT cores.
template <typename T>
T* embedding_matrix_grad(ModelState<T>& s, T* g, const ModelConfig& c) {
  if (s.layout.embed != kAbsent) return g + s.layout.embed;
  s.dE.assign(size_t(c.padded_vocab()) * c.d_model, T(0));
  return s.dE.data();
}

template <typename T>
void embedding_matrix_backward(ModelState<T>& s, const T* p, T* g, const ModelConfig& c) {
  const ModelLayout& m = s.layout;
  if (m.embed != kAbsent) return;
  const HttShape sh = model_htt_shape<T>(c);
  const size_t a = size_t(sh.v1) * sh.r * sh.d1, b = size_t(sh.v2) * sh.r * sh.d2;
  const T* A_hat = s.htt_saved.data();
  const T* A_norm = A_hat + a;
  const T* B_hat = A_norm + size_t(sh.v1) * sh.r;
  const T* B_norm = B_hat + b;
  htt_materialize_backward<T>(g + m.htt_a, g + m.htt_b, g + m.htt_theta, s.dE.data(), A_hat, A_norm, B_hat, B_norm,
                              p + m.htt_theta, sh);
}

template <typename T>
double cross_entropy_forward(ModelState<T>& s, const ModelConfig& c, double smoothing, double* total_nats,
                             int64_t* count) {
  const int rows = s.B * s.N;
  s.row_loss.resize(rows);
  s.row_lse.resize(rows);
  s.smoothing = smoothing;
  const XentResult r = xent_forward<T>(s.row_loss.data(), s.row_lse.data(), s.logits.data(), s.targets.data(), rows,
                                       c.vocab_size, c.padded_vocab(), T(smoothing), kXentIgnore);
  s.counted = r.count;
  if (total_nats) *total_nats = r.mean_loss * r.count;
  if (count) *count = r.count;
  return r.mean_loss;
}

template <typename T>
void cross_entropy_backward(ModelState<T>& s, const ModelConfig& c, double scale) {
  const int rows = s.B * s.N;
  s.dlogits.assign(size_t(rows) * c.padded_vocab(), T(0));
  xent_backward<T>(s.dlogits.data(), T(scale), s.logits.data(), s.row_lse.data(), s.targets.data(), rows, c.vocab_size,
                   c.padded_vocab(), T(s.smoothing), s.counted, kXentIgnore);
}

}  // namespace

template <typename T>
Model<T>::Model(const ModelConfig& config) : config_(config), state_(std::make_unique<ModelState<T>>()) {
  validate(config_);
  state_->layout = build_layout(config_, table_);
  params_.assign(table_.total(), T(0));
  grads_.assign(table_.total(), T(0));
}

template <typename T>
Model<T>::~Model() = default;
template <typename T>
Model<T>::Model(Model&&) noexcept = default;
template <typename T>
Model<T>& Model<T>::operator=(Model&&) noexcept = default;

template <typename T>
void Model<T>::zero_grads() {
  std::fill(grads_.begin(), grads_.end(), T(0));
}

template <typename T>
void Model<T>::init(uint64_t seed) {
  const ModelConfig& c = config_;
  const ModelLayout& m = state_->layout;
  Rng rng(seed);
  std::fill(params_.begin(), params_.end(), T(0));
  T* p = params_.data();
  auto normal = [&](size_t offset, size_t n, double std) {
    if (offset == kAbsent) return;
    for (size_t i = 0; i < n; ++i) p[offset + i] = T(std * rng.normal());
  };
  auto fill = [&](size_t offset, size_t n, double value) {
    if (offset == kAbsent) return;
    for (size_t i = 0; i < n; ++i) p[offset + i] = T(value);
  };
  const size_t D = c.d_model, H = c.n_heads, R = c.ssm_rank, L = c.n_layers;
  const double out_std = 0.02 / std::sqrt(2.0 * L);  // residual-branch output projections

  if (m.embed != kAbsent) normal(m.embed, size_t(c.vocab_size) * D, 0.02);  // padded rows stay 0
  if (m.htt_a != kAbsent) init_htt_cores(p, m, c, rng);
  normal(m.positions, size_t(c.max_seq) * D, 0.01);

  for (const BlockLayout& b : m.blocks) {
    fill(b.ln_gain, D, 1.0);
    normal(b.w_q, D * D, 0.02);
    normal(b.w_k, D * D, 0.02);
    normal(b.w_v, D * D, 0.02);
    normal(b.w_o, D * D, out_std);
    if (c.arch == Arch::gpt) {
      fill(b.ln_ffn_gain, D, 1.0);
      normal(b.mlp_w1, 4 * D * D, 0.02);
      normal(b.mlp_w2, 4 * D * D, out_std);
      continue;
    }
    normal(b.bk_w_v, D, 0.02);
    normal(b.bk_w_J, 2 * D, 0.02);
    fill(b.bk_eps_p, 1, 1.0);
    // beta = 0 (softplus scale ln 2) and c_raw = 0 (c = ln 2 + 0.01) are the zero fill.
    fill(b.key_gate_b, H, 2.0);
    normal(b.conv, 3 * D, 0.02);
    normal(b.ssm_w1, D / 4 * D, 0.02);
    normal(b.ssm_w2, R * (D / 4), 0.02);
    normal(b.ssm_w_u, R * D, 0.02);
    normal(b.ssm_w_v, R * D, 0.02);
    normal(b.ssm_w_o, D * R, out_std);
    if (b.ssm_ell != kAbsent) ssm_init_decay_logits(p + b.ssm_ell, int(R));
    normal(b.rank_w1, kSsmRankHidden, 0.02);
    normal(b.rank_w2, kSsmRankHidden, 0.02);
    fill(b.pi_b, 1, 2.0);
    fill(b.xi_s, 1, 1.0);
    fill(b.ln_h_gain, D, 1.0 / std::sqrt(2.0 * L));
    if (b.ffn_v1 != kAbsent) {
      const size_t rho = c.ffn_rank;
      fill(b.ln_ffn_gain, D, 1.0);
      normal(b.ffn_v1, rho * D, 1.0 / std::sqrt(double(D)));
      normal(b.ffn_u1, 4 * D * rho, 0.02);
      normal(b.ffn_v2, rho * 4 * D, 1.0 / std::sqrt(4.0 * D));
      normal(b.ffn_u2, D * rho, out_std);
    }
  }
  fill(m.final_gain, D, 1.0);
}

template <typename T>
void Model<T>::forward(const int32_t* ids, int B, int N) {
  const ModelConfig& c = config_;
  ModelState<T>& s = *state_;
  const ModelLayout& m = s.layout;
  if (B < 1 || N < 1) throw std::invalid_argument("forward: batch and sequence length must be positive");
  if (c.pos_embedding == PosEmbedding::learned && N > c.max_seq)
    throw std::invalid_argument("sequence length " + std::to_string(N) + " exceeds max_seq = " +
                                std::to_string(c.max_seq) + " of this model's learned positions");
  const int D = c.d_model, Vp = c.padded_vocab();
  const size_t rows = size_t(B) * N;
  for (size_t i = 0; i < rows; ++i)
    if (ids[i] < 0 || ids[i] >= c.vocab_size)
      throw std::invalid_argument("token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                                  " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  s.B = B;
  s.N = N;
  s.ids.assign(ids, ids + rows);
  const T* p = params_.data();

  const T* E = embedding_matrix_forward(s, p, c);
  if (s.blocks.size() != m.blocks.size()) s.blocks.resize(m.blocks.size());
  std::vector<T>& x0 = s.blocks.empty() ? s.h_final : s.blocks[0].h_in;
  x0.resize(rows * D);
  embedding_lookup_forward<T>(x0.data(), E, ids, int(rows), D);
  if (m.positions != kAbsent)
    for (size_t r = 0; r < rows; ++r)
      for (int i = 0; i < D; ++i) x0[r * D + i] += p[m.positions + size_t(r % N) * D + i];

  for (size_t l = 0; l < m.blocks.size(); ++l) {
    std::vector<T>& out = l + 1 < m.blocks.size() ? s.blocks[l + 1].h_in : s.h_final;
    out.resize(rows * D);
    block_forward(out.data(), s.blocks[l], m.blocks[l], p, c, B, N);
  }

  s.x_final.resize(rows * D);
  s.final_mean.resize(rows);
  s.final_rstd.resize(rows);
  layernorm_forward<T>(s.x_final.data(), s.final_mean.data(), s.final_rstd.data(), nullptr, s.h_final.data(),
                       p + m.final_gain, p + m.final_bias, int(rows), D);
  s.logits.resize(rows * Vp);
  linear_forward<T>(s.logits.data(), s.x_final.data(), E, nullptr, int(rows), D, Vp);
}

template <typename T>
const T* Model<T>::logits() const {
  return state_->logits.data();
}

template <typename T>
double Model<T>::loss(const int32_t* targets, double label_smoothing, double* total_nats, int64_t* count) {
  ModelState<T>& s = *state_;
  const size_t rows = size_t(s.B) * s.N;
  for (size_t i = 0; i < rows; ++i)
    if (targets[i] != kXentIgnore && (targets[i] < 0 || targets[i] >= config_.vocab_size))
      throw std::invalid_argument("target id " + std::to_string(targets[i]) + " is outside the vocabulary");
  s.targets.assign(targets, targets + rows);
  return cross_entropy_forward(s, config_, label_smoothing, total_nats, count);
}

template <typename T>
const T* Model<T>::residual(int layer) const {
  const ModelState<T>& s = *state_;
  if (layer < 0 || layer >= int(s.layout.blocks.size()))
    throw std::invalid_argument("layer " + std::to_string(layer) + " is outside [0, " +
                                std::to_string(s.layout.blocks.size()) + ")");
  if (s.B == 0) throw std::logic_error("residual(): no forward has run");
  return size_t(layer) + 1 < s.blocks.size() ? s.blocks[layer + 1].h_in.data() : s.h_final.data();
}

template <typename T>
double Model<T>::curvature(int layer) const {
  const ModelLayout& m = state_->layout;
  if (layer < 0 || layer >= int(m.blocks.size()))
    throw std::invalid_argument("layer " + std::to_string(layer) + " is outside [0, " +
                                std::to_string(m.blocks.size()) + ")");
  const size_t c_raw = m.blocks[layer].c_raw;
  return c_raw == kAbsent ? 0.0 : double(muse::curvature(params_[c_raw]));
}

template <typename T>
void Model<T>::backward(double scale, const ResidualGrad<T>* extra) {
  const ModelConfig& c = config_;
  ModelState<T>& s = *state_;
  const ModelLayout& m = s.layout;
  const int D = c.d_model, Vp = c.padded_vocab();
  const size_t rows = size_t(s.B) * s.N;
  const T* p = params_.data();
  T* g = grads_.data();
  if (extra && (extra->layer < 0 || extra->layer >= int(m.blocks.size())))
    throw std::invalid_argument("backward: auxiliary gradient at layer " + std::to_string(extra->layer) +
                                " is outside the model");

  const T* E = embedding_matrix(s, p);
  T* dE = embedding_matrix_grad(s, g, c);
  std::vector<T>& dh = s.dh;
  dh.assign(rows * D, T(0));
  size_t top = m.blocks.size();  // blocks [0, top) are back-propagated
  if (scale != 0) {
    std::vector<T>& dlogits = s.dlogits;
    cross_entropy_backward(s, c, scale);
    // Head: logits = x_final·Eᵀ.
    std::vector<T>& dx = s.du;
    dx.assign(rows * D, T(0));
    linear_backward<T>(dx.data(), dE, nullptr, dlogits.data(), s.x_final.data(), E, int(rows), D, Vp);
    layernorm_backward<T>(dh.data(), g + m.final_gain, g + m.final_bias, dx.data(), nullptr, s.h_final.data(),
                          p + m.final_gain, s.final_mean.data(), s.final_rstd.data(), int(rows), D);
  } else if (extra) {
    top = size_t(extra->layer) + 1;  // nothing above the auxiliary loss's layer receives a gradient
  }

  for (size_t l = top; l-- > 0;) {
    if (extra && size_t(extra->layer) == l) {
      for (size_t i = 0; i < rows * D; ++i) dh[i] += extra->dh[i];
      if (m.blocks[l].c_raw != kAbsent) g[m.blocks[l].c_raw] += T(extra->dc) * curvature_grad(p[m.blocks[l].c_raw]);
    }
    block_backward(dh.data(), s, s.blocks[l], m.blocks[l], p, g, c);
  }

  if (m.positions != kAbsent)
    for (size_t r = 0; r < rows; ++r)
      for (int i = 0; i < D; ++i) g[m.positions + size_t(r % s.N) * D + i] += dh[r * D + i];
  embedding_lookup_backward<T>(dE, dh.data(), s.ids.data(), int(rows), D);
  embedding_matrix_backward(s, p, g, c);
}

template class Model<float>;
template class Model<double>;

}  // namespace muse
