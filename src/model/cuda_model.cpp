#include "model/cuda_model.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <tuple>
#include <stdexcept>
#include <string>

#include "common/cuda_check.cuh"
#include "common/cuda_graph.cuh"
#include "model/cuda_glue.cuh"
#include "model/muse_block.h"
#include "ops/bk.cuh"
#include "ops/causal_attn.cuh"
#include "ops/ffn.cuh"
#include "ops/htt.cuh"
#include "ops/hybrid.cuh"
#include "ops/layernorm.cuh"
#include "ops/linear.cuh"
#include "ops/linear_attn.cuh"
#include "ops/local_attn.cuh"
#include "ops/ssm.cuh"
#include "ops/xent.cuh"

namespace muse::cuda {

namespace {

constexpr int32_t kIgnore = -1;  // model/model.h's kXentIgnore

// Installs the model's GEMM math on the shared cuBLASLt instance for one pass, restoring the previous one.
class GemmMathScope {
 public:
  explicit GemmMathScope(GemmMath math) : blas_(BlasLt::current()), saved_(blas_.math()) { blas_.set_math(math); }
  ~GemmMathScope() { blas_.set_math(saved_); }
  GemmMathScope(const GemmMathScope&) = delete;
  GemmMathScope& operator=(const GemmMathScope&) = delete;

 private:
  BlasLt& blas_;
  GemmMath saved_;
};

// Every buffer starts on a 256-byte boundary (what cuBLASLt and the vectorised kernels expect).
constexpr size_t kAlignFloats = 64;
size_t aligned(size_t n) { return (n + kAlignFloats - 1) / kAlignFloats * kAlignFloats; }

// The distance from one weight to the next one in the parameter table, for batched GEMMs over both; the
// layout (model/layout.cpp) places them one after the other, which this checks.
long long adjacent_stride(const float* first, const float* second, long long size) {
  const long long stride = second - first;
  if (stride < size) throw std::logic_error("parameter layout: batched weights must be adjacent");
  return stride;
}

// The normalised HTT cores and their norms, which the materialisation saves for its backward, packed in one
// buffer of htt_saved_floats(shape) floats.
struct HttSaved {
  float *A_hat, *A_norm, *B_hat, *B_norm;
};
size_t htt_saved_floats(const HttShape& sh) {
  return size_t(sh.v1) * sh.r * sh.d1 + size_t(sh.v1) * sh.r + size_t(sh.v2) * sh.r * sh.d2 + size_t(sh.v2) * sh.r;
}
HttSaved htt_saved_parts(float* base, const HttShape& sh) {
  HttSaved s;
  s.A_hat = base;
  s.A_norm = s.A_hat + size_t(sh.v1) * sh.r * sh.d1;
  s.B_hat = s.A_norm + size_t(sh.v1) * sh.r;
  s.B_norm = s.B_hat + size_t(sh.v2) * sh.r * sh.d2;
  return s;
}

// The low-rank FFN's weight matrices in the bf16 copy of the parameter table (the biases stay fp32).
LowRankFfnParams<__nv_bfloat16> ffn_weights_bf16(const BlockLayout& b, const __nv_bfloat16* p) {
  return {p + b.ffn_v1, p + b.ffn_u1, nullptr, p + b.ffn_v2, p + b.ffn_u2, nullptr};
}

}  // namespace

// Activations of one block (the device twin of model_state.h's BlockActs; null when the config has no use
// for a buffer) and the AR-SSM's.
struct BlockBuffers {
  float *u = nullptr, *ln_mean = nullptr, *ln_rstd = nullptr, *delta = nullptr;
  __nv_bfloat16* u_bf16 = nullptr;  // bf16 operands: u rounded, for the weight gradients of q, k, v
  float *g = nullptr, *F = nullptr, *bk_v = nullptr, *bk_J = nullptr, *bk_J2 = nullptr;
  float *q = nullptr, *k = nullptr, *v = nullptr, *mu = nullptr, *log_mu = nullptr;
  float *o_loc = nullptr, *lse = nullptr, *o_lin = nullptr, *zeta = nullptr, *mixed = nullptr;
  // bf16 operands: the output projection's input rounded (the curvature mix's output, which then has no fp32
  // copy, or o_loc's rounding without the linear attention).
  __nv_bfloat16* mixed_bf16 = nullptr;
  float* lin_states = nullptr;  // training: the linear attention's states between chunks, kept for the backward
  float *y_att = nullptr, *y_glob = nullptr;
  float *ssm_hidden = nullptr, *ssm_chi = nullptr, *ssm_mask = nullptr, *ssm_proj_u = nullptr, *ssm_proj_v = nullptr;
  float *ssm_scan_in = nullptr, *ssm_state = nullptr, *ssm_readout = nullptr;
  // bf16 operands: [W_U; W_V; W_1] rounded and stacked [2R + D/4, D], so that the AR-SSM's three products into
  // du are one GEMM (the parameter table does not keep W_1 next to W_U, W_V).
  __nv_bfloat16* ssm_stack_bf16 = nullptr;
  float *xi = nullptr, *mix_capped = nullptr, *mix_mean = nullptr, *mix_rstd = nullptr, *h_mid = nullptr;
  float *u2 = nullptr, *ln2_mean = nullptr, *ln2_rstd = nullptr;
  float *ffn_low1 = nullptr, *ffn_pre = nullptr, *ffn_hidden = nullptr, *ffn_low2 = nullptr;
  // bf16 operands: the low-rank FFN's input and saved activations in bf16 instead (u2 and ffn_* stay null).
  __nv_bfloat16* u2_bf16 = nullptr;
  LowRankFfnSaved<__nv_bfloat16> ffn_bf16{};
  float* curvature = nullptr;  // [c, the curvature the mix reads]
};

// Captured forward and backward passes (CUDA graphs): one launch replays a pass's few hundred kernels, so
// the host's per-launch cost (and cuBLASLt's per-call descriptor set-up) leaves the critical path. A graph
// holds the kernels' arguments, so the key is everything they depend on beyond the arena's addresses, and
// the whole cache is dropped when the arena is re-planned.
struct Model::Graphs {
  using Key = std::tuple<int, int, int, bool, int, float, float>;  // pass, B, N, serving, math, scale, smoothing
  struct Entry {
    int runs = 0;
    cudaGraphExec_t exec = nullptr;
  };
  std::map<Key, Entry> entries;
  unsigned generation = 0;

  ~Graphs() { clear(); }
  void clear() {
    for (auto& [key, entry] : entries)
      if (entry.exec) cudaGraphExecDestroy(entry.exec);
    entries.clear();
  }
};

struct Model::Profiler {
  std::vector<cudaEvent_t> pool;                      // events, reused
  size_t used = 0;
  std::vector<std::pair<const char*, size_t>> marks;  // (group, event index); group null = a start
  std::vector<std::pair<std::string, double>> totals;

  ~Profiler() {
    for (cudaEvent_t e : pool) cudaEventDestroy(e);
  }
  cudaEvent_t next() {
    if (used == pool.size()) {
      pool.emplace_back();
      MUSE_CUDA_CHECK(cudaEventCreate(&pool.back()));
    }
    return pool[used++];
  }
  void add(const char* group, double ms) {
    for (auto& [name, total] : totals)
      if (name == group) {
        total += ms;
        return;
      }
    totals.emplace_back(group, ms);
  }
};

struct Model::Arena {
  int B = 0, N = 0;
  int head_chunk = 0;     // rows of the training head's logits chunk
  // Training in bf16 GEMM math: the head and the layers' large GEMMs multiply bf16 copies of their operands.
  bool bf16_operands = false;
  bool backward = false;  // the backward's buffers are bound
  bool serving = false;   // bf16 head buffers instead of fp32 logits and the per-pass E
  unsigned generation = 0;  // counts re-plans: captured graphs hold the buffer addresses of one plan
  float* base = nullptr;
  size_t capacity = 0;  // floats
  std::vector<float*> h;  // residual stream before block l (h[L] is the input of LN_final)
  std::vector<BlockBuffers> blocks;
  float *E = nullptr, *htt_saved = nullptr, *dE = nullptr;
  float *x_final = nullptr, *final_mean = nullptr, *final_rstd = nullptr;
  // logits: [rows, Vp] (inference) or, training, one chunk of them [head_chunk, Vp], then their gradient (in
  // bf16 math the chunk is logits_bf16 below).
  float *logits = nullptr, *row_loss = nullptr, *row_lse = nullptr, *loss_result = nullptr;
  float* logits_on_demand = nullptr;  // a training model's whole logits, for logits() (not in the arena)
  size_t logits_on_demand_floats = 0;
  // Serving: [rows, Vp] logits; the bf16 training head: x_final's and E's bf16 copies, and a chunk of logits.
  __nv_bfloat16 *x_final_bf16 = nullptr, *logits_bf16 = nullptr, *E_bf16 = nullptr;
  int32_t *ids = nullptr, *targets = nullptr;
  // backward scratch
  float *dh = nullptr, *du = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr, *dmixed = nullptr;
  float *do_loc = nullptr, *do_lin = nullptr, *dy_att = nullptr, *dy_glob = nullptr, *du2 = nullptr;
  float *dxi = nullptr, *dF = nullptr, *dg = nullptr, *dmu = nullptr, *dlog_mu = nullptr, *ddelta = nullptr;
  float* dc = nullptr;
  float *d_readout = nullptr, *dS = nullptr, *dscan_in = nullptr, *dproj_u = nullptr, *dproj_v = nullptr;
  float *dchi_pre = nullptr, *dm = nullptr, *dhidden = nullptr;
  // bf16 operands: a backward GEMM's fp32 operand rounded: [dq dk dv] side by side [rows, 3D], or dy_att.
  __nv_bfloat16* operand_bf16 = nullptr;
  float* workspace = nullptr;  // shared by every op's reduction partials and scratch (one stream, in turn)

  ~Arena() {
    if (base) cudaFree(base);
    if (logits_on_demand) cudaFree(logits_on_demand);
  }
};

namespace {

// Rows of the training head's logits chunk for `rows` rows: `requested` when positive, else as many as keep
// the chunk within kHeadChunkBytes (5,336 rows of the GPT-2 vocabulary), never more than the batch.
constexpr size_t kHeadChunkBytes = size_t(1) << 30;
int head_chunk_for(int rows, int Vp, int requested) {
  const size_t fit = std::max<size_t>(1, kHeadChunkBytes / (size_t(Vp) * sizeof(float)));
  return int(std::min<size_t>(size_t(rows), requested > 0 ? size_t(requested) : fit));
}

// Walks every buffer the model needs at B×N, handing each (pointer, floats) to `take`: once to count, once
// to assign, so the two can never disagree.
template <class Take>
void plan_buffers(Model::Arena& a, const ModelConfig& c, const ModelLayout& m, int B, int N, bool backward,
                  bool serving, int head_chunk, bool bf16_operands, Take&& take) {
  const bool muse = c.arch != Arch::gpt, phase8 = c.arch == Arch::phase8;
  const size_t rows = size_t(B) * N, D = c.d_model, H = c.n_heads, R = c.ssm_rank, Vp = c.padded_vocab();
  const size_t RD = rows * D, F4 = rows * ffn_hidden(c.d_model), L = m.blocks.size();
  const bool gate = muse && !m.blocks.empty() && m.blocks[0].key_gate_w != kAbsent;
  const bool linear = phase8 && c.linear_attn;
  const bool lowrank = muse && !m.blocks.empty() && m.blocks[0].ffn_v1 != kAbsent;
  const bool mask = phase8 && c.rank_mask;
  const size_t rho = c.ffn_rank;
  auto take_bf16 = [&](__nv_bfloat16*& ptr, size_t n) {  // bf16 pairs share a float slot
    float* slot = nullptr;
    take(slot, (n + 1) / 2);
    ptr = reinterpret_cast<__nv_bfloat16*>(slot);
  };

  // Training keeps every layer's activations for the backward; inference needs one layer's at a time, so
  // the blocks share one set of buffers and the residual stream alternates between two.
  a.h.resize(L + 1);
  for (size_t l = 0; l <= L; ++l) {
    if (backward || l < 2)
      take(a.h[l], RD);
    else
      a.h[l] = a.h[l % 2];
  }
  a.blocks.resize(L);
  for (size_t l = 0; l < L; ++l) {
    BlockBuffers& b = a.blocks[l];
    if (!backward && l > 0) {
      b = a.blocks[0];
      continue;
    }
    b = BlockBuffers{};  // a buffer this plan does not take stays null, not the last plan's
    take(b.u, RD), take(b.ln_mean, rows), take(b.ln_rstd, rows);
    if (backward && bf16_operands) take_bf16(b.u_bf16, RD);
    // q, k, v adjacent and equally spaced: qkv_forward batches their GEMMs (qkv_backward walks dq, dk, dv alike).
    take(b.q, RD), take(b.k, RD), take(b.v, RD), take(b.o_loc, RD), take(b.lse, rows * H), take(b.y_att, RD);
    take(b.h_mid, RD);
    const bool ffn_bf16 = lowrank && backward && bf16_operands;
    if (ffn_bf16)
      take_bf16(b.u2_bf16, RD);
    else
      take(b.u2, RD);
    take(b.ln2_mean, rows), take(b.ln2_rstd, rows);
    // The backward needs the FFN's pre-activation; inference applies the GELU in place.
    auto take_ffn_hidden = [&] {
      take(b.ffn_pre, F4);
      if (backward)
        take(b.ffn_hidden, F4);
      else
        b.ffn_hidden = b.ffn_pre;
    };
    if (!muse) {
      take_ffn_hidden();
      continue;
    }
    take(b.delta, rows), take(b.g, 2 * rows), take(b.F, 3 * rows);
    take(b.bk_v, rows), take(b.bk_J, rows), take(b.bk_J2, rows);
    if (gate) take(b.mu, rows * H), take(b.log_mu, rows * H);
    const bool w_o_bf16 = backward && bf16_operands;
    if (w_o_bf16) take_bf16(b.mixed_bf16, RD);
    if (linear) take(b.o_lin, RD), take(b.zeta, rows * H);
    if (linear && !w_o_bf16) take(b.mixed, RD);
    if (linear && backward) take(b.lin_states, linear_attn_forward_workspace_floats(B, N, int(D), int(H)));
    take(b.y_glob, RD);
    // proj_u, proj_v adjacent: ssm_forward batches their GEMMs.
    take(b.ssm_hidden, rows * (D / 4)), take(b.ssm_chi, rows * R), take(b.ssm_proj_u, rows * R);
    take(b.ssm_proj_v, rows * R), take(b.ssm_scan_in, rows * R), take(b.ssm_state, rows * R);
    take(b.ssm_readout, rows * R);
    if (backward && bf16_operands) take_bf16(b.ssm_stack_bf16, (2 * R + D / 4) * D);
    if (mask) take(b.ssm_mask, rows * R);
    take(b.xi, rows), take(b.mix_capped, RD), take(b.mix_mean, rows), take(b.mix_rstd, rows);
    if (ffn_bf16) {
      take_bf16(b.ffn_bf16.low1, rows * rho), take_bf16(b.ffn_bf16.pre, F4), take_bf16(b.ffn_bf16.hidden, F4);
      take_bf16(b.ffn_bf16.low2, rows * rho);
    } else if (lowrank) {
      take(b.ffn_low1, rows * rho), take_ffn_hidden(), take(b.ffn_low2, rows * rho);
    }
    take(b.curvature, 2);
  }
  if (m.embed == kAbsent && !serving) {
    const HttShape sh = htt_shape(c.vocab_size, c.d_model, c.htt_rank);
    take(a.E, Vp * D);
    take(a.htt_saved, htt_saved_floats(sh));
  }
  take(a.x_final, RD), take(a.final_mean, rows), take(a.final_rstd, rows);
  if (serving) {
    take_bf16(a.x_final_bf16, RD), take_bf16(a.logits_bf16, rows * Vp);
  } else if (bf16_operands) {
    // A chunk of bf16 logits, overwritten by their gradient; bf16 copies of x_final and E.
    take_bf16(a.x_final_bf16, RD), take_bf16(a.E_bf16, Vp * D), take_bf16(a.logits_bf16, size_t(head_chunk) * Vp);
    take(a.row_loss, rows), take(a.row_lse, rows), take(a.loss_result, 2);
  } else {
    take(a.logits, (backward ? size_t(head_chunk) : rows) * Vp);
    take(a.row_loss, rows), take(a.row_lse, rows), take(a.loss_result, 2);
  }
  float *ids = nullptr, *targets = nullptr;  // int32 share the float slots' size
  take(ids, rows), take(targets, rows);
  a.ids = reinterpret_cast<int32_t*>(ids);
  a.targets = reinterpret_cast<int32_t*>(targets);
  const int r = int(rows), iD = int(D), iH = int(H);
  if (!backward) {
    // The forward's only workspace user: the linear attention's segment states.
    take(a.workspace, linear ? linear_attn_forward_workspace_floats(B, N, iD, iH) : 0);
    return;
  }

  take(a.dE, Vp * D);  // the head's gradient of E (with HTT, the embedding's too)

  take(a.dh, RD), take(a.du, RD), take(a.dq, RD), take(a.dk, RD), take(a.dv, RD), take(a.dmixed, RD);
  take(a.du2, RD);
  if (bf16_operands) take_bf16(a.operand_bf16, rows * std::max(3 * D, 2 * R + D / 4));
  if (muse) {
    take(a.dy_att, RD), take(a.dy_glob, RD), take(a.dxi, rows), take(a.dF, 3 * rows), take(a.dg, 2 * rows);
    take(a.ddelta, rows), take(a.dc, 1);
    if (gate) take(a.dmu, rows * H), take(a.dlog_mu, rows * H);
    if (linear) take(a.do_loc, RD), take(a.do_lin, RD);
    take(a.d_readout, rows * R), take(a.dS, rows * R), take(a.dscan_in, rows * R), take(a.dproj_u, rows * R);
    take(a.dproj_v, rows * R), take(a.dchi_pre, rows * R), take(a.dhidden, rows * (D / 4));
    if (mask) take(a.dm, rows * R);
  }

  // One workspace, as large as the largest any op asks for at this shape.
  size_t ws = dense_mlp_backward_scratch_floats(r, iD);
  if (muse) {
    ws = std::max({ws, bk_layer_backward_workspace_floats(B, N, iD), bk_gate_backward_workspace_floats(r, iH),
                   bk_gate_backward_workspace_floats(r, 1), local_attn_backward_workspace_floats(attn_config(c, B, N)),
                   linear_attn_backward_workspace_floats(B, N, iD, iH),
                   linear_attn_forward_workspace_floats(B, N, iD, iH), curvature_mix_backward_workspace_floats(r, iD),
                   phase7_gate_backward_workspace_floats(r), residual_mix_backward_workspace_floats(r, iD),
                   ssm_conv_backward_workspace_floats(B, N, iD), ssm_scan_backward_workspace_floats(B, int(R)),
                   ssm_rank_mask_backward_workspace_floats(r), lowrank_ffn_backward_scratch_floats(r, iD, int(rho))});
    if (bf16_operands) ws = std::max(ws, lowrank_ffn_bf16_backward_scratch_floats(r, iD, int(rho)));
  }
  if (m.embed == kAbsent) ws = std::max(ws, htt_backward_scratch_floats(htt_shape(c.vocab_size, c.d_model, c.htt_rank)));
  ws = std::max(ws, (embedding_lookup_backward_scratch_bytes(r, c.vocab_size) + sizeof(float) - 1) / sizeof(float));
  take(a.workspace, ws);
}

// Points every buffer of `a` into its storage for a B×N batch, growing the storage first if needed.
void bind_arena(Model::Arena& a, const ModelConfig& c, const ModelLayout& m, int B, int N, bool backward,
                bool serving, int head_chunk_rows, GemmMath math) {
  const int head_chunk = head_chunk_for(B * N, c.padded_vocab(), head_chunk_rows);
  const bool bf16_operands = backward && math == GemmMath::bf16;
  if (a.base && a.B == B && a.N == N && a.backward == backward && a.serving == serving && a.head_chunk == head_chunk &&
      a.bf16_operands == bf16_operands)
    return;  // steady state
  size_t total = 0;
  plan_buffers(a, c, m, B, N, backward, serving, head_chunk, bf16_operands, [&](auto*& ptr, size_t n) {
    ptr = nullptr;
    total += aligned(n);
  });
  if (total > a.capacity) {
    if (a.base) MUSE_CUDA_CHECK(cudaFree(a.base));
    a.base = nullptr;
    a.capacity = 0;
    MUSE_CUDA_CHECK(cudaMalloc(&a.base, total * sizeof(float)));
    a.capacity = total;
  }
  size_t at = 0;
  plan_buffers(a, c, m, B, N, backward, serving, head_chunk, bf16_operands, [&](auto*& ptr, size_t n) {
    ptr = a.base + at;
    at += aligned(n);
  });
  a.B = B;
  a.N = N;
  a.backward = backward;
  a.serving = serving;
  a.head_chunk = head_chunk;
  a.bf16_operands = bf16_operands;
  ++a.generation;
}

}  // namespace

Model::Model(const ModelConfig& config) : config_(config), arena_(std::make_unique<Arena>()) {
  validate(config_);
  layout_ = build_layout(config_, table_);
  MUSE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  MUSE_CUDA_CHECK(cudaMalloc(&params_, size() * sizeof(float)));
  MUSE_CUDA_CHECK(cudaMalloc(&loss_sum_, sizeof(double)));
  // On the model's stream: a non-blocking stream does not wait for work on the legacy default stream.
  MUSE_CUDA_CHECK(cudaMemsetAsync(params_, 0, size() * sizeof(float), stream_));
  MUSE_CUDA_CHECK(cudaMemsetAsync(loss_sum_, 0, sizeof(double), stream_));
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (cudaEvent_t& e : staged_) MUSE_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
}

void Model::set_profiling(bool on) {
  if (on && !profiler_) profiler_ = std::make_unique<Profiler>();
  if (!on) profiler_.reset();
}

void Model::mark(const char* name) {
  if (!profiler_) return;
  const cudaEvent_t e = profiler_->next();
  MUSE_CUDA_CHECK(cudaEventRecord(e, stream_));
  profiler_->marks.emplace_back(name, profiler_->used - 1);
}

void Model::mark_start() {
  if (!profiler_) return;
  resolve_marks();
  mark(nullptr);
}

// Turns the recorded events into per-group times (waits for the last one) and frees the events for reuse.
void Model::resolve_marks() const {
  Profiler& p = *profiler_;
  if (p.marks.empty()) return;
  MUSE_CUDA_CHECK(cudaEventSynchronize(p.pool[p.marks.back().second]));
  for (size_t i = 1; i < p.marks.size(); ++i) {
    if (!p.marks[i].first) continue;
    float ms = 0;
    MUSE_CUDA_CHECK(cudaEventElapsedTime(&ms, p.pool[p.marks[i - 1].second], p.pool[p.marks[i].second]));
    p.add(p.marks[i].first, ms);
  }
  p.marks.clear();
  p.used = 0;
}

std::vector<std::pair<std::string, double>> Model::profile() const {
  if (!profiler_) return {};
  resolve_marks();
  return profiler_->totals;
}

Model::~Model() {
  if (stream_) cudaStreamSynchronize(stream_);
  graphs_.reset();
  profiler_.reset();
  arena_.reset();
  for (int slot = 0; slot < 2; ++slot) {
    if (host_tokens_[slot]) cudaFreeHost(host_tokens_[slot]);
    if (staged_[slot]) cudaEventDestroy(staged_[slot]);
  }
  end_serving();
  cudaFree(params_);
  cudaFree(params_bf16_);
  cudaFree(grads_);
  cudaFree(loss_sum_);
  if (stream_) cudaStreamDestroy(stream_);
}

void Model::upload_params(const float* host) {
  MUSE_CUDA_CHECK(cudaMemcpyAsync(params_, host, size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (serving_) prepare_serving();
}

void Model::download_params(float* host) const {
  MUSE_CUDA_CHECK(cudaMemcpyAsync(host, params_, size() * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

float* Model::grads() {
  if (!grads_) {
    MUSE_CUDA_CHECK(cudaMalloc(&grads_, size() * sizeof(float)));
    MUSE_CUDA_CHECK(cudaMemsetAsync(grads_, 0, size() * sizeof(float), stream_));
  }
  return grads_;
}

void Model::download_grads(float* host) const {
  if (!grads_) throw std::logic_error("download_grads(): no gradients yet");
  MUSE_CUDA_CHECK(cudaMemcpyAsync(host, grads_, size() * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void Model::zero(float* p, size_t n) { MUSE_CUDA_CHECK(cudaMemsetAsync(p, 0, n * sizeof(float), stream_)); }

void Model::zero_grads() { zero(grads(), size()); }

void Model::set_inference_only(bool inference_only) {
  inference_only_ = inference_only;
  if (!inference_only) end_serving();
}

void Model::reserve(int B, int N) {
  if (B < 1 || N < 1) throw std::invalid_argument("reserve: batch and sequence length must be positive");
  bind_arena(*arena_, config_, layout_, B, N, !inference_only_, serving_, head_chunk_rows_, gemm_math_);
}

size_t Model::device_bytes() const {
  size_t serving = 0;
  if (serving_E_bf16_) serving = size_t(config_.padded_vocab()) * config_.d_model * sizeof(__nv_bfloat16);
  const size_t mirror = params_bf16_ ? size() * sizeof(__nv_bfloat16) : 0;
  return ((grads_ ? 2 : 1) * size() + arena_->capacity + arena_->logits_on_demand_floats) * sizeof(float) + serving +
         mirror;
}

void Model::stage_tokens(int32_t* device, const int32_t* host, size_t n, size_t slot) {
  if (host_tokens_capacity_[slot] < n) {
    if (host_tokens_[slot]) {
      MUSE_CUDA_CHECK(cudaEventSynchronize(staged_[slot]));
      MUSE_CUDA_CHECK(cudaFreeHost(host_tokens_[slot]));
    }
    MUSE_CUDA_CHECK(cudaMallocHost(&host_tokens_[slot], n * sizeof(int32_t)));
    host_tokens_capacity_[slot] = n;
  }
  // The previous copy out of this slot must have happened before the host overwrites it.
  MUSE_CUDA_CHECK(cudaEventSynchronize(staged_[slot]));
  std::memcpy(host_tokens_[slot], host, n * sizeof(int32_t));
  MUSE_CUDA_CHECK(cudaMemcpyAsync(device, host_tokens_[slot], n * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
  MUSE_CUDA_CHECK(cudaEventRecord(staged_[slot], stream_));
}

// ---- forward -------------------------------------------------------------------------------------------

void Model::forward(const int32_t* ids, int B, int N) {
  const ModelConfig& c = config_;
  const ModelLayout& m = layout_;
  if (B < 1 || N < 1) throw std::invalid_argument("forward: batch and sequence length must be positive");
  if (c.pos_embedding == PosEmbedding::learned && N > c.max_seq)
    throw std::invalid_argument("sequence length " + std::to_string(N) + " exceeds max_seq = " +
                                std::to_string(c.max_seq) + " of this model's learned positions");
  const size_t rows = size_t(B) * N;
  for (size_t i = 0; i < rows; ++i)
    if (ids[i] < 0 || ids[i] >= c.vocab_size)
      throw std::invalid_argument("token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                                  " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  Arena& a = *arena_;
  bind_arena(a, c, m, B, N, !inference_only_, serving_, head_chunk_rows_, gemm_math_);
  if (a.bf16_operands && !params_bf16_) MUSE_CUDA_CHECK(cudaMalloc(&params_bf16_, size() * sizeof(__nv_bfloat16)));
  B_ = B;
  N_ = N;
  stage_tokens(a.ids, ids, rows, 0);
  mark_start();
  run_pass(0, 0.f, [this] { forward_pass(); });
}

void Model::forward_pass() {
  const ModelConfig& c = config_;
  const ModelLayout& m = layout_;
  Arena& a = *arena_;
  const int B = B_, N = N_, D = c.d_model, Vp = c.padded_vocab();
  const size_t rows = size_t(B) * N;
  const float* p = params_;

  if (a.bf16_operands) to_bf16(params_bf16_, params_, size(), stream_);
  const float* E = p + m.embed;
  if (serving_) {
    embedding_lookup_forward(a.h[0], serving_E_bf16_, a.ids, int(rows), D, stream_);
  } else {
    if (m.embed == kAbsent) {
      materialize_embedding(a.E, a.htt_saved);
      mark("fwd htt materialise");
      E = a.E;
    }
    embedding_lookup_forward(a.h[0], E, a.ids, int(rows), D, stream_);
  }
  if (m.positions != kAbsent) add_positions(a.h[0], p + m.positions, B, N, D, stream_);
  mark("fwd embedding");
  for (size_t l = 0; l < m.blocks.size(); ++l) block_forward(int(l), a.h[l], a.h[l + 1]);
  // Serving and the bf16 training head multiply x_final rounded to bf16.
  layernorm_forward(a.x_final, a.final_mean, a.final_rstd, nullptr, a.h.back(), p + m.final_gain, p + m.final_bias,
                    int(rows), D, stream_, a.x_final_bf16);
  mark("fwd layernorm");
  // A training model's head runs in loss(), a chunk of rows at a time.
  if (a.backward) return;
  if (serving_) {
    gemm_bf16(false, true, int(rows), Vp, D, a.x_final_bf16, D, serving_E_bf16_, D, a.logits_bf16, Vp, stream_);
  } else {
    linear_forward(a.logits, a.x_final, E, nullptr, int(rows), D, Vp, stream_);
  }
  mark("fwd head gemm");
}

const float* Model::head_weights() const {
  return layout_.embed != kAbsent ? params_ + layout_.embed : arena_->E;
}

void Model::head_pass(bool with_gradient, float accumulate_scale) {
  const ModelConfig& c = config_;
  Arena& a = *arena_;
  const int D = c.d_model, Vp = c.padded_vocab(), rows = B_ * N_;
  if (!a.backward) {
    xent_forward(a.row_loss, a.row_lse, a.loss_result, a.logits, a.targets, rows, c.vocab_size, Vp, smoothing_,
                 kIgnore, stream_);
    mark("fwd cross-entropy");
  } else {
    const float* E = head_weights();
    // The gradient of the mean loss needs the batch's count before the first chunk; backward() applies its
    // scale to du and dE.
    if (with_gradient) {
      xent_count(a.loss_result, a.targets, rows, kIgnore, stream_);
      zero(a.dE, size_t(Vp) * D);
    }
    // bf16 math: the head's GEMMs multiply bf16 copies of x (the forward's final LayerNorm wrote it) and E
    // into bf16 logits (fp32 accumulation), which the cross-entropy overwrites with their gradient for the two
    // backward GEMMs.
    const bool bf16 = a.bf16_operands;
    if (bf16) {
      to_bf16(a.E_bf16, E, size_t(Vp) * D, stream_);
      mark("head bf16 copies");
    }
    for (int first = 0; first < rows; first += a.head_chunk) {
      const int n = std::min(a.head_chunk, rows - first);
      const float* result = with_gradient ? a.loss_result : nullptr;
      float* du = a.du + size_t(first) * D;
      if (bf16) {
        const __nv_bfloat16* x = a.x_final_bf16 + size_t(first) * D;
        gemm_bf16(false, true, n, Vp, D, x, D, a.E_bf16, D, a.logits_bf16, Vp, stream_);
        mark("fwd head gemm");
        xent_rows(a.row_loss + first, a.row_lse + first, a.logits_bf16, a.targets + first, n, c.vocab_size, Vp,
                  smoothing_, result, kIgnore, stream_);
        mark(with_gradient ? "cross-entropy and its gradient" : "fwd cross-entropy");
        if (!with_gradient) continue;
        // This chunk's rows of du (a fresh row range) and dE += dlogitsᵀ·x.
        gemm(false, false, n, D, Vp, 1.f, a.logits_bf16, Vp, a.E_bf16, D, 0.f, du, D, stream_);
        gemm(true, false, Vp, D, n, 1.f, a.logits_bf16, Vp, x, D, 1.f, a.dE, D, stream_);
      } else {
        const float* x = a.x_final + size_t(first) * D;
        linear_forward(a.logits, x, E, nullptr, n, D, Vp, stream_);
        mark("fwd head gemm");
        xent_rows(a.row_loss + first, a.row_lse + first, a.logits, a.targets + first, n, c.vocab_size, Vp, smoothing_,
                  result, kIgnore, stream_);
        mark(with_gradient ? "cross-entropy and its gradient" : "fwd cross-entropy");
        if (!with_gradient) continue;
        zero(du, size_t(n) * D);
        linear_backward(du, a.dE, nullptr, a.logits, x, E, n, D, Vp, stream_);
      }
      mark("bwd head gemm");
    }
    xent_mean(a.loss_result, a.row_loss, a.targets, rows, kIgnore, stream_);
  }
  if (accumulate_scale != 0) accumulate_loss(loss_sum_, a.loss_result, accumulate_scale, stream_);
}

void Model::materialize_embedding(float* E, float* saved) {
  const ModelLayout& m = layout_;
  const HttShape sh = htt_shape(config_.vocab_size, config_.d_model, config_.htt_rank);
  const HttSaved parts = htt_saved_parts(saved, sh);
  htt_materialize_forward(E, parts.A_hat, parts.A_norm, parts.B_hat, parts.B_norm, params_ + m.htt_a,
                          params_ + m.htt_b, params_ + m.htt_theta, sh, stream_);
}

void Model::prepare_serving() {
  if (!inference_only_) throw std::logic_error("prepare_serving(): the model must be set to inference only");
  const ModelConfig& c = config_;
  const size_t table = size_t(c.padded_vocab()) * c.d_model;
  if (!serving_E_bf16_) MUSE_CUDA_CHECK(cudaMalloc(&serving_E_bf16_, table * sizeof(__nv_bfloat16)));
  if (layout_.embed == kAbsent) {
    // The fp32 E exists only while it is rounded: serving keeps the bf16 table alone.
    float *E = nullptr, *saved = nullptr;
    MUSE_CUDA_CHECK(cudaMallocAsync(&E, table * sizeof(float), stream_));
    MUSE_CUDA_CHECK(cudaMallocAsync(&saved, htt_saved_floats(htt_shape(c.vocab_size, c.d_model, c.htt_rank)) *
                                                sizeof(float), stream_));
    materialize_embedding(E, saved);
    to_bf16(serving_E_bf16_, E, table, stream_);
    MUSE_CUDA_CHECK(cudaFreeAsync(saved, stream_));
    MUSE_CUDA_CHECK(cudaFreeAsync(E, stream_));
  } else {
    to_bf16(serving_E_bf16_, params_ + layout_.embed, table, stream_);
  }
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  serving_ = true;
}

void Model::end_serving() {
  serving_ = false;
  graphs_.reset();
  cudaFree(serving_E_bf16_);
  serving_E_bf16_ = nullptr;
}

const float* Model::logits() const {
  if (serving_) throw std::logic_error("logits(): a serving model writes bf16 logits (logits_bf16())");
  Arena& a = *arena_;
  if (!a.backward) return a.logits;
  if (B_ == 0) throw std::logic_error("logits(): no forward has run");
  const size_t n = size_t(B_) * N_ * config_.padded_vocab();
  if (a.logits_on_demand_floats < n) {
    if (a.logits_on_demand) MUSE_CUDA_CHECK(cudaFree(a.logits_on_demand));
    a.logits_on_demand = nullptr;
    a.logits_on_demand_floats = 0;
    MUSE_CUDA_CHECK(cudaMalloc(&a.logits_on_demand, n * sizeof(float)));
    a.logits_on_demand_floats = n;
  }
  const GemmMathScope math(gemm_math_);
  linear_forward(a.logits_on_demand, a.x_final, head_weights(), nullptr, B_ * N_, config_.d_model,
                 config_.padded_vocab(), stream_);
  // Callers copy them on other streams (cudaMemcpy): they must be there when this returns.
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return a.logits_on_demand;
}

const __nv_bfloat16* Model::logits_bf16() const {
  if (!serving_) throw std::logic_error("logits_bf16(): the model is not serving (prepare_serving())");
  return arena_->logits_bf16;
}

void Model::block_forward(int layer, const float* h_in, float* h_out) {
  if (config_.arch == Arch::gpt)
    gpt_block_forward(layer, h_in, h_out);
  else
    muse_block_forward(layer, h_in, h_out);
}

void Model::block_backward(int layer, float* dh) {
  if (config_.arch == Arch::gpt)
    gpt_block_backward(layer, dh);
  else
    muse_block_backward(layer, dh);
}

// q, k, v = u·W_qᵀ, u·W_kᵀ, u·W_vᵀ (both block kinds) as one batched GEMM: the three weights are adjacent in
// the parameter table (as are their gradients), and q, k, v (and dq, dk, dv) are adjacent, equally spaced
// buffers of the arena, so one launch with u shared replaces three small ones.
void Model::qkv_forward(const BlockLayout& b, BlockBuffers& a) {
  const float* p = params_;
  const int D = config_.d_model, rows = B_ * N_;
  const long long weight_stride = qkv_weight_stride(b), out_stride = a.k - a.q;
  if (a.u_bf16)
    gemm_strided_batched(false, true, rows, D, D, 1.f, a.u_bf16, D, 0, params_bf16_ + b.w_q, D, weight_stride, 0.f,
                         a.q, D, out_stride, 3, stream_);
  else
    gemm_strided_batched(false, true, rows, D, D, 1.f, a.u, D, 0, p + b.w_q, D, weight_stride, 0.f, a.q, D,
                         out_stride, 3, stream_);
  mark("fwd qkv gemm");
}

// The arena's du += dq·W_q + dk·W_k + dv·W_v and the weight gradients dW_x += dxᵀ·u. In fp32 operands one
// GEMM each: the weight gradients are not batched, because a D × D result summed over B·N rows fills the GPU
// only when split over the rows (split-K), which cuBLASLt picks for a single GEMM but not for a batch. In bf16
// operands dq, dk, dv are rounded side by side into one [rows, 3D] matrix, so that (with the three weights
// adjacent, stride D²) du is one GEMM over K = 3D and the weight gradients one [3D, D] GEMM: on the H200 at
// B·N = 65,536, D = 512 that is 0.45 ms with the rounding against 1.07 ms for the six fp32 GEMMs (TF32
// kernels, which run the transposed layouts of these products at half the speed of the forward's).
void Model::qkv_backward(const BlockLayout& b, const BlockBuffers& a) {
  Arena& s = *arena_;
  const float* p = params_;
  float* g = grads_;
  const int D = config_.d_model, rows = B_ * N_;
  const long long weight_stride = qkv_weight_stride(b), grad_stride = s.dk - s.dq;
  if (s.bf16_operands) {
    for (int i = 0; i < 3; ++i)
      to_bf16_columns(s.operand_bf16 + i * D, 3 * D, s.dq + i * grad_stride, rows, D, stream_);
    const __nv_bfloat16* W = params_bf16_ + b.w_q;
    const bool adjacent = weight_stride == (long long)D * D;  // one [3D, D] block, or three D × D ones
    const int parts = adjacent ? 1 : 3, width = adjacent ? 3 * D : D;
    for (int i = 0; i < parts; ++i) {
      const __nv_bfloat16* dx = s.operand_bf16 + i * D;
      gemm(true, false, width, D, rows, 1.f, dx, 3 * D, a.u_bf16, D, 1.f, g + b.w_q + i * weight_stride, D, stream_);
      gemm(false, false, rows, D, width, 1.f, dx, 3 * D, W + i * weight_stride, D, 1.f, s.du, D, stream_);
    }
  } else {
    for (int i = 0; i < 3; ++i) {
      const float* dx = s.dq + i * grad_stride;
      gemm(true, false, D, D, rows, 1.f, dx, D, a.u, D, 1.f, g + b.w_q + i * weight_stride, D, stream_);
      gemm(false, false, rows, D, D, 1.f, dx, D, p + b.w_q + i * weight_stride, D, 1.f, s.du, D, stream_);
    }
  }
  mark("bwd qkv gemm");
}

long long Model::qkv_weight_stride(const BlockLayout& b) const {
  const long long D = config_.d_model;
  const long long stride = adjacent_stride(params_ + b.w_q, params_ + b.w_k, D * D);
  if (b.w_v - b.w_k != b.w_k - b.w_q)
    throw std::logic_error("parameter layout: w_q, w_k, w_v must be adjacent and equally spaced");
  return stride;
}

void Model::gpt_block_forward(int layer, const float* h_in, float* h_out) {
  const ModelConfig& c = config_;
  const BlockLayout& b = layout_.blocks[layer];
  BlockBuffers& a = arena_->blocks[layer];
  const float* p = params_;
  const int D = c.d_model, rows = B_ * N_;
  const size_t RD = size_t(rows) * D;
  layernorm_forward(a.u, a.ln_mean, a.ln_rstd, nullptr, h_in, p + b.ln_gain, p + b.ln_bias, rows, D, stream_,
                    a.u_bf16);
  mark("fwd layernorm");
  qkv_forward(b, a);
  causal_attn_forward(a.o_loc, a.lse, a.q, a.k, a.v, B_, N_, c.n_heads, D, c.pos_embedding == PosEmbedding::alibi,
                      stream_);
  mark("fwd attention");
  linear_forward(a.y_att, a.o_loc, p + b.w_o, nullptr, rows, D, D, stream_);
  mark("fwd w_o gemm");
  MUSE_CUDA_CHECK(cudaMemcpyAsync(a.h_mid, h_in, RD * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
  add_inplace(a.h_mid, a.y_att, RD, stream_);
  mark("fwd residual");
  layernorm_forward(a.u2, a.ln2_mean, a.ln2_rstd, nullptr, a.h_mid, p + b.ln_ffn_gain, p + b.ln_ffn_bias, rows, D,
                    stream_);
  mark("fwd layernorm");
  dense_mlp_forward(h_out, {a.ffn_pre, a.ffn_hidden}, a.u2, mlp_params(b, p), rows, D, stream_);
  add_inplace(h_out, a.h_mid, RD, stream_);
  mark("fwd ffn");
}

void Model::muse_block_forward(int layer, const float* h_in, float* h_out) {
  const ModelConfig& c = config_;
  const BlockLayout& b = layout_.blocks[layer];
  BlockBuffers& a = arena_->blocks[layer];
  const float* p = params_;
  const bool phase8 = c.arch == Arch::phase8;
  const bool hopping = b.bk_w_J != kAbsent, gate = b.key_gate_w != kAbsent;
  const bool use_linear = phase8 && c.linear_attn;
  const int D = c.d_model, H = c.n_heads, rows = B_ * N_;
  const size_t RD = size_t(rows) * D;

  layernorm_forward(a.u, a.ln_mean, a.ln_rstd, a.delta, h_in, p + b.ln_gain, p + b.ln_bias, rows, D, stream_,
                    a.u_bf16);
  mark("fwd layernorm");
  bk_layer_forward(a.g, a.F, {a.bk_v, a.bk_J, a.bk_J2}, a.u, bk_params(b, p, c), hopping, B_, N_, D, stream_);
  mark("fwd bk core");
  qkv_forward(b, a);
  if (gate) {
    bk_gate_forward(a.mu, a.F, p + b.key_gate_w, p + b.key_gate_b, rows, H, stream_);
    log_elementwise(a.log_mu, a.mu, size_t(rows) * H, stream_);
  }
  curvature_forward(a.curvature, a.curvature + 1, p + b.c_raw, c.curvature_mix, stream_);
  mark("fwd gates");
  local_attn_forward(a.o_loc, a.lse, a.q, a.k, a.v, static_cast<const float*>(a.curvature), p + b.beta,
                     gate ? a.log_mu : nullptr, attn_config(c, B_, N_), stream_);
  mark("fwd local attention");
  const float* mixed = a.o_loc;
  if (use_linear) {
    // Training runs it in the layer's own workspace, whose states between chunks the backward reuses.
    linear_attn_forward(a.o_lin, a.zeta, nullptr, nullptr, a.q, a.k, a.v, gate ? a.mu : nullptr, B_, N_, D, H,
                        a.lin_states ? a.lin_states : arena_->workspace, stream_);
    if (a.mixed_bf16)
      curvature_mix_forward(a.mixed_bf16, a.o_loc, a.o_lin, a.curvature + 1, rows, D, stream_);
    else
      curvature_mix_forward(a.mixed, a.o_loc, a.o_lin, a.curvature + 1, rows, D, stream_);
    mark("fwd linear attention");
    mixed = a.mixed;
  }
  if (a.mixed_bf16) {
    if (!use_linear) to_bf16(a.mixed_bf16, a.o_loc, RD, stream_);
    linear_forward(a.y_att, a.mixed_bf16, params_bf16_ + b.w_o, nullptr, rows, D, D, stream_);
  } else {
    linear_forward(a.y_att, mixed, p + b.w_o, nullptr, rows, D, D, stream_);
  }
  mark("fwd w_o gemm");
  ssm_forward(layer, a.y_glob);
  mark("fwd ssm");
  if (phase8)
    bk_gate_forward(a.xi, a.F, p + b.xi_w, p + b.xi_b, rows, 1, stream_);
  else
    phase7_gate_forward(a.xi, a.g, p + b.xi_s, rows, stream_);
  residual_mix_forward(a.h_mid, {a.mix_capped, a.mix_mean, a.mix_rstd}, h_in, a.y_att, a.y_glob, a.xi,
                       p + b.ln_h_gain, p + b.ln_h_bias, rows, D, stream_);
  mark("fwd gates");
  if (b.ffn_v1 == kAbsent) {
    MUSE_CUDA_CHECK(cudaMemcpyAsync(h_out, a.h_mid, RD * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
    return;
  }
  layernorm_forward(a.u2, a.ln2_mean, a.ln2_rstd, nullptr, a.h_mid, p + b.ln_ffn_gain, p + b.ln_ffn_bias, rows, D,
                    stream_, a.u2_bf16);
  mark("fwd layernorm");
  if (a.u2_bf16)
    lowrank_ffn_forward_bf16(h_out, a.ffn_bf16, a.u2_bf16, ffn_params(b, p), ffn_weights_bf16(b, params_bf16_), rows,
                             D, c.ffn_rank, stream_, a.h_mid);
  else
    lowrank_ffn_forward(h_out, {a.ffn_low1, a.ffn_pre, a.ffn_hidden, a.ffn_low2}, a.u2, ffn_params(b, p), rows, D,
                        c.ffn_rank, stream_, a.h_mid);
  mark("fwd ffn");
}

// The AR-SSM as the recipe of ops/ssm.cuh: GEMMs on cuBLASLt, the rest in the ssm kernels.
void Model::ssm_forward(int layer, float* y) {
  const ModelConfig& c = config_;
  const BlockLayout& b = layout_.blocks[layer];
  BlockBuffers& a = arena_->blocks[layer];
  const SsmConfig sc = ssm_config(c, B_, N_);
  const SsmParams<float> sp = ssm_params(b, static_cast<const float*>(params_));
  const int rows = B_ * N_, D = sc.D, R = sc.R, G = sc.gate_hidden();
  float* mask = sc.mask_on() ? a.ssm_mask : nullptr;

  // W_U and W_V are adjacent in the parameter table, proj_u and proj_v in the arena: one batched GEMM.
  const long long uv_stride = adjacent_stride(sp.WU, sp.WV, R * D);
  if (a.u_bf16) {
    __nv_bfloat16* stack = a.ssm_stack_bf16;
    to_bf16(stack, sp.WU, size_t(R) * D, stream_);
    to_bf16(stack + size_t(R) * D, sp.WV, size_t(R) * D, stream_);
    to_bf16(stack + size_t(2 * R) * D, sp.W1, size_t(G) * D, stream_);
    linear_forward(a.ssm_hidden, a.u_bf16, stack + size_t(2 * R) * D, sp.b1, rows, D, G, stream_);
    gemm_strided_batched(false, true, rows, R, D, 1.f, a.u_bf16, D, 0, stack, D, (long long)R * D, 0.f, a.ssm_proj_u,
                         R, a.ssm_proj_v - a.ssm_proj_u, 2, stream_);
  } else {
    linear_forward(a.ssm_hidden, a.u, sp.W1, sp.b1, rows, D, G, stream_);
    gemm_strided_batched(false, true, rows, R, D, 1.f, a.u, D, 0, sp.WU, D, uv_stride, 0.f, a.ssm_proj_u, R,
                         a.ssm_proj_v - a.ssm_proj_u, 2, stream_);
  }
  ssm_relu_forward(a.ssm_hidden, long(rows) * G, stream_);
  linear_forward(a.ssm_chi, a.ssm_hidden, sp.W2, sp.b2, rows, G, R, stream_);
  if (mask) ssm_rank_mask_forward(mask, a.delta, a.F, sp, rows, R, stream_);
  ssm_gate_forward(a.ssm_chi, a.ssm_scan_in, a.ssm_chi, mask, a.ssm_proj_u, rows, R, stream_);
  ssm_scan_forward(a.ssm_state, a.ssm_scan_in, sc.decay ? sp.ell : nullptr, B_, N_, R, stream_);
  ssm_readout_forward(a.ssm_readout, a.ssm_state, a.ssm_proj_v, a.ssm_chi, mask, rows, R, stream_);
  ssm_conv_forward(y, a.u, sp.conv, B_, N_, D, stream_);
  linear_forward(y, a.ssm_readout, sp.WO, sp.bO, rows, R, D, stream_, y);  // y = conv + readout·W_Oᵀ + b_O
}

// ---- loss and backward ---------------------------------------------------------------------------------

void Model::loss(const int32_t* targets, double label_smoothing, double accumulate_scale, bool with_gradient) {
  if (B_ == 0) throw std::logic_error("loss(): no forward has run");
  if (serving_) throw std::logic_error("loss(): a serving model keeps no fp32 logits");
  if (with_gradient && !arena_->backward)
    throw std::logic_error("loss(): an inference-only model has no backward to compute a gradient for");
  Arena& a = *arena_;
  const size_t rows = size_t(B_) * N_;
  for (size_t i = 0; i < rows; ++i)
    if (targets[i] != kIgnore && (targets[i] < 0 || targets[i] >= config_.vocab_size))
      throw std::invalid_argument("target id " + std::to_string(targets[i]) + " is outside the vocabulary");
  stage_tokens(a.targets, targets, rows, 1);
  smoothing_ = float(label_smoothing);
  head_gradient_ready_ = false;
  run_pass(with_gradient ? 3 : 2, float(accumulate_scale),
           [this, with_gradient, accumulate_scale] { head_pass(with_gradient, float(accumulate_scale)); });
  head_gradient_ready_ = with_gradient;
}

const float* Model::loss_result() const { return arena_->loss_result; }

void Model::read_loss(double* total_nats, int64_t* count) const {
  float result[2] = {0, 0};
  MUSE_CUDA_CHECK(cudaMemcpyAsync(result, arena_->loss_result, sizeof(result), cudaMemcpyDeviceToHost, stream_));
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (count) *count = int64_t(result[1]);
  if (total_nats) *total_nats = double(result[0]) * double(result[1]);
}

double Model::take_loss_sum() {
  double sum = 0;
  MUSE_CUDA_CHECK(cudaMemcpyAsync(&sum, loss_sum_, sizeof(double), cudaMemcpyDeviceToHost, stream_));
  MUSE_CUDA_CHECK(cudaMemsetAsync(loss_sum_, 0, sizeof(double), stream_));
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return sum;
}

void Model::backward(double scale) {
  if (B_ == 0) throw std::logic_error("backward(): no forward has run");
  if (!arena_->backward) throw std::logic_error("backward(): the model is set to inference only");
  if (!head_gradient_ready_)
    throw std::logic_error("backward(): call loss(targets, smoothing, accumulate_scale, /*with_gradient=*/true) first");
  head_gradient_ready_ = false;
  grads();
  run_pass(1, float(scale), [this, scale] { backward_pass(scale); });
}

void Model::set_graphs(bool on) {
  graphs_on_ = on;
  if (!on) graphs_.reset();
}

void Model::run_pass(int pass, float scale, const std::function<void()>& body) {
  const GemmMathScope math(gemm_math_);
  // Profiling records events between the kernels and reads them on the host: it runs the pass as it is.
  if (!graphs_on_ || profiler_) {
    body();
    return;
  }
  if (!graphs_) graphs_ = std::make_unique<Graphs>();
  if (graphs_->generation != arena_->generation) {
    graphs_->clear();
    graphs_->generation = arena_->generation;
  }
  const Graphs::Key key{pass, B_, N_, serving_, int(gemm_math_), scale, pass >= 2 ? smoothing_ : 0.f};
  Graphs::Entry& entry = graphs_->entries[key];
  // A shape seen once (the last, shorter batch of an evaluation) runs as it is; the second run captures.
  if (!entry.exec && ++entry.runs < 2) {
    body();
    return;
  }
  if (!entry.exec) entry.exec = capture_graph(stream_, body);
  MUSE_CUDA_CHECK(cudaGraphLaunch(entry.exec, stream_));
}

void Model::backward_pass(double scale) {
  const ModelConfig& c = config_;
  const ModelLayout& m = layout_;
  Arena& a = *arena_;
  const int D = c.d_model, Vp = c.padded_vocab(), rows = B_ * N_;
  const size_t RD = size_t(rows) * D;
  const float* p = params_;
  float* g = grads_;
  float* dE = m.embed != kAbsent ? g + m.embed : a.dE;
  // loss() left the head's gradients of the unscaled loss in du and a.dE.
  if (scale != 1.0) scale_inplace(a.du, float(scale), RD, stream_);
  if (m.embed != kAbsent)
    add_scaled(dE, a.dE, float(scale), size_t(Vp) * D, stream_);
  else if (scale != 1.0)
    scale_inplace(a.dE, float(scale), size_t(Vp) * D, stream_);
  mark("bwd head scale");
  zero(a.dh, RD);
  layernorm_backward(a.dh, g + m.final_gain, g + m.final_bias, a.du, nullptr, a.h.back(), p + m.final_gain,
                     a.final_mean, a.final_rstd, rows, D, stream_);
  mark("bwd layernorm");
  for (size_t l = m.blocks.size(); l-- > 0;) block_backward(int(l), a.dh);

  if (m.positions != kAbsent) positions_backward(g + m.positions, a.dh, B_, N_, D, stream_);
  embedding_lookup_backward(dE, a.dh, a.ids, rows, D, c.vocab_size, a.workspace, stream_);
  mark("bwd embedding");
  if (m.embed == kAbsent) {
    const HttShape sh = htt_shape(c.vocab_size, c.d_model, c.htt_rank);
    const HttSaved parts = htt_saved_parts(a.htt_saved, sh);
    htt_materialize_backward(g + m.htt_a, g + m.htt_b, g + m.htt_theta, a.dE, parts.A_hat, parts.A_norm, parts.B_hat,
                             parts.B_norm, p + m.htt_theta, sh, a.workspace, stream_);
    mark("bwd htt materialise");
  }
}

void Model::gpt_block_backward(int layer, float* dh) {
  const ModelConfig& c = config_;
  const BlockLayout& b = layout_.blocks[layer];
  BlockBuffers& a = arena_->blocks[layer];
  Arena& s = *arena_;
  const float* p = params_;
  float* g = grads_;
  const int D = c.d_model, rows = B_ * N_;
  const size_t RD = size_t(rows) * D;
  zero(s.du2, RD);
  dense_mlp_backward(s.du2, mlp_grads(b, g), dh, {a.ffn_pre, a.ffn_hidden}, a.u2, mlp_params(b, p), rows, D,
                     s.workspace, stream_);
  layernorm_backward(dh, g + b.ln_ffn_gain, g + b.ln_ffn_bias, s.du2, nullptr, a.h_mid, p + b.ln_ffn_gain, a.ln2_mean,
                     a.ln2_rstd, rows, D, stream_);
  mark("bwd ffn");
  zero(s.dmixed, RD);
  linear_backward(s.dmixed, g + b.w_o, nullptr, dh, a.o_loc, p + b.w_o, rows, D, D, stream_);
  mark("bwd w_o gemm");
  zero(s.dq, RD), zero(s.dk, RD), zero(s.dv, RD);
  causal_attn_backward(s.dq, s.dk, s.dv, s.dmixed, a.q, a.k, a.v, a.o_loc, a.lse, B_, N_, c.n_heads, D,
                       c.pos_embedding == PosEmbedding::alibi, stream_);
  mark("bwd attention");
  zero(s.du, RD);
  qkv_backward(b, a);
  layernorm_backward(dh, g + b.ln_gain, g + b.ln_bias, s.du, nullptr, s.h[layer], p + b.ln_gain, a.ln_mean,
                     a.ln_rstd, rows, D, stream_);
  mark("bwd layernorm");
}

void Model::muse_block_backward(int layer, float* dh) {
  const ModelConfig& c = config_;
  const BlockLayout& b = layout_.blocks[layer];
  BlockBuffers& a = arena_->blocks[layer];
  Arena& s = *arena_;
  const float* p = params_;
  float* g = grads_;
  const bool phase8 = c.arch == Arch::phase8;
  const bool hopping = b.bk_w_J != kAbsent, gate = b.key_gate_w != kAbsent;
  const bool use_linear = phase8 && c.linear_attn;
  const int D = c.d_model, H = c.n_heads, rows = B_ * N_;
  const size_t RD = size_t(rows) * D, RH = size_t(rows) * H;
  float* ws = s.workspace;

  // FFN sub-block: h_out = h_mid + FFN(LN_ffn(h_mid)).
  if (b.ffn_v1 != kAbsent) {
    if (a.u2_bf16) {
      lowrank_ffn_backward_bf16(s.du2, ffn_grads(b, g), dh, a.ffn_bf16, a.u2_bf16, ffn_params(b, p),
                                ffn_weights_bf16(b, params_bf16_), rows, D, c.ffn_rank, ws, stream_,
                                /*accumulate=*/false);
    } else {
      zero(s.du2, RD);
      lowrank_ffn_backward(s.du2, ffn_grads(b, g), dh, {a.ffn_low1, a.ffn_pre, a.ffn_hidden, a.ffn_low2}, a.u2,
                           ffn_params(b, p), rows, D, c.ffn_rank, ws, stream_);
    }
    layernorm_backward(dh, g + b.ln_ffn_gain, g + b.ln_ffn_bias, s.du2, nullptr, a.h_mid, p + b.ln_ffn_gain,
                       a.ln2_mean, a.ln2_rstd, rows, D, stream_);
    mark("bwd ffn");
  }

  // Mix: h_mid = h_in + LN_h(cap30(ξ·y_att + (1−ξ)·y_glob)); dh flows on to h_in unchanged.
  // The first writers of this layer's gradient buffers write rather than add: no zeroing passes.
  residual_mix_backward(nullptr, s.dy_att, s.dy_glob, s.dxi, g + b.ln_h_gain, g + b.ln_h_bias, dh,
                        {a.mix_capped, a.mix_mean, a.mix_rstd}, a.y_att, a.y_glob, a.xi, p + b.ln_h_gain, rows, D, ws,
                        stream_, /*accumulate=*/false);
  zero(s.dF, size_t(rows) * 3), zero(s.dg, size_t(rows) * 2);
  if (phase8)
    bk_gate_backward(s.dF, g + b.xi_w, g + b.xi_b, s.dxi, a.xi, a.F, p + b.xi_w, rows, 1, ws, stream_);
  else
    phase7_gate_backward(s.dg, g + b.xi_s, s.dxi, a.xi, a.g, p + b.xi_s, rows, ws, stream_);
  mark("bwd gates");

  // Global path.
  zero(s.ddelta, rows);
  ssm_backward(layer);  // writes du
  mark("bwd ssm");

  // Local and linear attention.
  zero(s.dc, 1);
  if (a.mixed_bf16) {
    to_bf16(s.operand_bf16, s.dy_att, RD, stream_);
    gemm(false, false, rows, D, D, 1.f, s.operand_bf16, D, params_bf16_ + b.w_o, D, 0.f, s.dmixed, D, stream_);
    gemm(true, false, D, D, rows, 1.f, s.operand_bf16, D, a.mixed_bf16, D, 1.f, g + b.w_o, D, stream_);
  } else {
    zero(s.dmixed, RD);
    linear_backward(s.dmixed, g + b.w_o, nullptr, s.dy_att, use_linear ? a.mixed : a.o_loc, p + b.w_o, rows, D, D,
                    stream_);
  }
  mark("bwd w_o gemm");
  // The linear attention, when there is one, writes dq, dk, dv, dμ first; otherwise they start from zero.
  if (!use_linear) zero(s.dq, RD), zero(s.dk, RD), zero(s.dv, RD);
  if (gate) {
    if (!use_linear) zero(s.dmu, RH);
    zero(s.dlog_mu, RH);
  }
  const float* do_loc = s.dmixed;
  if (use_linear) {
    curvature_mix_backward(s.do_loc, s.do_lin, c.curvature_mix ? s.dc : nullptr, s.dmixed, a.o_loc, a.o_lin,
                           a.curvature + 1, rows, D, ws, stream_, /*accumulate=*/false);
    linear_attn_backward(s.dq, s.dk, s.dv, gate ? s.dmu : nullptr, s.do_lin, a.o_lin, a.zeta, a.q, a.k, a.v,
                         gate ? a.mu : nullptr, B_, N_, D, H, ws, a.lin_states, stream_, /*accumulate=*/false);
    mark("bwd linear attention");
    do_loc = s.do_loc;
  }
  local_attn_backward(s.dq, s.dk, s.dv, s.dc, g + b.beta, gate ? s.dlog_mu : nullptr, do_loc, a.o_loc, a.lse, a.q,
                      a.k, a.v, static_cast<const float*>(a.curvature), p + b.beta, gate ? a.log_mu : nullptr,
                      attn_config(c, B_, N_), ws, stream_);
  mark("bwd local attention");
  curvature_backward(g + b.c_raw, s.dc, p + b.c_raw, stream_);
  if (gate) {
    log_backward(s.dmu, s.dlog_mu, a.mu, RH, stream_);
    bk_gate_backward(s.dF, g + b.key_gate_w, g + b.key_gate_b, s.dmu, a.mu, a.F, p + b.key_gate_w, rows, H, ws,
                     stream_);
  }
  mark("bwd gates");
  qkv_backward(b, a);

  // BK core, then LN + radius back into the residual stream.
  bk_layer_backward(s.du, bk_grads(b, g), phase8 ? nullptr : s.dg, s.dF, a.u, a.g, {a.bk_v, a.bk_J, a.bk_J2},
                    bk_params(b, p, c), hopping, B_, N_, D, ws, stream_);
  mark("bwd bk core");
  layernorm_backward(dh, g + b.ln_gain, g + b.ln_bias, s.du, s.ddelta, s.h[layer], p + b.ln_gain, a.ln_mean,
                     a.ln_rstd, rows, D, stream_);
  mark("bwd layernorm");
}

// The backward recipe of ops/ssm.cuh; accumulates into du, ddelta, dF of the arena and the SSM's gradients.
void Model::ssm_backward(int layer) {
  const ModelConfig& c = config_;
  const BlockLayout& b = layout_.blocks[layer];
  BlockBuffers& a = arena_->blocks[layer];
  Arena& s = *arena_;
  const SsmConfig sc = ssm_config(c, B_, N_);
  const SsmParams<float> sp = ssm_params(b, static_cast<const float*>(params_));
  const SsmGrads<float> sg = ssm_grads(b, grads_);
  const int rows = B_ * N_, D = sc.D, R = sc.R, G = sc.gate_hidden();
  const size_t RR = size_t(rows) * R;
  const float* mask = sc.mask_on() ? a.ssm_mask : nullptr;
  float* ws = s.workspace;

  ssm_conv_backward(s.du, sg.conv, s.dy_glob, a.u, sp.conv, B_, N_, D, ws, stream_, /*accumulate=*/false);
  zero(s.d_readout, RR);
  linear_backward(s.d_readout, sg.WO, sg.bO, s.dy_glob, a.ssm_readout, sp.WO, rows, R, D, stream_);
  zero(s.dS, RR);
  ssm_readout_backward(s.dS, s.d_readout, a.ssm_proj_v, a.ssm_chi, mask, rows, R, stream_);
  zero(s.dscan_in, RR);
  ssm_scan_backward(s.dscan_in, sc.decay ? sg.ell : nullptr, s.dS, a.ssm_state, a.ssm_scan_in,
                    sc.decay ? sp.ell : nullptr, B_, N_, R, ws, stream_);
  zero(s.dproj_u, RR), zero(s.dproj_v, RR), zero(s.dchi_pre, RR);
  if (mask) zero(s.dm, RR);
  ssm_gate_backward(s.dproj_u, s.dproj_v, s.dchi_pre, mask ? s.dm : nullptr, s.dscan_in, s.d_readout, a.ssm_state,
                    a.ssm_proj_u, a.ssm_proj_v, a.ssm_chi, mask, rows, R, stream_);
  if (a.ssm_stack_bf16) {
    // [dproj_u dproj_v dhidden] rounded side by side: du += that·[W_U; W_V; W_1] is one GEMM (K = 2R + D/4), and
    // the weight gradients read u in bf16.
    const int ld = 2 * R + G;
    __nv_bfloat16* op = s.operand_bf16;
    to_bf16_columns(op, ld, s.dproj_u, rows, R, stream_);
    to_bf16_columns(op + R, ld, s.dproj_v, rows, R, stream_);
    zero(s.dhidden, size_t(rows) * G);
    linear_backward(s.dhidden, sg.W2, sg.b2, s.dchi_pre, a.ssm_hidden, sp.W2, rows, G, R, stream_);
    ssm_relu_backward(s.dhidden, a.ssm_hidden, long(rows) * G, stream_);
    to_bf16_columns(op + 2 * R, ld, s.dhidden, rows, G, stream_);
    gemm(false, false, rows, D, ld, 1.f, op, ld, a.ssm_stack_bf16, D, 1.f, s.du, D, stream_);
    gemm(true, false, R, D, rows, 1.f, op, ld, a.u_bf16, D, 1.f, sg.WU, D, stream_);
    gemm(true, false, R, D, rows, 1.f, op + R, ld, a.u_bf16, D, 1.f, sg.WV, D, stream_);
    gemm(true, false, G, D, rows, 1.f, op + 2 * R, ld, a.u_bf16, D, 1.f, sg.W1, D, stream_);
    column_sum_accumulate(sg.b1, s.dhidden, rows, G, stream_);
  } else {
    // dW_U and dW_V unbatched, as in qkv_backward: R × D results summed over B·N rows need split-K.
    linear_backward(s.du, sg.WU, nullptr, s.dproj_u, a.u, sp.WU, rows, D, R, stream_);
    linear_backward(s.du, sg.WV, nullptr, s.dproj_v, a.u, sp.WV, rows, D, R, stream_);
    zero(s.dhidden, size_t(rows) * G);
    linear_backward(s.dhidden, sg.W2, sg.b2, s.dchi_pre, a.ssm_hidden, sp.W2, rows, G, R, stream_);
    ssm_relu_backward(s.dhidden, a.ssm_hidden, long(rows) * G, stream_);
    linear_backward(s.du, sg.W1, sg.b1, s.dhidden, a.u, sp.W1, rows, D, G, stream_);
  }
  if (mask) ssm_rank_mask_backward(s.ddelta, s.dF, sg, s.dm, mask, a.delta, a.F, sp, rows, R, ws, stream_);
}

}  // namespace muse::cuda
