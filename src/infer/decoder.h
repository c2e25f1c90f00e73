// Recurrent decoding (SPEC §4): a prompt is prefilled by the model's parallel block forward, which hands
// its state over, and then every generated token costs O(1) work and memory in a Phase 7/8 model —
// whatever the length of the context.
//
// Per MUSE layer and stream the state is (SPEC §4):
//   * a ring buffer of the last W tangent keys and values with, per key and head, √c‖k‖, ln sinh 2a and
//     log μ (block mode: the current block, emptied at each block boundary)        ops/local_attn.h
//   * the BK Green function g_{t−1} and w_J,prev·u_{t−1}                            ops/bk.h
//   * the AR-SSM state S [R] and the conv tail (u_{t−2}, u_{t−1})                    ops/ssm.h
//   * the linear-attention state S [H, d_h, d_h] and z [H, d_h]                      ops/linear_attn.h
// `arch = gpt` layers keep a KV cache of every position instead: the baseline's cost grows with context.
//
// A Decoder serves `streams` independent sequences. step() advances any subset of them by one token
// each; the streams of one step share every weight read (they are the rows of one GEMM). A stream's
// state is a plain value (DecodeState): snapshot() copies it, restore() puts it back, so a prompt can be
// cached and continued several times.
//
// Positions: alibi and none have no length limit; learned positions stop at max_seq with an error that
// names it. The head is the tied one: the factored HTT head of SPEC §2.2 (E is never materialised) or
// the dense table.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/layout.h"
#include "model/model.h"
#include "model/model_state.h"
#include "ops/htt.h"
#include "ops/local_attn.h"
#include "ops/ssm.h"

namespace muse {

template <typename T>
struct LayerDecodeState {
  // Phase 7 / Phase 8 layers
  LocalAttnDecodeState<T> window;
  T bk_g_prev[2] = {T(0), T(0)};  // g_{t−1} (Re, Im)
  T bk_prev_half = T(0);          // w_J,prev·u_{t−1} (hopping only)
  std::vector<T> ssm_S;           // [R]
  std::vector<T> ssm_conv_tail;   // [2, D]: u_{t−2}, u_{t−1}
  std::vector<T> lin_S, lin_z;    // [H, d_h, d_h], [H, d_h] (Phase 8 with linear attention)
  // gpt layers
  std::vector<T> kv_keys, kv_values;  // [position, D]
};

template <typename T>
struct DecodeState {
  int position = 0;  // tokens consumed so far: the position of the next token
  std::vector<LayerDecodeState<T>> layers;
};

template <typename T>
class Decoder {
 public:
  // Reads the model's parameters; the model must outlive the decoder, and a decoder made before its
  // parameters change (training, loading) must be rebuilt: the normalised HTT cores are taken here.
  explicit Decoder(const Model<T>& model, int streams = 1);

  int streams() const { return int(states_.size()); }
  const ModelConfig& config() const { return config_; }
  // Tokens consumed by a stream: the position of its next token.
  int position(int stream) const;

  // Empties a stream's context.
  void reset(int stream);

  // Replaces a stream's context by ids [n] (n ≥ 1): one parallel forward over the prompt, then the state
  // hand-over. Returns the logits [Vp] after the last prompt token (columns ≥ V are 0), valid until the
  // next call.
  const T* prefill(int stream, const int32_t* ids, int n);

  // Advances streams[i] by tokens[i] for i < count (distinct streams). Returns logits [count, Vp], row i
  // for streams[i], valid until the next call.
  const T* step(const int* streams, const int32_t* tokens, int count);
  // Every stream by one token each (tokens [streams()]).
  const T* step(const int32_t* tokens);
  // One stream by one token.
  const T* step(int stream, int32_t token);

  // Appends ids [n] (n ≥ 1) to a stream's context one token at a time (how chat adds a turn to a live
  // history). Returns the logits after the last one.
  const T* feed(int stream, const int32_t* ids, int n);

  DecodeState<T> snapshot(int stream) const;
  void restore(int stream, const DecodeState<T>& state);

  // Bytes of a stream's state (constant in the context for Phase 7/8, growing for gpt).
  size_t state_bytes(int stream) const;

 private:
  void check_stream(int stream) const;
  void check_token(int32_t id) const;
  void check_position(int position) const;
  void embed(T* x, const int32_t* ids, const int* positions, int rows);
  void head(T* logits, const T* h, int rows);
  void muse_layer_step(int l, T* h_out, const T* h, const int* streams, int rows);
  void gpt_layer_step(int l, T* h_out, const T* h, const int* streams, int rows);
  void handover(int l, DecodeState<T>& state, const BlockActs<T>& acts, int N);
  void empty_state(DecodeState<T>& state) const;

  const Model<T>& model_;
  ModelConfig config_;
  ModelLayout layout_;
  HttShape htt_{};
  std::vector<T> A_hat_, B_hat_;  // normalised HTT cores (HTT embedding only)
  std::vector<DecodeState<T>> states_;

  // step scratch, sized for the widest step so far
  std::vector<T> x_, y_, u_, mean_, rstd_, delta_, g_, F_, g_prev_, prev_half_, q_, k_, v_, mu_, log_mu_;
  std::vector<T> o_loc_, o_lin_, mixed_, y_att_, y_glob_, xi_, capped_, mix_mean_, mix_rstd_, h_mid_;
  std::vector<T> u2_, low1_, pre_, hidden_, low2_, logits_;
  SsmDecodeState<T> ssm_batch_;
};

extern template class Decoder<float>;
extern template class Decoder<double>;

// A step names each stream at most once (both decoders' step()): throws naming the repeated stream.
void require_distinct_streams(const int* streams, int count);

// Where a decoder of this model runs for --device cpu|cuda|auto: "cpu" or "cuda". auto takes the GPU when one
// is visible, except for arch = gpt, whose growing KV cache only the CPU decoder keeps.
std::string resolve_decode_device(const std::string& requested, const ModelConfig& config);

}  // namespace muse
