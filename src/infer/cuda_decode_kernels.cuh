// The kernels of one recurrent decode step on the GPU (infer/cuda_decoder.h; SPEC §4, §6): a Phase 7/8
// block is four launches, six with the low-rank FFN, each serving every stream of the step at once, and
// the head one more.
//
//   block_input   LayerNorm (+ radius δ) of each row (the embedding too, in layer 0), then one GEMV over u
//                 for q, k, v, the AR-SSM gate's first layer, W_U, W_V and the BK projections w_v, w_J
//   mixer         per row: the BK step (g, F); per (row, head): push the new key into the ring, windowed
//                 hyperbolic attention, linear-attention update, curvature mix; per row: the AR-SSM step
//                 (gate, mask, scan, readout, W_O, conv)
//   gemv          y_att = W_o·mixed
//   residual_mix  ξ, cap30, LN_h and the residual add of each row, LN_ffn, then the GEMV V₁
//   ffn_up        the low-rank FFN's U₁ (+GELU, cap) and V₂ over slices of the hidden units: each block's
//                 share of low2 = V₂·hidden
//   ffn_down      the shares' sum, then U₂ (+b₂, + residual)
//   head          LN_final, logits = x·Eᵀ, and every stepped stream's position advances; for an HTT
//                 embedding two kernels instead (htt_head_z, htt_head_logits: the factored head of §2.2,
//                 whose chunks of rows, or rows, are gridDim.z)
//
// Rows are the step's streams (at most kRowsPerChunk per block; gridDim.y covers more). The kernels that
// start with a row-wise prologue (block_input, residual_mix, head) give each row of their chunk to one
// warp, keep the prologue's output in shared memory, and then share the GEMV engine with the plain gemv
// kernel: one warp per output (or `split` warps over slices of K for narrow outputs), 16-byte loads of
// the weight row, every row of the chunk against it, a warp reduction. Each output is summed in an order
// that depends on neither the number of rows nor the grid, so a stream's logits do not depend on which
// other streams step with it, and every run is bit-identical (no sum uses atomics).
//
// Everything is fp32; the scalar functions are common/math.h's and ops/poincare.h's, as the CPU ops use.
//
// Overlapped launches (programmatic dependent launch, sm_90): a kernel launched with `overlap` may start
// while the previous one still runs; it prefetches its first weight rows into L2, then waits for the
// previous kernel to finish (and, through it, every earlier one) before it reads what that kernel wrote.
// What it reads from earlier kernels is complete when it starts (the previous kernel lets it start only
// after its own wait), and so is the recurrent state of the last step: those, and the parameters, are copied
// into shared memory before the wait (cp.async), so the wait is followed by one round of loads, not several.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace muse::cuda::decode {

inline constexpr int kRowsPerChunk = 8;   // rows of a step one block serves (one warp each in the prologues)
inline constexpr int kMaxSegments = 8;    // weight matrices one GEMV launch can cover
inline constexpr int kGemvBlocksPerSm = 4;  // 256-thread GEMV blocks resident per SM (registers capped to fit)

enum class Epilogue : int { none, relu };

// One weight matrix of a GEMV: y[row, j] = epilogue(W[j]·x[row] + bias[j]) + residual[row, j].
struct GemvSegment {
  const float* W = nullptr;         // [out, K] row-major
  const float* bias = nullptr;      // [out] or null
  const float* residual = nullptr;  // [rows, out], added after the epilogue, or null
  float* y = nullptr;               // [rows, out]
  int out = 0;
  Epilogue epilogue = Epilogue::none;
};

// Weight matrices that read the same input x [rows, K], as one launch.
struct GemvPlan {
  GemvSegment segments[kMaxSegments];
  int count = 0;    // segments in use
  int K = 0;        // input width
  int total = 0;    // Σ out
  int split = 1;    // warps per output (1, 2, 4 or 8): slices of K, summed in slice order
  // Derived from split by make_gemv_plan, so that the kernels divide by nothing at run time: log2(split),
  // outputs per tile (kGemvWarps / split), tiles, and K-units (float4s with vec4, else floats) per slice.
  int split_shift = 0, per_tile = 0, tiles = 0, per_slice = 0;
  bool vec4 = false;  // K % 4 == 0 and every W 16-byte aligned: float4 loads
};

// A plan over `segments` (at most kMaxSegments) with the split chosen for the output count and K.
GemvPlan make_gemv_plan(const std::vector<GemvSegment>& segments, int K);

// The rows of one step: each row's stream, token and position (the tokens its stream consumed before this
// one). The host stages all three: a kernel reads a row's position in one load, not through its stream.
struct StepRows {
  const int* streams = nullptr;     // [count]
  const int32_t* tokens = nullptr;  // [count]
  const int* positions = nullptr;   // [count]
  int count = 0;
};

// One layer's recurrent state (SPEC §4) for stream 0; stream s's is at + s·stream_floats for every
// pointer. Keys sit in ring slot position % W (block mode too: a block starts at a multiple of W), so
// which slots are valid follows from the position alone.
struct LayerState {
  float* keys = nullptr;       // [W, D] tangent keys
  float* values = nullptr;     // [W, D]
  float* key_norms = nullptr;  // [W, H, 4]: ‖k‖ (floored), a = √c‖k‖, ln sinh 2a, coth 2a (ops/poincare.h)
  float* log_mu = nullptr;     // [W, H] key-gate bias, or null without the gate
  float* bk = nullptr;         // [2, 4] by position parity: g_{t−1} (Re, Im), w_J,prev·u_{t−1}, unused
  float* ssm_S = nullptr;      // [R]
  float* conv_tail = nullptr;  // [2, D]: u_{t−2}, u_{t−1}
  float* lin_S = nullptr;      // [H, d_h, d_h], or null without linear attention
  float* lin_z = nullptr;      // [D], or null
  size_t stream_floats = 0;
};

// The parameters and buffers the kernels of one MUSE block read and write (device pointers; a null
// parameter means the config has no such tensor).
struct BlockArgs {
  int D = 0, H = 0, W = 0, R = 0;
  bool phase8 = false, sliding = true, linear_attn = false, curvature_mix = false;
  // block input
  const float *ln_gain = nullptr, *ln_bias = nullptr;
  // BK step (w_v and w_J run in block_input's GEMV)
  bool hopping = false;
  const float *bk_b_J = nullptr, *bk_eps_p = nullptr, *bk_E0 = nullptr;
  float j_max = 1;
  // attention
  const float *c_raw = nullptr, *beta = nullptr, *key_gate_w = nullptr, *key_gate_b = nullptr;
  const float* alibi_slopes = nullptr;  // [H], or null without alibi
  // AR-SSM
  const float *ssm_w2 = nullptr, *ssm_b2 = nullptr, *ssm_w_o = nullptr, *ssm_b_o = nullptr, *conv = nullptr;
  const float* ssm_ell = nullptr;  // null: Phase 7's plain prefix sum
  const float *rank_w1 = nullptr, *rank_b1 = nullptr, *rank_w2 = nullptr, *rank_b2 = nullptr, *pi_w = nullptr,
              *pi_b = nullptr;  // null rank_w1: no rank mask
  // mix
  const float *xi_w = nullptr, *xi_b = nullptr, *xi_s = nullptr;
  const float *ln_h_gain = nullptr, *ln_h_bias = nullptr;
  const float *ln_ffn_gain = nullptr, *ln_ffn_bias = nullptr;  // null: no FFN
  LayerState state;
};

// Step scratch, [count, ·] each.
struct StepBuffers {
  float *u = nullptr, *delta = nullptr, *g = nullptr, *F = nullptr;  // D, 1, 2, 3
  float *bk_v = nullptr, *bk_J = nullptr;  // 1: w_v·u + b_v; 2: w_J,prev·u, w_J,cur·u (hopping only)
  float *q = nullptr, *k = nullptr, *v = nullptr;                   // D each
  float *ssm_hidden = nullptr, *proj_u = nullptr, *proj_v = nullptr;  // D/4, R, R
  float *mixed = nullptr, *y_att = nullptr, *y_glob = nullptr;      // D each
};

// The embedding that layer 0's block_input gathers: h = E[token] (+ P[position]).
struct Embedding {
  const float* E = nullptr;          // [Vp, D]
  const float* positions = nullptr;  // [max_seq, D], or null
};

// Hidden units of the low-rank FFN one ffn_up block owns, and D outputs one ffn_down block computes.
inline constexpr int kFfnSlice = 32;
inline constexpr int kFfnDownOutputs = 32;

// The low-rank FFN of a block: h_out = h_mid + U₂·(V₂·cap10(GELU(U₁·low1 + b₁))) + b₂ (ops/ffn.cpp), in two
// kernels. ffn_up's block x owns hidden units [x·kFfnSlice, …) and writes its share of V₂·hidden into
// `partials`; ffn_down's block x adds the slices' shares (in slice order) and computes kFfnDownOutputs outputs
// of U₂.
struct FfnPlan {
  const float *u1 = nullptr, *b1 = nullptr;  // [F, ρ], [F]
  const float* v2 = nullptr;                 // [ρ, F]
  const float *u2 = nullptr, *b2 = nullptr;  // [D, ρ], [D]
  int D = 0, F = 0, rho = 0;
  int slices = 0;                // ffn_up's blocks along x: ⌈F / kFfnSlice⌉
  const float* low1 = nullptr;   // [rows, ρ]: residual_mix's V₁·LN_ffn(h_mid)
  const float* h_mid = nullptr;  // [rows, D]
  float* h_out = nullptr;        // [rows, D]
  float* partials = nullptr;     // [slices, rows, ρ]
};

// The geometry of an FfnPlan for width D and rank ρ (and the kernels' shared-memory limits, a per-kernel
// attribute: call before the first launch). The caller fills in the pointers; partials is its buffer
// (ffn_partial_floats).
FfnPlan make_ffn_plan(int D, int rho);
size_t ffn_partial_floats(const FfnPlan& plan, int rows);

// Largest shared memory a prologue kernel (block_input, residual_mix, head) asks for at width D.
size_t prologue_shared_bytes(int D);
// Shared memory of the mixer kernel for width D, H heads, window W, SSM rank R (and linear attention).
size_t mixer_shared_bytes(int D, int H, int W, int R, bool linear_attn);
// Lets the kernels ask for the shared memory such a model needs beyond the 48 KiB default (a per-kernel
// attribute: call before the first launch).
void configure_kernels(int D, int H, int W, int R, bool linear_attn);

// h_in [count, D] (or, with embedding, the embedded tokens, which are also written to h_in) → u and δ of
// every row, then `plan` over u.
void block_input(const StepRows& rows, float* h_in, const Embedding* embedding, const BlockArgs& b,
                 const StepBuffers& s, const GemvPlan& plan, int max_blocks, bool overlap, cudaStream_t stream);

// The BK step, the attention paths and the AR-SSM step of every row: s.g, s.F, s.mixed and s.y_glob; the
// BK, ring, linear-attention and SSM states advance.
void mixer(const StepRows& rows, const BlockArgs& b, const StepBuffers& s, bool overlap, cudaStream_t stream);

// plan over x [count, plan.K].
void gemv(const float* x, int count, const GemvPlan& plan, int max_blocks, bool overlap, cudaStream_t stream);

// h_mid = h_in + LN_h(cap30(ξ·y_att + (1−ξ)·y_glob)) of every row; then, with an FFN, `plan` over
// LN_ffn(h_mid) (without one, plan must be empty and h_mid is the block's output).
void residual_mix(int count, const float* h_in, float* h_mid, const BlockArgs& b, const StepBuffers& s,
                  const GemvPlan& plan, int max_blocks, bool overlap, cudaStream_t stream);

// The FFN of every row (plan.low1 → plan.h_out).
void ffn(int count, const FfnPlan& plan, bool overlap, cudaStream_t stream);

// `plan` (the head: E, logits) over LN_final(h) of every row.
void head(const StepRows& rows, const float* h, const float* gain, const float* bias, int D, const GemvPlan& plan,
          int max_blocks, bool overlap, cudaStream_t stream);

// The factored HTT head of SPEC §2.2, the tied head without E: for each row x = LN_final(h) read as
// X = reshape(pad(x, d1·d2), d1×d2), Z[(s,p), u] = c_s·Σ_q X[p,q]·B̂[u,s,q] (htt_head_z), then
// logits[i·v2 + u] = Σ_(s,p) Â[i,s,p]·Z[(s,p), u] (htt_head_logits): a (v1 × r·d1)·(r·d1 × v2) product that
// reads the normalised cores (0.7 MB for phase8-small) instead of E (103 MB). Logits ≥ V are 0.
struct HttHead {
  const float *A_hat = nullptr, *B_hat = nullptr, *theta = nullptr;  // [v1, r, d1], [v2, r, d2], [r]
  int V = 0, Vp = 0, D = 0, r = 0, v2 = 0, d1 = 0, d2 = 0;
  int digits = 0;          // leading digits i in use: ⌈V / v2⌉
  float* Z = nullptr;      // [rows, r·d1, v2]
  float* logits = nullptr;  // [rows, Vp]
};

// The geometry of an HttHead for vocabulary V (padded Vp), width D and the cores' shape; the caller fills in
// the pointers (Z: htt_head_z_floats).
HttHead make_htt_head(int V, int Vp, int D, int r, int v2, int d1, int d2);
size_t htt_head_z_floats(const HttHead& head, int rows);
// Shared memory the factored head's kernels ask for (the decoder keeps E's head when the GPU has less).
size_t htt_head_shared_bytes(int r, int d1, int d2, int D);

// The factored head over LN_final(h) of every row.
void htt_head(const StepRows& rows, const float* h, const float* gain, const float* bias, const HttHead& head,
              bool overlap, cudaStream_t stream);

}  // namespace muse::cuda::decode
