// One block of the model (SPEC §2.8): the Phase 7 / Phase 8 MUSE block or the `arch = gpt` baseline,
// forward and backward, and the embedding/head pieces the model wraps around the blocks. Internal to
// model/*.cpp and the decoder: these work on the model's activations (model_state.h).
#pragma once
#include <algorithm>

#include "common/math.h"
#include "model/config.h"
#include "model/model_state.h"
#include "ops/bk.h"
#include "ops/ffn.h"
#include "ops/local_attn.h"
#include "ops/ssm.h"

namespace muse {

inline constexpr double kCurvatureMin = 0.01, kCurvatureMax = 10.0;

// c = 0.01 + softplus(c_raw), capped at 10 (SPEC §2.1); no hard clamp at the low end.
template <typename T>
T curvature(T c_raw) {
  return std::min(T(kCurvatureMin) + softplus(c_raw), T(kCurvatureMax));
}
template <typename T>
T curvature_grad(T c_raw) {
  return T(kCurvatureMin) + softplus(c_raw) < T(kCurvatureMax) ? sigmoid(c_raw) : T(0);
}
// The pieces of a block's configuration that the forward, the recurrent decoder (infer/decoder.h) and the
// GPU model (model/cuda_model.h) share, so all read the parameters the same way. p and g are the flat
// parameter and gradient arrays (host or device: only offsets are taken).
LocalAttnConfig attn_config(const ModelConfig& c, int B, int N);
SsmConfig ssm_config(const ModelConfig& c, int B, int N);
template <typename T>
BkParams<T> bk_params(const BlockLayout& b, const T* p, const ModelConfig& c);
template <typename T>
SsmParams<T> ssm_params(const BlockLayout& b, const T* p);
template <typename T>
LowRankFfnParams<T> ffn_params(const BlockLayout& b, const T* p);
template <typename T>
SsmGrads<T> ssm_grads(const BlockLayout& b, T* g);
template <typename T>
BkGrads<T> bk_grads(const BlockLayout& b, T* g);
template <typename T>
LowRankFfnGrads<T> ffn_grads(const BlockLayout& b, T* g);
template <typename T>
DenseMlpParams<T> mlp_params(const BlockLayout& b, const T* p);
template <typename T>
DenseMlpGrads<T> mlp_grads(const BlockLayout& b, T* g);

// h_out [B·N, D] = block(acts.h_in), keeping the activations in acts.
template <typename T>
void block_forward(T* h_out, BlockActs<T>& acts, const BlockLayout& layout, const T* params, const ModelConfig& c,
                   int B, int N);

// dh [B·N, D] holds ∂L/∂h_out on entry and ∂L/∂h_in on return; parameter gradients accumulate in grads.
template <typename T>
void block_backward(T* dh, ModelState<T>& state, BlockActs<T>& acts, const BlockLayout& layout, const T* params,
                    T* grads, const ModelConfig& c);

}  // namespace muse
