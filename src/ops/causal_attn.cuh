// CUDA causal softmax attention of the gpt baseline (SPEC §2.8): the same contract as ops/causal_attn.h on
// device pointers, fp32. It runs on the windowed-attention engine of ops/local_attn.cu (sliding window
// W = N, score q·k/√d_h − m_h·(i − j)): flash-style forward with online softmax, backward recomputing
// scores from lse. See docs/kernels/attention.md.
#pragma once
#include <cuda_runtime.h>

namespace muse::cuda {

// o [B, N, D]; lse [B, H, N] (note: head-major, as in the CPU op). Requires d_h = D/H ≤ 256.
void causal_attn_forward(float* o, float* lse, const float* q, const float* k, const float* v, int B, int N, int H,
                         int D, bool alibi, cudaStream_t stream = 0);

// Accumulates (+=) into dq, dk, dv [B, N, D] (each may be null) from do_ [B, N, D]. Deterministic: every
// gradient element is written by one thread, no atomics.
void causal_attn_backward(float* dq, float* dk, float* dv, const float* do_, const float* q, const float* k,
                          const float* v, const float* o, const float* lse, int B, int N, int H, int D, bool alibi,
                          cudaStream_t stream = 0);

}  // namespace muse::cuda
