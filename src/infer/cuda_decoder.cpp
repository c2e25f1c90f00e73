#include "infer/cuda_decoder.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/cuda_check.cuh"
#include "common/cuda_graph.cuh"
#include "infer/cuda_decode_kernels.cuh"
#include "ops/htt.cuh"
#include "ops/local_attn.h"
#include "ops/poincare.h"

namespace muse::cuda {

namespace {

// Every buffer and every piece of a stream's state starts on a 256-byte boundary (the kernels' float4 loads).
constexpr size_t kAlignFloats = 64;
size_t aligned(size_t n) { return (n + kAlignFloats - 1) / kAlignFloats * kAlignFloats; }
constexpr size_t kNone = size_t(-1);

void check_supported(const ModelConfig& c) {
  if (c.arch == Arch::gpt)
    throw std::invalid_argument(
        "GPU decoding: arch = gpt is not supported (its KV cache grows with the context; the recurrent GPU "
        "decoder serves Phase 7/8 models): decode it with --device cpu");
  validate(c);
}

// Keys the ring holds after `position` tokens: those position and later can still attend to (block mode:
// the current block; a full block is emptied by the next push).
int ring_count(const ModelConfig& c, int position) {
  if (c.attn_mode == AttnMode::sliding) return std::min(position, c.window);
  if (position == 0) return 0;
  return position % c.window == 0 ? c.window : position % c.window;
}

// Offsets (floats) of one layer's state pieces inside a stream's block; kNone where the config has none.
struct LayerStateLayout {
  size_t keys = 0, values = 0, key_norms = 0, log_mu = kNone, bk = 0, ssm_S = 0, conv_tail = 0, lin_S = kNone,
         lin_z = kNone;
  size_t floats = 0;
};

LayerStateLayout layer_state_layout(const ModelConfig& c, bool gated, bool linear) {
  const size_t W = c.window, D = c.d_model, H = c.n_heads, dh = c.head_dim();
  LayerStateLayout s;
  size_t at = 0;
  auto take = [&](size_t n) {
    const size_t offset = at;
    at += aligned(n);
    return offset;
  };
  s.keys = take(W * D);
  s.values = take(W * D);
  s.key_norms = take(W * H * 4);
  if (gated) s.log_mu = take(W * H);
  s.bk = take(8);
  s.ssm_S = take(c.ssm_rank);
  s.conv_tail = take(2 * D);
  if (linear) {
    s.lin_S = take(H * dh * dh);
    s.lin_z = take(D);
  }
  s.floats = at;
  return s;
}

void require_size(size_t have, size_t want, const char* what, size_t layer) {
  if (have != want)
    throw std::invalid_argument("decode state: layer " + std::to_string(layer) + ": " + what + " has " +
                                std::to_string(have) + " values, this model needs " + std::to_string(want));
}

// The CPU decoder's state of one stream as the device block of `stream_floats` floats: keys go to ring slot
// position % W.
std::vector<float> pack_state(const ModelConfig& c, const LayerStateLayout& lay, size_t stream_floats,
                              const DecodeState<float>& state) {
  const int W = c.window, D = c.d_model, H = c.n_heads, dh = c.head_dim(), pos = state.position;
  if (pos < 0) throw std::invalid_argument("decode state: negative position " + std::to_string(pos));
  if (state.layers.size() != size_t(c.n_layers))
    throw std::invalid_argument("decode state: " + std::to_string(state.layers.size()) + " layers, the model has " +
                                std::to_string(c.n_layers));
  std::vector<float> block(stream_floats, 0.f);
  for (size_t l = 0; l < state.layers.size(); ++l) {
    const LayerDecodeState<float>& ls = state.layers[l];
    const LocalAttnDecodeState<float>& window = ls.window;
    float* base = block.data() + l * lay.floats;
    require_size(window.keys.size(), size_t(W) * D, "the key ring", l);
    require_size(window.values.size(), size_t(W) * D, "the value ring", l);
    require_size(window.key_norms.size(), size_t(W) * H, "the key norms", l);
    require_size(window.log_mu.size(), lay.log_mu == kNone ? 0 : size_t(W) * H, "the key-gate ring", l);
    require_size(ls.ssm_S.size(), size_t(c.ssm_rank), "the SSM state", l);
    require_size(ls.ssm_conv_tail.size(), 2 * size_t(D), "the conv tail", l);
    require_size(ls.lin_S.size(), lay.lin_S == kNone ? 0 : size_t(H) * dh * dh, "the linear-attention S", l);
    require_size(ls.lin_z.size(), lay.lin_z == kNone ? 0 : size_t(D), "the linear-attention z", l);
    const int count = ring_count(c, pos);
    if (window.count != count || window.start < 0 || window.start >= W)
      throw std::invalid_argument("decode state: layer " + std::to_string(l) + " holds " +
                                  std::to_string(window.count) + " keys, position " + std::to_string(pos) +
                                  " needs " + std::to_string(count));
    for (int m = 0; m < count; ++m) {
      const int from = (window.start + m) % W, to = (pos - count + m) % W;
      std::copy_n(window.keys.begin() + size_t(from) * D, D, base + lay.keys + size_t(to) * D);
      std::copy_n(window.values.begin() + size_t(from) * D, D, base + lay.values + size_t(to) * D);
      for (int h = 0; h < H; ++h) {
        const TangentNorm<float>& t = window.key_norms[size_t(from) * H + h];
        float* norms = base + lay.key_norms + (size_t(to) * H + h) * 4;
        norms[0] = t.norm;
        norms[1] = t.a;
        norms[2] = t.ls2a;
        norms[3] = t.coth2a;
        if (lay.log_mu != kNone) base[lay.log_mu + size_t(to) * H + h] = window.log_mu[size_t(from) * H + h];
      }
    }
    float* bk = base + lay.bk + (pos % 2) * 4;
    bk[0] = ls.bk_g_prev[0];
    bk[1] = ls.bk_g_prev[1];
    bk[2] = ls.bk_prev_half;
    std::copy(ls.ssm_S.begin(), ls.ssm_S.end(), base + lay.ssm_S);
    std::copy(ls.ssm_conv_tail.begin(), ls.ssm_conv_tail.end(), base + lay.conv_tail);
    if (lay.lin_S != kNone) {
      std::copy(ls.lin_S.begin(), ls.lin_S.end(), base + lay.lin_S);
      std::copy(ls.lin_z.begin(), ls.lin_z.end(), base + lay.lin_z);
    }
  }
  return block;
}

// The inverse of pack_state: the ring in the CPU decoder's order (oldest key in slot 0).
DecodeState<float> unpack_state(const ModelConfig& c, const LayerStateLayout& lay, const std::vector<float>& block,
                                int pos) {
  const int W = c.window, D = c.d_model, H = c.n_heads, dh = c.head_dim();
  DecodeState<float> state;
  state.position = pos;
  state.layers.resize(c.n_layers);
  for (size_t l = 0; l < state.layers.size(); ++l) {
    LayerDecodeState<float>& ls = state.layers[l];
    LocalAttnDecodeState<float>& window = ls.window;
    const float* base = block.data() + l * lay.floats;
    const int count = ring_count(c, pos);
    window.count = count;
    window.start = 0;
    window.keys.assign(size_t(W) * D, 0.f);
    window.values.assign(size_t(W) * D, 0.f);
    window.key_norms.assign(size_t(W) * H, TangentNorm<float>{});
    window.log_mu.assign(lay.log_mu == kNone ? 0 : size_t(W) * H, 0.f);
    for (int m = 0; m < count; ++m) {
      const int from = (pos - count + m) % W;
      std::copy_n(base + lay.keys + size_t(from) * D, D, window.keys.begin() + size_t(m) * D);
      std::copy_n(base + lay.values + size_t(from) * D, D, window.values.begin() + size_t(m) * D);
      for (int h = 0; h < H; ++h) {
        const float* norms = base + lay.key_norms + (size_t(from) * H + h) * 4;
        window.key_norms[size_t(m) * H + h] =
            TangentNorm<float>{norms[0], norms[1], norms[2], norms[3], norms[0] <= float(kPoincareNormFloor)};
        if (lay.log_mu != kNone) window.log_mu[size_t(m) * H + h] = base[lay.log_mu + size_t(from) * H + h];
      }
    }
    const float* bk = base + lay.bk + (pos % 2) * 4;
    ls.bk_g_prev[0] = bk[0];
    ls.bk_g_prev[1] = bk[1];
    ls.bk_prev_half = bk[2];
    ls.ssm_S.assign(base + lay.ssm_S, base + lay.ssm_S + c.ssm_rank);
    ls.ssm_conv_tail.assign(base + lay.conv_tail, base + lay.conv_tail + 2 * size_t(D));
    if (lay.lin_S != kNone) {
      ls.lin_S.assign(base + lay.lin_S, base + lay.lin_S + size_t(H) * dh * dh);
      ls.lin_z.assign(base + lay.lin_z, base + lay.lin_z + size_t(D));
    }
  }
  return state;
}

bool gated_model(const ModelLayout& m) { return !m.blocks.empty() && m.blocks[0].key_gate_w != kAbsent; }
bool linear_model(const ModelConfig& c) { return c.arch == Arch::phase8 && c.linear_attn; }

}  // namespace

// Device memory of the decoder and what the kernels of a step are given (built once; fixed addresses, so a
// captured step stays valid).
struct Decoder::Buffers {
  float* base = nullptr;     // one allocation: states, step rows and scratch
  float* E_owned = nullptr;  // HTT: E materialised from the cores (the embedding of layer 0's block_input)
  float* htt_cores = nullptr;  // HTT: Â, ‖A‖, B̂, ‖B‖ (the factored head reads Â and B̂)
  const float* E = nullptr;  // the head and embedding table [Vp, D]
  float* state = nullptr;    // [streams, stream_floats]
  int* step_rows = nullptr;  // [3, streams]: stream indices, tokens, positions
  float* alibi = nullptr;    // [H]
  float* h[2] = {nullptr, nullptr};  // residual stream, alternating between layers
  float *h_mid = nullptr, *low1 = nullptr, *ffn_partials = nullptr, *logits = nullptr;
  decode::StepBuffers step;
  std::vector<decode::BlockArgs> blocks;
  std::vector<decode::GemvPlan> input_plans, wo_plans, v1_plans;
  std::vector<decode::FfnPlan> ffn_plans;  // slices = 0: the block has no FFN
  decode::GemvPlan head_plan;  // the dense table's head (unset with the factored head)
  decode::HttHead htt_head;    // HTT: the factored head (its A_hat null otherwise)

  ~Buffers() {
    cudaFree(base);
    cudaFree(E_owned);
    cudaFree(htt_cores);
  }
};

Decoder::Decoder(const muse::Model<float>& host, int streams) : host_(&host), config_(host.config()) {
  check_supported(config_);
  if (streams < 1) throw std::invalid_argument("decoder: streams must be at least 1, got " + std::to_string(streams));
  positions_.assign(streams, 0);
  prefiller_ = std::make_unique<muse::Decoder<float>>(*host_, 1);
  build(nullptr);
}

Decoder::Decoder(const Model& model, int streams) : config_(model.config()) {
  check_supported(config_);
  if (streams < 1) throw std::invalid_argument("decoder: streams must be at least 1, got " + std::to_string(streams));
  positions_.assign(streams, 0);
  host_copy_ = std::make_unique<muse::Model<float>>(config_);
  model.download_params(host_copy_->params().data());  // synchronous: the model's pending writes are in
  host_ = host_copy_.get();
  prefiller_ = std::make_unique<muse::Decoder<float>>(*host_, 1);
  build(model.params());
}

Decoder::~Decoder() {
  if (stream_) cudaStreamSynchronize(stream_);
  for (cudaGraphExec_t exec : graphs_)
    if (exec) cudaGraphExecDestroy(exec);
  buffers_.reset();
  cudaFree(owned_params_);
  cudaFreeHost(staging_);
  cudaFreeHost(host_logits_);
  if (staged_) cudaEventDestroy(staged_);
  if (stream_) cudaStreamDestroy(stream_);
}

void Decoder::build(const float* device_params) {
  const ModelConfig& c = config_;
  ParamTable table;
  layout_ = build_layout(c, table);
  const int S = streams(), D = c.d_model, H = c.n_heads, R = c.ssm_rank, L = c.n_layers, Vp = c.padded_vocab();
  const int rho = c.ffn_rank, G = D / 4;
  const bool gated = gated_model(layout_), linear = linear_model(c);

  int device = 0, sms = 0, shared_optin = 0;
  MUSE_CUDA_CHECK(cudaGetDevice(&device));
  MUSE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  MUSE_CUDA_CHECK(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // One resident wave of GEMV blocks: the head's grid loops over its 6,288 tiles (phase8-small) rather than
  // repeating its LayerNorm prologue in thousands of blocks.
  max_blocks_ = sms * decode::kGemvBlocksPerSm;
  if (decode::prologue_shared_bytes(D) > size_t(shared_optin))
    throw std::invalid_argument("GPU decoding: d_model = " + std::to_string(D) + " is too wide (the kernels keep " +
                                std::to_string(decode::kRowsPerChunk) + " rows and the LayerNorm vectors of it in " +
                                std::to_string(shared_optin) + " bytes of shared memory)");
  if (decode::mixer_shared_bytes(D, H, c.window, R, linear) > size_t(shared_optin))
    throw std::invalid_argument("GPU decoding: window = " + std::to_string(c.window) + " with d_model / n_heads = " +
                                std::to_string(c.head_dim()) + " needs more shared memory than the attention " +
                                "kernel has (" + std::to_string(shared_optin) + " bytes)");

  MUSE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  MUSE_CUDA_CHECK(cudaEventCreateWithFlags(&staged_, cudaEventDisableTiming));
  if (device_params) {
    params_ = device_params;
  } else {
    MUSE_CUDA_CHECK(cudaMalloc(&owned_params_, table.total() * sizeof(float)));
    MUSE_CUDA_CHECK(cudaMemcpyAsync(owned_params_, host_->params().data(), table.total() * sizeof(float),
                                    cudaMemcpyHostToDevice, stream_));
    params_ = owned_params_;
  }

  const bool any_ffn = std::any_of(layout_.blocks.begin(), layout_.blocks.end(),
                                   [](const BlockLayout& bl) { return bl.ffn_v1 != kAbsent; });
  const decode::FfnPlan ffn_shape = any_ffn ? decode::make_ffn_plan(D, rho) : decode::FfnPlan{};

  const LayerStateLayout lay = layer_state_layout(c, gated, linear);
  stream_floats_ = size_t(L) * lay.floats;

  buffers_ = std::make_unique<Buffers>();
  Buffers& b = *buffers_;
  decode::StepBuffers& s = b.step;
  const bool htt = layout_.embed == kAbsent;
  const HttShape sh = htt ? htt_shape(c.vocab_size, D, c.htt_rank) : HttShape{};
  // The factored head where its kernels fit the GPU's shared memory, else the product with E.
  const bool factored_head = htt && decode::htt_head_shared_bytes(sh.r, sh.d1, sh.d2, D) <= size_t(shared_optin);
  if (factored_head) b.htt_head = decode::make_htt_head(sh.V, sh.Vp, D, sh.r, sh.v2, sh.d1, sh.d2);
  // Two passes over the same list: count, then assign.
  float* ints_rows = nullptr;
  auto plan = [&](auto&& take) {
    take(b.state, size_t(S) * stream_floats_);
    take(ints_rows, 3 * size_t(S));
    take(b.alibi, size_t(H));
    take(b.h[0], size_t(S) * D), take(b.h[1], size_t(S) * D), take(b.h_mid, size_t(S) * D);
    take(s.u, size_t(S) * D), take(s.delta, size_t(S)), take(s.g, 2 * size_t(S)), take(s.F, 3 * size_t(S));
    take(s.bk_v, size_t(S)), take(s.bk_J, 2 * size_t(S));
    take(s.q, size_t(S) * D), take(s.k, size_t(S) * D), take(s.v, size_t(S) * D);
    take(s.ssm_hidden, size_t(S) * G), take(s.proj_u, size_t(S) * R), take(s.proj_v, size_t(S) * R);
    take(s.mixed, size_t(S) * D), take(s.y_att, size_t(S) * D), take(s.y_glob, size_t(S) * D);
    take(b.low1, size_t(S) * rho), take(b.ffn_partials, decode::ffn_partial_floats(ffn_shape, S));
    take(b.logits, size_t(S) * Vp);
    take(b.htt_head.Z, decode::htt_head_z_floats(b.htt_head, S));
  };
  size_t total = 0;
  plan([&](float*& p, size_t n) {
    p = nullptr;
    total += aligned(n);
  });
  MUSE_CUDA_CHECK(cudaMalloc(&b.base, total * sizeof(float)));
  size_t at = 0;
  plan([&](float*& p, size_t n) {
    p = b.base + at;
    at += aligned(n);
  });
  b.step_rows = reinterpret_cast<int*>(ints_rows);
  // A fresh stream is empty: zero state (g_{−1} = 0, S = 0, …) at position 0.
  MUSE_CUDA_CHECK(cudaMemsetAsync(b.base, 0, total * sizeof(float), stream_));

  std::vector<float> slopes(H, 0.f);
  for (int h = 0; h < H; ++h) slopes[h] = float(local_attn_alibi_slope(h, H));
  MUSE_CUDA_CHECK(cudaMemcpyAsync(b.alibi, slopes.data(), H * sizeof(float), cudaMemcpyHostToDevice, stream_));

  const float* p = params_;
  if (!htt) {
    b.E = p + layout_.embed;
  } else {
    const size_t a_hat = size_t(sh.v1) * sh.r * sh.d1, a_norm = size_t(sh.v1) * sh.r;
    const size_t b_hat = size_t(sh.v2) * sh.r * sh.d2, b_norm = size_t(sh.v2) * sh.r;
    MUSE_CUDA_CHECK(cudaMalloc(&b.E_owned, size_t(Vp) * D * sizeof(float)));
    MUSE_CUDA_CHECK(cudaMalloc(&b.htt_cores, (a_hat + a_norm + b_hat + b_norm) * sizeof(float)));
    float* cores = b.htt_cores;
    htt_materialize_forward(b.E_owned, cores, cores + a_hat, cores + a_hat + a_norm, cores + a_hat + a_norm + b_hat,
                            p + layout_.htt_a, p + layout_.htt_b, p + layout_.htt_theta, sh, stream_);
    b.E = b.E_owned;
    if (factored_head) {
      b.htt_head.A_hat = cores;
      b.htt_head.B_hat = cores + a_hat + a_norm;
      b.htt_head.theta = p + layout_.htt_theta;
      b.htt_head.logits = b.logits;
    }
  }

  decode::configure_kernels(D, H, c.window, R, linear);
  auto at_param = [&](size_t offset) -> const float* { return offset == kAbsent ? nullptr : p + offset; };
  auto state_piece = [&](int l, size_t offset) -> float* {
    return offset == kNone ? nullptr : b.state + size_t(l) * lay.floats + offset;
  };
  for (int l = 0; l < L; ++l) {
    const BlockLayout& bl = layout_.blocks[l];
    decode::BlockArgs a;
    a.D = D, a.H = H, a.W = c.window, a.R = R;
    a.phase8 = c.arch == Arch::phase8;
    a.sliding = c.attn_mode == AttnMode::sliding;
    a.linear_attn = linear;
    a.curvature_mix = c.curvature_mix;
    a.ln_gain = at_param(bl.ln_gain), a.ln_bias = at_param(bl.ln_bias);
    a.hopping = bl.bk_w_J != kAbsent;
    a.bk_b_J = at_param(bl.bk_b_J), a.bk_eps_p = at_param(bl.bk_eps_p), a.bk_E0 = at_param(bl.bk_E0);
    a.j_max = float(c.j_max);
    a.c_raw = at_param(bl.c_raw), a.beta = at_param(bl.beta);
    a.key_gate_w = at_param(bl.key_gate_w), a.key_gate_b = at_param(bl.key_gate_b);
    a.alibi_slopes = c.pos_embedding == PosEmbedding::alibi ? b.alibi : nullptr;
    a.ssm_w2 = at_param(bl.ssm_w2), a.ssm_b2 = at_param(bl.ssm_b2), a.ssm_w_o = at_param(bl.ssm_w_o);
    a.ssm_b_o = at_param(bl.ssm_b_o), a.conv = at_param(bl.conv), a.ssm_ell = at_param(bl.ssm_ell);
    a.rank_w1 = at_param(bl.rank_w1), a.rank_b1 = at_param(bl.rank_b1), a.rank_w2 = at_param(bl.rank_w2);
    a.rank_b2 = at_param(bl.rank_b2), a.pi_w = at_param(bl.pi_w), a.pi_b = at_param(bl.pi_b);
    a.xi_w = at_param(bl.xi_w), a.xi_b = at_param(bl.xi_b), a.xi_s = at_param(bl.xi_s);
    a.ln_h_gain = at_param(bl.ln_h_gain), a.ln_h_bias = at_param(bl.ln_h_bias);
    a.ln_ffn_gain = at_param(bl.ln_ffn_gain), a.ln_ffn_bias = at_param(bl.ln_ffn_bias);
    a.state.keys = state_piece(l, lay.keys);
    a.state.values = state_piece(l, lay.values);
    a.state.key_norms = state_piece(l, lay.key_norms);
    a.state.log_mu = state_piece(l, lay.log_mu);
    a.state.bk = state_piece(l, lay.bk);
    a.state.ssm_S = state_piece(l, lay.ssm_S);
    a.state.conv_tail = state_piece(l, lay.conv_tail);
    a.state.lin_S = state_piece(l, lay.lin_S);
    a.state.lin_z = state_piece(l, lay.lin_z);
    a.state.stream_floats = stream_floats_;
    b.blocks.push_back(a);

    using decode::Epilogue;
    std::vector<decode::GemvSegment> input = {
        {p + bl.w_q, nullptr, nullptr, s.q, D, Epilogue::none},
        {p + bl.w_k, nullptr, nullptr, s.k, D, Epilogue::none},
        {p + bl.w_v, nullptr, nullptr, s.v, D, Epilogue::none},
        {p + bl.ssm_w1, p + bl.ssm_b1, nullptr, s.ssm_hidden, G, Epilogue::relu},
        {p + bl.ssm_w_u, nullptr, nullptr, s.proj_u, R, Epilogue::none},
        {p + bl.ssm_w_v, nullptr, nullptr, s.proj_v, R, Epilogue::none},
        {p + bl.bk_w_v, p + bl.bk_b_v, nullptr, s.bk_v, 1, Epilogue::none}};
    // w_J [2, D] as two rows: w_J,prev (the next position's share of its bond) and w_J,cur.
    if (bl.bk_w_J != kAbsent) input.push_back({p + bl.bk_w_J, nullptr, nullptr, s.bk_J, 2, Epilogue::none});
    b.input_plans.push_back(decode::make_gemv_plan(input, D));
    b.wo_plans.push_back(decode::make_gemv_plan({{p + bl.w_o, nullptr, nullptr, s.y_att, D, Epilogue::none}}, D));
    if (bl.ffn_v1 != kAbsent) {
      b.v1_plans.push_back(decode::make_gemv_plan({{p + bl.ffn_v1, nullptr, nullptr, b.low1, rho, Epilogue::none}}, D));
      decode::FfnPlan f = ffn_shape;
      f.u1 = p + bl.ffn_u1, f.b1 = p + bl.ffn_b1, f.v2 = p + bl.ffn_v2, f.u2 = p + bl.ffn_u2, f.b2 = p + bl.ffn_b2;
      f.low1 = b.low1, f.h_mid = b.h_mid, f.h_out = b.h[(l + 1) % 2];
      f.partials = b.ffn_partials;
      b.ffn_plans.push_back(f);
    } else {
      b.v1_plans.push_back(decode::GemvPlan{});
      b.ffn_plans.push_back(decode::FfnPlan{});
    }
  }
  if (!factored_head)
    b.head_plan = decode::make_gemv_plan({{b.E, nullptr, nullptr, b.logits, Vp, decode::Epilogue::none}}, D);

  MUSE_CUDA_CHECK(cudaMallocHost(&staging_, 3 * size_t(S) * sizeof(int32_t)));
  MUSE_CUDA_CHECK(cudaMallocHost(&host_logits_, size_t(S) * Vp * sizeof(float)));
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  graphs_.assign(S + 1, nullptr);
}

void Decoder::check_stream(int stream) const {
  if (stream < 0 || stream >= streams())
    throw std::out_of_range("decoder: stream " + std::to_string(stream) + " does not exist (this decoder has " +
                            std::to_string(streams()) + ")");
}

void Decoder::check_token(int32_t id) const {
  if (id < 0 || id >= config_.vocab_size)
    throw std::invalid_argument("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                std::to_string(config_.vocab_size) + ")");
}

void Decoder::check_position(int stream, int position) const {
  if (config_.pos_embedding == PosEmbedding::learned && position >= config_.max_seq)
    throw std::invalid_argument("stream " + std::to_string(stream) + ": position " + std::to_string(position) +
                                " is past max_seq = " + std::to_string(config_.max_seq) +
                                " of this model's learned positions (the context holds at most " +
                                std::to_string(config_.max_seq) + " tokens)");
}

bool Decoder::factored_head() const { return buffers_->htt_head.A_hat != nullptr; }

int Decoder::position(int stream) const {
  check_stream(stream);
  return positions_[stream];
}

void Decoder::upload_state(int stream, const std::vector<float>& block, int position) {
  Buffers& b = *buffers_;
  MUSE_CUDA_CHECK(cudaMemcpyAsync(b.state + size_t(stream) * stream_floats_, block.data(),
                                  stream_floats_ * sizeof(float), cudaMemcpyHostToDevice, stream_));
  positions_[stream] = position;
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void Decoder::reset(int stream) {
  check_stream(stream);
  Buffers& b = *buffers_;
  MUSE_CUDA_CHECK(cudaMemsetAsync(b.state + size_t(stream) * stream_floats_, 0, stream_floats_ * sizeof(float),
                                  stream_));
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  positions_[stream] = 0;
}

DecodeState<float> Decoder::snapshot(int stream) const {
  check_stream(stream);
  std::vector<float> block(stream_floats_);
  MUSE_CUDA_CHECK(cudaMemcpyAsync(block.data(), buffers_->state + size_t(stream) * stream_floats_,
                                  stream_floats_ * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  const bool gated = gated_model(layout_), linear = linear_model(config_);
  return unpack_state(config_, layer_state_layout(config_, gated, linear), block, positions_[stream]);
}

void Decoder::restore(int stream, const DecodeState<float>& state) {
  check_stream(stream);
  if (config_.pos_embedding == PosEmbedding::learned && state.position > config_.max_seq)
    throw std::invalid_argument("decode state: position " + std::to_string(state.position) + " is past max_seq = " +
                                std::to_string(config_.max_seq));
  const bool gated = gated_model(layout_), linear = linear_model(config_);
  upload_state(stream, pack_state(config_, layer_state_layout(config_, gated, linear), stream_floats_, state),
               state.position);
}

const float* Decoder::prefill(int stream, const int32_t* ids, int n) {
  check_stream(stream);
  if (n < 1) throw std::invalid_argument("prefill: the prompt is empty");
  for (int i = 0; i < n; ++i) check_token(ids[i]);
  check_position(stream, n - 1);
  if (n == 1) {
    reset(stream);
  } else {
    prefiller_->prefill(0, ids, n - 1);
    restore(stream, prefiller_->snapshot(0));
  }
  return step(&stream, ids + n - 1, 1);
}

const float* Decoder::step(const int* streams, const int32_t* tokens, int count) {
  if (count < 1) throw std::invalid_argument("decoder step: no streams given");
  if (count > this->streams())
    throw std::invalid_argument("decoder step: " + std::to_string(count) + " rows for " +
                                std::to_string(this->streams()) + " streams");
  for (int r = 0; r < count; ++r) check_stream(streams[r]);
  require_distinct_streams(streams, count);
  for (int r = 0; r < count; ++r) {
    check_token(tokens[r]);
    check_position(streams[r], positions_[streams[r]]);
  }
  // The previous step's copy out of the staging buffer must be done before the host overwrites it.
  MUSE_CUDA_CHECK(cudaEventSynchronize(staged_));
  std::copy(streams, streams + count, staging_);
  std::copy(tokens, tokens + count, staging_ + this->streams());
  for (int r = 0; r < count; ++r) staging_[2 * this->streams() + r] = positions_[streams[r]];
  run_step(count);
  MUSE_CUDA_CHECK(cudaEventRecord(staged_, stream_));
  for (int r = 0; r < count; ++r) ++positions_[streams[r]];
  last_rows_ = count;
  return buffers_->logits;
}

const float* Decoder::step(const int32_t* tokens) {
  std::vector<int> all(streams());
  for (int s = 0; s < streams(); ++s) all[s] = s;
  return step(all.data(), tokens, streams());
}

const float* Decoder::step(int stream, int32_t token) { return step(&stream, &token, 1); }

const float* Decoder::feed(int stream, const int32_t* ids, int n) {
  if (n < 1) throw std::invalid_argument("feed: no tokens given");
  const float* logits = nullptr;
  for (int i = 0; i < n; ++i) logits = step(stream, ids[i]);
  return logits;
}

const float* Decoder::host_logits() {
  if (last_rows_ == 0) throw std::logic_error("host_logits(): no step has run");
  MUSE_CUDA_CHECK(cudaMemcpyAsync(host_logits_, buffers_->logits,
                                  size_t(last_rows_) * config_.padded_vocab() * sizeof(float),
                                  cudaMemcpyDeviceToHost, stream_));
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return host_logits_;
}

void Decoder::enqueue_step(int count) {
  const ModelConfig& c = config_;
  Buffers& b = *buffers_;
  // The step's rows from the pinned staging buffer (a copy node of the graph when captured: it reads the
  // buffer when the graph runs).
  MUSE_CUDA_CHECK(cudaMemcpyAsync(b.step_rows, staging_, 3 * size_t(streams()) * sizeof(int32_t),
                                  cudaMemcpyHostToDevice, stream_));
  const decode::StepRows rows{b.step_rows, b.step_rows + streams(), b.step_rows + 2 * streams(), count};
  const decode::Embedding embedding{b.E, layout_.positions != kAbsent ? params_ + layout_.positions : nullptr};
  const int L = c.n_layers;
  for (int l = 0; l < L; ++l) {
    const decode::BlockArgs& a = b.blocks[l];
    float* h_in = b.h[l % 2];
    float* h_out = b.h[(l + 1) % 2];
    const bool ffn = layout_.blocks[l].ffn_v1 != kAbsent;
    // The step's first kernel reads what the copies before it wrote: it starts after them, not overlapped.
    decode::block_input(rows, h_in, l == 0 ? &embedding : nullptr, a, b.step, b.input_plans[l], max_blocks_,
                        overlap_ && l > 0, stream_);
    decode::mixer(rows, a, b.step, overlap_, stream_);
    decode::gemv(b.step.mixed, count, b.wo_plans[l], max_blocks_, overlap_, stream_);
    decode::residual_mix(count, h_in, ffn ? b.h_mid : h_out, a, b.step, b.v1_plans[l], max_blocks_, overlap_,
                         stream_);
    if (ffn) decode::ffn(count, b.ffn_plans[l], overlap_, stream_);
  }
  const float *final_gain = params_ + layout_.final_gain, *final_bias = params_ + layout_.final_bias;
  if (factored_head())
    decode::htt_head(rows, b.h[L % 2], final_gain, final_bias, b.htt_head, overlap_, stream_);
  else
    decode::head(rows, b.h[L % 2], final_gain, final_bias, c.d_model, b.head_plan, max_blocks_, overlap_, stream_);
}

void Decoder::run_step(int count) {
  if (!graphs_on_) {
    enqueue_step(count);
    return;
  }
  cudaGraphExec_t& exec = graphs_[count];
  if (!exec) exec = capture_graph(stream_, [&] { enqueue_step(count); });
  MUSE_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
}

void Decoder::drop_graphs() {
  MUSE_CUDA_CHECK(cudaStreamSynchronize(stream_));  // none of them may still be running
  for (cudaGraphExec_t& exec : graphs_) {
    if (exec) cudaGraphExecDestroy(exec);
    exec = nullptr;
  }
}

void Decoder::set_graphs(bool on) {
  graphs_on_ = on;
  if (!on) drop_graphs();
}

void Decoder::set_overlapped_launches(bool on) {
  if (on == overlap_) return;
  overlap_ = on;
  drop_graphs();  // a captured step keeps the launch attributes it was captured with
}

}  // namespace muse::cuda
