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
  // Backward of `scale ·` the last loss() (scale 1/accumulation steps for accumulation): accumulates
  // into grads().
  void backward(double scale = 1.0);

 private:
  ModelConfig config_;
  ParamTable table_;
  std::vector<T> params_, grads_;
  std::unique_ptr<ModelState<T>> state_;
};

extern template class Model<float>;
extern template class Model<double>;

}  // namespace muse
