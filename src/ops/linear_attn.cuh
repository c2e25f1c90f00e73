// CUDA causal tangent-space linear attention with the key gate (SPEC §2.7, §6 item 4): the same contract
// as ops/linear_attn.h on device pointers, fp32. With a workspace and d_h ≤ 64 it runs in 64-token chunks
// as matrix products (the states between chunks summed first); otherwise one block per (b, h) scans the
// sequence with the d_h × (d_h + 1) state [S | z] in registers, the backward replaying the states like the
// CPU op. See docs/kernels/attention.md.
//
// Precision: the chunks' and the segment sums' matrix products run on the tensor cores, 3xTF32 (fp32-accurate)
// when BlasLt::current()'s GemmMath is fp32, one TF32 pass (operands rounded to 11 significant bits) under
// tf32 and bf16, the precision those GEMMs run at; sums accumulate in fp32 either way.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace muse::cuda {

// o [B, N, D]; zeta [B, N, H] (z_iᵀφ(q_i) before the clamp); final_S [B, H, d_h, d_h] and final_z
// [B, H, d_h] receive the state after the last position (each may be null). Requires d_h = D/H ≤ 128.
void linear_attn_forward(float* o, float* zeta, float* final_S, float* final_z, const float* q, const float* k,
                         const float* v, const float* mu, int B, int N, int D, int H, cudaStream_t stream = 0);

// With a workspace (linear_attn_forward_workspace_floats(B, N, D, H) floats): the chunked form for d_h ≤ 64;
// for wider heads, when the (b, h) pairs alone leave the GPU short of blocks (under ~512), the scan is split
// into segments (multiples of 64 tokens) that start from states summed first. Without a workspace, one
// block per (b, h) scans the whole sequence.
size_t linear_attn_forward_workspace_floats(int B, int N, int D, int H);
void linear_attn_forward(float* o, float* zeta, float* final_S, float* final_z, const float* q, const float* k,
                         const float* v, const float* mu, int B, int N, int D, int H, float* workspace,
                         cudaStream_t stream = 0);

// Floats of device workspace linear_attn_backward needs: dζ of every (b, i, h), and the states between
// 64-token chunks (both directions at once in the chunked form).
size_t linear_attn_backward_workspace_floats(int B, int N, int D, int H);

// Accumulates (+=) into dq, dk, dv [B, N, D] and dmu [B, N, H] (each may be null; dmu is ignored when mu
// is null), or with accumulate = false writes them (they need no zeroing), from d_o, given the forward's
// inputs, its output o and its zeta (the chunked form takes dζ from o; the scan replays the numerators).
// workspace: linear_attn_backward_workspace_floats(B, N, D, H) floats of
// device memory (required unless all gradients are null). forward_workspace: the workspace the forward ran
// with, untouched since, or null: the chunked form then reads the states between chunks from it instead of
// summing them again. Every gradient element is written by one thread in a fixed order: deterministic, no
// atomics.
void linear_attn_backward(float* dq, float* dk, float* dv, float* dmu, const float* d_o, const float* o,
                          const float* zeta, const float* q, const float* k, const float* v, const float* mu, int B,
                          int N, int D, int H, float* workspace, const float* forward_workspace = nullptr,
                          cudaStream_t stream = 0, bool accumulate = true);

}  // namespace muse::cuda
