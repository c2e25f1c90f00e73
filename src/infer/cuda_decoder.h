// Recurrent decoding on the GPU (SPEC §4, §6): the recurrent state of infer/decoder.h in device memory, one
// CUDA graph per step shape, O(1) work per token whatever the context.
//
// Per stream and MUSE layer the device holds the state the CPU decoder holds (DecodeState): the ring of the
// last W keys and values with each key's norms and log μ, g_{t−1} and w_J,prev·u_{t−1}, the AR-SSM state and
// conv tail, the linear-attention S and z. A step of `count` streams is a fixed sequence of kernels
// (infer/cuda_decode_kernels.cuh: 4 per block, 7 with the low-rank FFN, and the head); token ids, stream
// indices and positions reach them through device buffers, so the sequence is captured once per `count`
// as a CUDA graph and replayed with one launch.
//
// Prefill hands over exactly what the CPU decoder would hold: the prompt but its last token goes through
// the CPU decoder's parallel prefill (the model's block forward, infer/decoder.h), its state is uploaded,
// and the last token is one GPU step, whose logits are the prefill's.
//
// The head is the tied one against E materialised once, when the decoder is built (HTT: from the cores;
// dense: the table itself): the decoder must be rebuilt when the parameters change.
//
// Limits: Phase 7/8 models only — `arch = gpt` keeps a KV cache that grows with the context, which this
// decoder does not implement (the constructor refuses it; the CPU decoder serves it). fp32 throughout.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "infer/decoder.h"
#include "model/config.h"
#include "model/cuda_model.h"
#include "model/layout.h"
#include "model/model.h"

namespace muse::cuda {

class Decoder {
 public:
  // Copies the weights of `host` to the device; `host` must outlive the decoder (the prefill reads it).
  explicit Decoder(const muse::Model<float>& host, int streams = 1);
  // Shares `model`'s device parameters (it must outlive the decoder) and keeps a host copy for the prefill.
  explicit Decoder(const Model& model, int streams = 1);
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  int streams() const { return int(positions_.size()); }
  // Whether the head is SPEC §2.2's factored HTT head (an HTT model whose head kernels fit the GPU's shared
  // memory), rather than the product with the materialised table.
  bool factored_head() const;
  const ModelConfig& config() const { return config_; }
  // The stream every kernel and copy of the decoder runs on.
  cudaStream_t stream() const { return stream_; }
  // Tokens consumed by a stream: the position of its next token.
  int position(int stream) const;

  // Empties a stream's context.
  void reset(int stream);

  // Replaces a stream's context by ids [n] (n ≥ 1). Returns device logits [Vp] after the last prompt token
  // (columns ≥ V are 0), valid until the next call.
  const float* prefill(int stream, const int32_t* ids, int n);

  // Advances streams[i] by tokens[i] for i < count (distinct streams). Returns device logits [count, Vp],
  // row i for streams[i], valid until the next call. Nothing waits for the GPU: host_logits() or a
  // synchronisation of stream() does.
  const float* step(const int* streams, const int32_t* tokens, int count);
  // Every stream by one token each (tokens [streams()]).
  const float* step(const int32_t* tokens);
  // One stream by one token.
  const float* step(int stream, int32_t token);
  // Appends ids [n] (n ≥ 1) to a stream's context one step at a time; returns the device logits after the
  // last one.
  const float* feed(int stream, const int32_t* ids, int n);

  // The logits of the last prefill, step or feed copied to the host ([rows, Vp]; waits for the GPU), valid
  // until the next call.
  const float* host_logits();

  // A stream's state as the CPU decoder holds it (interchangeable with muse::Decoder<float>'s), and back.
  DecodeState<float> snapshot(int stream) const;
  void restore(int stream, const DecodeState<float>& state);

  // CUDA graphs (default on): each step shape is captured on first use and replayed. Off launches every
  // kernel from the host; both give bit-identical logits.
  void set_graphs(bool on);
  // Overlapped launches (default on): each kernel of a step may start while the previous one finishes
  // (programmatic dependent launch), so launch latency and weight fetches hide behind the previous kernel.
  // Bit-identical either way.
  void set_overlapped_launches(bool on);

 private:
  struct Buffers;

  void build(const float* device_params);
  void check_stream(int stream) const;
  void check_token(int32_t id) const;
  void check_position(int stream, int position) const;
  void enqueue_step(int count);
  void run_step(int count);
  void drop_graphs();
  void upload_state(int stream, const std::vector<float>& block, int position);

  std::unique_ptr<muse::Model<float>> host_copy_;  // when built from a cuda::Model
  const muse::Model<float>* host_ = nullptr;
  std::unique_ptr<muse::Decoder<float>> prefiller_;  // the CPU decoder that runs the parallel prefill
  ModelConfig config_;
  ModelLayout layout_;
  cudaStream_t stream_ = nullptr;
  float* owned_params_ = nullptr;
  const float* params_ = nullptr;
  std::unique_ptr<Buffers> buffers_;
  size_t stream_floats_ = 0;     // one stream's state
  int max_blocks_ = 0;           // GEMV grids: enough blocks to fill every SM once
  std::vector<int> positions_;   // tokens each stream consumed; a step stages its rows' positions
  int last_rows_ = 0;            // rows of the last step's logits
  int32_t* staging_ = nullptr;   // pinned: [streams] stream indices, [streams] tokens, [streams] positions
  cudaEvent_t staged_ = nullptr; // the end of the last step, whose first act reads staging_
  float* host_logits_ = nullptr; // pinned [streams, Vp]
  std::vector<cudaGraphExec_t> graphs_;  // by step row count
  bool graphs_on_ = true;
  bool overlap_ = true;
};

}  // namespace muse::cuda
