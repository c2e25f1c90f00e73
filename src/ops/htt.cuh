// CUDA HTT embedding (SPEC §2.2) and embedding lookup: the same contract as ops/htt.h (HttShape from
// htt_shape(), fp32 device pointers). The tied head is linear_forward/linear_backward of ops/linear.cuh.
//
// Deterministic everywhere (no atomics): every output element is produced by one thread that sums in a
// fixed order. The lookup backward adds the rows dx[t] into dE[ids[t]] in token order like the CPU op
// (the same fp32 adds in the same order, so it is bit-identical to it).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ops/htt.h"

namespace muse::cuda {

// Â, ‖A‖ (floored), B̂, ‖B‖ (floored) from the cores: one warp per core row.
void htt_normalize_cores(float* A_hat, float* A_norm, float* B_hat, float* B_norm, const float* A, const float* B,
                         const HttShape& shape, cudaStream_t stream = 0);

// E [Vp, D] from the cores (rows ≥ V zero). Saves Â, ‖A‖, B̂, ‖B‖ for the backward.
void htt_materialize_forward(float* E, float* A_hat, float* A_norm, float* B_hat, float* B_norm, const float* A,
                             const float* B, const float* theta, const HttShape& shape, cudaStream_t stream = 0);

// Floats of scratch htt_materialize_backward needs when dtheta is non-null: v1·r (per-digit partial dc_s).
size_t htt_backward_scratch_floats(const HttShape& shape);

// Contracts dE [Vp, D] into dA, dB, dθ (each may be null; accumulated; rows ≥ V of dE ignored). scratch:
// htt_backward_scratch_floats(shape) floats of device memory, needed only when dtheta is non-null (may
// be null otherwise); no initialisation needed.
void htt_materialize_backward(float* dA, float* dB, float* dtheta, const float* dE, const float* A_hat,
                              const float* A_norm, const float* B_hat, const float* B_norm, const float* theta,
                              const HttShape& shape, float* scratch, cudaStream_t stream = 0);

// x[n, D] = E[ids[n]] (ids in [0, V), device int32); the bf16 table (serving) is widened to fp32.
void embedding_lookup_forward(float* x, const float* E, const int32_t* ids, int n, int D, cudaStream_t stream = 0);
void embedding_lookup_forward(float* x, const __nv_bfloat16* E, const int32_t* ids, int n, int D,
                              cudaStream_t stream = 0);

// Bytes of scratch embedding_lookup_backward needs for n tokens of ids below vocab.
size_t embedding_lookup_backward_scratch_bytes(int n, int vocab);

// dE[ids[t]] += dx[t], every element summed in token order (deterministic, no atomics): the tokens are
// sorted by id (stably), then one warp per (id, 32-column slice) walks the id's tokens in order. ids in
// [0, vocab); scratch: embedding_lookup_backward_scratch_bytes(n, vocab) bytes, 256-byte aligned, no
// initialisation needed.
void embedding_lookup_backward(float* dE, const float* dx, const int32_t* ids, int n, int D, int vocab,
                               void* scratch, cudaStream_t stream = 0);

}  // namespace muse::cuda
