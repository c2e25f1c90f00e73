// CUDA windowed hyperbolic attention (SPEC §2.5, §2.3 alibi, §2.7 key-gate bias, §6 item 3): the same
// contract as ops/local_attn.h on device pointers, fp32 storage and arithmetic. Flash-style: for
// window ≤ 65 and d_h ≤ 64 (every preset) register-tiled kernels on 64-token tiles (the backward scores
// each pair once, per key tile); otherwise keys streamed through shared memory 32 at a time with an online
// softmax. The backward recomputes scores from the saved lse. See docs/kernels/attention.md.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "ops/local_attn.h"

namespace muse::cuda {

// o [B, N, D]; lse [B, N, H] (log Σ_j e^{s_ij}, saved for the backward). c is the curvature (host
// scalar, as in the CPU op), beta [H] the raw temperatures, log_mu [B, N, H] the key-gate bias or null.
// Requires d_h = D/H ≤ 256.
void local_attn_forward(float* o, float* lse, const float* q, const float* k, const float* v, float c,
                        const float* beta, const float* log_mu, const LocalAttnConfig& cfg, cudaStream_t stream = 0);

// The same with the curvature read from device memory (one float), so a model whose c is a function of a
// parameter never waits for the host.
void local_attn_forward(float* o, float* lse, const float* q, const float* k, const float* v, const float* c,
                        const float* beta, const float* log_mu, const LocalAttnConfig& cfg, cudaStream_t stream = 0);

// Floats of device workspace local_attn_backward needs: its dc/dβ partials, and with window ≤ 65 and
// d_h ≤ 64 also dq's carry between key tiles, B·N·D floats (0 when B·N = 0).
size_t local_attn_backward_workspace_floats(const LocalAttnConfig& cfg);

// Accumulates (+=) into dq, dk, dv [B, N, D], dc (one float), dbeta [H] and dlog_mu [B, N, H]; each may
// be null (dlog_mu is ignored when log_mu is null). workspace: local_attn_backward_workspace_floats(cfg)
// floats of device memory; required when dc or dbeta is non-null. Null is accepted otherwise, at the
// price of the slower streaming kernels when dq is requested. dc and dβ are reduced in a fixed order
// (per-block partials, then one reduction kernel) and no atomics are used, so results are run-to-run
// deterministic: every other gradient element is written by one thread per kernel, in a fixed kernel order.
void local_attn_backward(float* dq, float* dk, float* dv, float* dc, float* dbeta, float* dlog_mu, const float* d_o,
                         const float* o, const float* lse, const float* q, const float* k, const float* v, float c,
                         const float* beta, const float* log_mu, const LocalAttnConfig& cfg, float* workspace,
                         cudaStream_t stream = 0);

// The same with c in device memory.
void local_attn_backward(float* dq, float* dk, float* dv, float* dc, float* dbeta, float* dlog_mu, const float* d_o,
                         const float* o, const float* lse, const float* q, const float* k, const float* v,
                         const float* c, const float* beta, const float* log_mu, const LocalAttnConfig& cfg,
                         float* workspace, cudaStream_t stream = 0);

namespace detail {

// The windowed-attention engine behind local_attn (hyperbolic score) and causal_attn (scaled dot-product
// score, W = N): one set of kernels, two score functions.
enum class AttnScore { hyperbolic, dot };

struct WindowedAttnArgs {
  AttnScore score = AttnScore::hyperbolic;
  int B = 0, N = 0, H = 1, D = 0;
  int window = 1;
  bool sliding = true;
  bool alibi = false;
  bool lse_bnh = true;              // lse layout: true [B, N, H] (local_attn), false [B, H, N] (causal_attn)
  float c = 1;                      // hyperbolic only
  const float* c_device = nullptr;  // hyperbolic only: c in device memory (replaces c when set)
  const float* beta = nullptr;      // hyperbolic only, [H]
  const float* log_mu = nullptr;    // hyperbolic only, [B, N, H] or null
};

void windowed_attn_forward(float* o, float* lse, const float* q, const float* k, const float* v,
                           const WindowedAttnArgs& args, cudaStream_t stream);
size_t windowed_attn_workspace_floats(const WindowedAttnArgs& args);
void windowed_attn_backward(float* dq, float* dk, float* dv, float* dc, float* dbeta, float* dlog_mu,
                            const float* d_o, const float* o, const float* lse, const float* q, const float* k,
                            const float* v, const WindowedAttnArgs& args, float* workspace, cudaStream_t stream);

}  // namespace detail

}  // namespace muse::cuda
