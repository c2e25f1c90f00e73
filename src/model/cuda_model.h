// The whole language model on one GPU (SPEC §2.8, §6): the same math, parameter table and layout as
// model/model.h, with parameters, gradients and activations in device memory and every op a CUDA kernel
// of ops/*.cuh (fp32 storage and arithmetic, cuBLASLt GEMMs without TF32).
//
// A training step issues no host synchronisation: token ids go through a pinned staging buffer with
// asynchronous copies, the curvature c and every reduction stay on the device, and the losses of the
// micro-batches add up in a device accumulator that the caller reads once per step (loss_sum()).
//
// Activations live in one arena sized by reserve(B, N) (or by the first forward of a larger shape) and
// reused, so the steady state allocates nothing.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"
#include "model/layout.h"
#include "model/params.h"
#include "ops/linear.cuh"

namespace muse::cuda {

struct BlockBuffers;  // one block's activations (cuda_model.cpp)

class Model {
 public:
  explicit Model(const ModelConfig& config);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return config_; }
  const ParamTable& table() const { return table_; }
  size_t size() const { return table_.total(); }
  cudaStream_t stream() const { return stream_; }

  // Device arrays of size() floats.
  float* params() { return params_; }
  const float* params() const { return params_; }
  float* grads();

  // Copies between the host and the device (synchronous).
  void upload_params(const float* host);
  void download_params(float* host) const;
  void download_grads(float* host) const;
  void zero_grads();

  // Sizes the activation arena for batches up to B×N tokens (forward grows it on demand otherwise).
  void reserve(int B, int N);
  // Inference only: the arena leaves out the backward's buffers (and backward() refuses to run). Gradients
  // are allocated on first use either way. Turning it off also ends serving.
  void set_inference_only(bool inference_only);
  // Serving (SPEC §7's forward: what a user's inference costs): E is materialised once from the current
  // parameters and kept in bf16 for the embedding lookup (widened to fp32) and the head, and forward()
  // writes bf16 logits (logits_bf16()) with a bf16 GEMM (fp32 accumulation) instead of fp32 ones, so
  // logits() and loss() are unavailable. Needs inference-only mode; upload_params() refreshes the kept E, and so must a
  // second call after writing params() directly.
  void prepare_serving();
  bool serving() const { return serving_; }
  // The math of the model's GEMMs (ops/linear.cuh): fp32 (default; the reference mode the tests compare
  // with the CPU), tf32 (tensor cores; `muse eval --device cuda`'s default) or bf16 (bf16 tensor cores, the
  // default of `muse train` and `bench`; the training head then multiplies bf16 copies of x and E into bf16
  // logits, which the cross-entropy overwrites with their gradient for the head's two backward GEMMs).
  void set_gemm_math(GemmMath math) { gemm_math_ = math; }
  GemmMath gemm_math() const { return gemm_math_; }
  // Bytes of device memory held: parameters, gradients, activations and workspaces.
  size_t device_bytes() const;

  // Runs the model on host ids [B, N] (each < vocab_size, checked on the host) and keeps the activations. An
  // inference-only model writes the logits; a training model stops at the final LayerNorm, and its head runs
  // in loss() (SPEC §6.7: the B·N×Vp logits never exist at once).
  void forward(const int32_t* ids, int B, int N);
  // Device logits [B·N, Vp] of the last forward (columns ≥ vocab_size are padding); logits_bf16() when
  // serving. A training model computes them on demand into a buffer of their own (a GEMM and B·N·Vp floats
  // held from then on: for tests and inspection; training never calls it), valid until the next call; it
  // synchronises.
  const float* logits() const;
  const __nv_bfloat16* logits_bf16() const;

  // Cross-entropy of the last forward against host targets [B, N] (−1 = ignored). The mean over counted
  // targets and the count stay on the device (loss_result()); with accumulate_scale ≠ 0 the mean times that
  // scale is also added to the device accumulator that loss_sum() reads. A training model runs its head here,
  // head_chunk_rows() rows at a time: the logits GEMM, one kernel for the rows' losses and (with_gradient)
  // the gradient over the chunk, and with_gradient the chunk's share of the head's backward GEMMs. backward()
  // needs with_gradient; an evaluation leaves it off and skips those GEMMs.
  void loss(const int32_t* targets, double label_smoothing = 0.0, double accumulate_scale = 0.0,
            bool with_gradient = false);
  // Rows of the training head's chunk: 0 (default) sizes it to 1 GiB of fp32 logits (5,336 rows of the GPT-2
  // vocabulary), capped by the batch; tests set a few rows to run several chunks.
  void set_head_chunk_rows(int rows) { head_chunk_rows_ = rows; }
  // Device pair {mean loss, count} of the last loss().
  const float* loss_result() const;

  struct Arena;  // activations and scratch (defined in cuda_model.cpp)

  // CUDA graphs (default on): each forward and backward pass is captured once per shape (and serving mode,
  // GEMM math, loss scale and smoothing) and replayed with one launch after that. Off runs every kernel
  // from the host; both give bit-identical results.
  void set_graphs(bool on);

  // Per-op timing (`muse bench --profile`): with profiling on, the forward and backward record a CUDA event
  // after each group of kernels (one LayerNorm, the q/k/v GEMMs, the attention, the AR-SSM, …), and the
  // time since the previous event is added to that group's name, summed over layers and calls. It costs a
  // synchronisation per pass, so leave it off when timing for real. mark() lets callers time their own
  // kernels on stream() (the optimizer) the same way.
  void set_profiling(bool on);
  void mark(const char* name);
  // Milliseconds per group since profiling was turned on, in the order the groups first ran.
  std::vector<std::pair<std::string, double>> profile() const;
  // Reads the last loss() (synchronises): the sum of the counted targets' losses and their count.
  void read_loss(double* total_nats, int64_t* count) const;
  // Reads (synchronises) and clears the accumulator.
  double take_loss_sum();
  // Backward of scale· the last loss(), which must have run with_gradient: accumulates into grads().
  void backward(double scale = 1.0);

 private:
  void forward_pass();
  // loss()'s kernels: the cross-entropy, and for a training model the chunked head.
  void head_pass(bool with_gradient, float accumulate_scale);
  // E as the head reads it: the dense table, or the HTT materialisation of the last forward.
  const float* head_weights() const;
  void backward_pass(double scale);
  // Runs body (one pass's kernels on stream_) through the graph cache: captured on first use of the key.
  void run_pass(int pass, float scale, const std::function<void()>& body);
  void block_forward(int layer, const float* h_in, float* h_out);
  void block_backward(int layer, float* dh);
  void muse_block_forward(int layer, const float* h_in, float* h_out);
  void muse_block_backward(int layer, float* dh);
  void gpt_block_forward(int layer, const float* h_in, float* h_out);
  void gpt_block_backward(int layer, float* dh);
  void qkv_forward(const BlockLayout& b, BlockBuffers& a);
  void qkv_backward(const BlockLayout& b, const BlockBuffers& a);
  long long qkv_weight_stride(const BlockLayout& b) const;
  void ssm_forward(int layer, float* y);
  void ssm_backward(int layer);
  void materialize_embedding(float* E, float* saved);
  void end_serving();
  void stage_tokens(int32_t* device, const int32_t* host, size_t n, size_t slot);
  void mark_start();
  void resolve_marks() const;
  void zero(float* p, size_t n);
  ModelConfig config_;
  ParamTable table_;
  ModelLayout layout_;
  float* params_ = nullptr;
  // Training in bf16 math: the parameters rounded to bf16 (the weights' GEMM operands), refreshed by every
  // forward pass; allocated on first use.
  __nv_bfloat16* params_bf16_ = nullptr;
  float* grads_ = nullptr;
  double* loss_sum_ = nullptr;
  int32_t* host_tokens_[2] = {nullptr, nullptr};  // pinned staging: slot 0 ids, slot 1 targets
  size_t host_tokens_capacity_[2] = {0, 0};
  cudaEvent_t staged_[2] = {nullptr, nullptr};     // each slot's last copy, waited on before reuse
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<Arena> arena_;
  int B_ = 0, N_ = 0;
  float smoothing_ = 0;
  int head_chunk_rows_ = 0;
  bool head_gradient_ready_ = false;  // the last loss() left the head's gradient for backward()
  bool inference_only_ = false;
  bool serving_ = false;
  __nv_bfloat16* serving_E_bf16_ = nullptr;
  GemmMath gemm_math_ = GemmMath::fp32;
  struct Profiler;
  std::unique_ptr<Profiler> profiler_;  // null when profiling is off
  struct Graphs;
  std::unique_ptr<Graphs> graphs_;
  bool graphs_on_ = true;
};

}  // namespace muse::cuda
