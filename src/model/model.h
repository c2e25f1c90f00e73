// The whole language model (SPEC §2.8): embedding (+ learned positions), L blocks (Phase 7, Phase 8 or
// the `arch = gpt` baseline), the final LayerNorm and the tied head, with forward, loss and backward.
// Templated on the float type: float for training and inference, double for gradient checks.
//
// Parameters and gradients live in two flat arrays described by the parameter table; activations of the
// last forward are kept for the backward (sized for the largest batch seen so far).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "model/config.h"
#include "model/params.h"

namespace muse {

// Target id that the loss skips.
inline constexpr int32_t kXentIgnore = -1;

template <typename T>
struct ModelState;  // activations and parameter offsets (model/model_state.h)

// The gradient of an auxiliary loss that reads the residual stream after block `layer` and that block's
// curvature (the diagnostics' losses, SPEC §5): backward() adds dh [B·N, D] to ∂L/∂h when it reaches
// that point of the stack, and dc·∂c/∂c_raw to the block's c_raw.
template <typename T>
struct ResidualGrad {
  int layer = 0;
  const T* dh = nullptr;
  double dc = 0;
};

template <typename T>
class Model {
 public:
  explicit Model(const ModelConfig& config);
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;

  const ModelConfig& config() const { return config_; }
  const ParamTable& table() const { return table_; }
  std::vector<T>& params() { return params_; }
  const std::vector<T>& params() const { return params_; }
  std::vector<T>& grads() { return grads_; }

  // SPEC §2.10 initialisation, deterministic in the seed.
  void init(uint64_t seed);
  void zero_grads();

  // Runs the model on ids [B, N] (each < vocab_size, checked) and keeps the activations.
  void forward(const int32_t* ids, int B, int N);
  // logits [B·N, Vp] of the last forward (columns ≥ vocab_size are padding).
  const T* logits() const;

  // Cross-entropy of the last forward against targets [B, N] (−1 = ignored): returns the mean over
  // counted targets and remembers the probabilities for backward(). total_nats (optional) receives the
  // sum, count the number of counted targets.
  double loss(const int32_t* targets, double label_smoothing = 0.0, double* total_nats = nullptr,
              int64_t* count = nullptr);
  // Backward of `scale ·` the last loss() (scale 1/accumulation steps for accumulation) plus the
  // auxiliary gradient `extra`, if any: accumulates into grads(). With scale 0 the head is skipped (no
  // loss() call is needed) and the pass starts at extra->layer.
  void backward(double scale = 1.0, const ResidualGrad<T>* extra = nullptr);

  // Residual stream after block `layer` (0 ≤ layer < n_layers) of the last forward, [B·N, D]; the last
  // block's output is the input of LN_final.
  const T* residual(int layer) const;
  // Curvature c of block `layer` (SPEC §2.1); 0 for arch = gpt, whose blocks have none.
  double curvature(int layer) const;

 private:
  ModelConfig config_;
  ParamTable table_;
  std::vector<T> params_, grads_;
  std::unique_ptr<ModelState<T>> state_;
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace muse
