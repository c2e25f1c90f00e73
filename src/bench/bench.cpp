#include "bench/bench.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "common/device.h"
#include "common/rng.h"
#include "infer/decoder.h"
#include "infer/generation.h"
#include "model/model.h"
#include "ops/htt.h"
#include "train/optimizer.h"
#include "train/trainer.h"
#ifdef MUSE_HAVE_CUDA
#include "common/cuda_check.cuh"
#include "infer/cuda_decoder.h"
#include "infer/decode_timeline.h"
#endif

namespace muse {

double peak_resident_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) {
      std::istringstream in(line.substr(6));
      double kb = 0;
      in >> kb;
      return kb / 1024.0;
    }
  return 0;
}

double forward_flops(const ModelConfig& c, int B, int N) {
  const double D = c.d_model, H = c.n_heads, dh = D / H, R = c.ssm_rank, rows = double(B) * N;
  const double Vp = c.padded_vocab();
  // Query-key pairs actually inside the window.
  double pairs = 0;
  for (int i = 0; i < N; ++i) {
    const int W = c.window;
    const int start = c.arch == Arch::gpt ? 0 : (c.attn_mode == AttnMode::sliding ? std::max(0, i - W + 1) : i - i % W);
    pairs += i - start + 1;
  }
  pairs *= B;
  double per_layer = 2 * rows * 4 * D * D + 4 * dh * pairs * H;  // q, k, v, o projections + scores and values
  if (c.arch == Arch::gpt) {
    per_layer += 2 * rows * 8 * D * D;
  } else {
    per_layer += 2 * rows * (D * (D / 4) + (D / 4) * R + 3 * R * D);  // SSM gate MLP, W_U, W_V, W_O
    if (c.arch == Arch::phase8 && c.linear_attn) per_layer += rows * H * 4 * dh * dh;
    if (c.ffn == FfnKind::lowrank) per_layer += 2 * rows * (c.ffn_rank * D * 2 + c.ffn_rank * 4 * D * 2);
  }
  double head = 2 * rows * D * Vp;
  if (c.embedding == EmbeddingKind::htt) head += 2 * Vp * D * c.htt_rank;  // materialising E
  return c.n_layers * per_layer + head;
}

double decode_flops(const ModelConfig& c, int B, int context) {
  const double D = c.d_model, H = c.n_heads, dh = D / H, R = c.ssm_rank, W = c.window;
  double pairs = context + 1;  // keys the new token's query sees
  if (c.arch != Arch::gpt) pairs = c.attn_mode == AttnMode::sliding ? std::min(pairs, W) : context % c.window + 1;
  double per_layer = 2 * 4 * D * D + 4 * dh * pairs * H;
  if (c.arch == Arch::gpt) {
    per_layer += 2 * 8 * D * D;
  } else {
    per_layer += 2 * (D * (D / 4) + (D / 4) * R + 3 * R * D);
    if (c.arch == Arch::phase8 && c.linear_attn) per_layer += H * 4 * dh * dh;
    if (c.ffn == FfnKind::lowrank) per_layer += 2 * (c.ffn_rank * D * 2 + c.ffn_rank * 4 * D * 2);
  }
  double head = 2 * D * c.padded_vocab();
  if (c.embedding == EmbeddingKind::htt) {
    const HttShape s = htt_shape(c.vocab_size, c.d_model, c.htt_rank);
    head = 2.0 * s.d1 * s.d2 * s.v2 * s.r + 2.0 * s.v1 * s.v2 * s.r * s.d1;
  }
  return B * (c.n_layers * per_layer + head);
}

namespace {

// The fields every timed record has: what ran, the threads, the iterations and their median.
BenchRecord timed_record(const BenchOptions& o, double median_s, long long parameters) {
  BenchRecord r;
  r.preset = o.preset;
  r.mode = o.mode;
  r.batch = o.batch;
  r.threads = omp_get_max_threads();
  r.iters = o.iters;
  r.median_ms = median_s * 1e3;
  r.parameters = parameters;
  return r;
}

// The fields of a decode record, from the median seconds per step of all streams.
BenchRecord decode_record(const BenchOptions& o, const ModelConfig& config, double median_s, long long parameters) {
  BenchRecord r = timed_record(o, median_s, parameters);
  r.seq = o.context;
  r.context = o.context;
  r.tokens_per_s = o.batch / median_s;
  r.tokens_per_s_per_stream = 1 / median_s;
  r.gflop_per_iter = decode_flops(config, o.batch, o.context) / 1e9;
  return r;
}

// Prefills every stream with a random prompt of `context` tokens (the same for either device), then the
// median seconds of one decode step of all streams on random tokens; `finish` ends a timed step (the GPU
// decoder's synchronisation).
template <class AnyDecoder, class Finish>
double time_decode_steps(const BenchOptions& o, const ModelConfig& config, AnyDecoder& decoder, Finish finish) {
  Rng rng(2);
  std::vector<int32_t> tokens(std::max(o.context, o.batch));
  for (int s = 0; s < o.batch; ++s) {
    for (int i = 0; i < o.context; ++i) tokens[i] = int32_t(rng.below(config.vocab_size));
    decoder.prefill(s, tokens.data(), o.context);
  }
  return median_seconds(o.warmup, o.iters, [&] {
    for (int s = 0; s < o.batch; ++s) tokens[s] = int32_t(rng.below(config.vocab_size));
    decoder.step(tokens.data());
    finish();
  });
}

// Prefills `batch` streams with random prompts of `context` tokens, then times single decode steps of all
// streams together.
BenchRecord run_decode_bench(const BenchOptions& o, const ModelConfig& config) {
  Model<float> model(config);
  model.init(1);
  Decoder<float> decoder(model, o.batch);
  const double median = time_decode_steps(o, config, decoder, [] {});
  BenchRecord r = decode_record(o, config, median, (long long)model.table().count());
  r.device = "cpu";
  r.peak_mem_mb = peak_resident_mb();
  return r;
}

#ifdef MUSE_HAVE_CUDA
size_t device_bytes_in_use() {
  size_t free_bytes = 0, total_bytes = 0;
  MUSE_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return total_bytes - free_bytes;
}

// The same measurement with the GPU decoder (infer/cuda_decoder.h): a timed step is one CUDA graph of the
// step's kernels and a synchronisation, with the logits left on the device (a sampler on the host would add
// their copy). Memory: the device memory the run holds (weights, E, states, step buffers).
BenchRecord run_cuda_decode_bench(const BenchOptions& o, const ModelConfig& config) {
  if (o.profile && !cuda::decode::timeline_enabled())
    throw std::invalid_argument(
        "--profile with --mode decode reports the GPU step's timeline, which this build leaves out: configure "
        "with -DMUSE_DECODE_TIMELINE=ON (every phase of every decode kernel then reads the GPU clock)");
  MUSE_CUDA_CHECK(cudaFree(nullptr));  // create the context first, so the baseline excludes it
  const size_t baseline = device_bytes_in_use();
  Model<float> model(config);
  model.init(1);
  cuda::Decoder decoder(model, o.batch);
  const double median =
      time_decode_steps(o, config, decoder, [&] { MUSE_CUDA_CHECK(cudaStreamSynchronize(decoder.stream())); });
  // decode_flops counts the factored head for HTT; where the GPU falls back to E, count the product with it.
  ModelConfig counted = config;
  if (!decoder.factored_head()) counted.embedding = EmbeddingKind::dense;
  BenchRecord r = decode_record(o, counted, median, (long long)model.table().count());
  cudaDeviceProp prop{};
  int device = 0;
  MUSE_CUDA_CHECK(cudaGetDevice(&device));
  MUSE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  r.device = std::string("cuda (") + prop.name + ")";
  r.gpu_math = "fp32";  // the decode kernels' arithmetic; --gpu-math sets the forward/train GEMMs only
  r.peak_mem_mb = double(device_bytes_in_use() - baseline) / double(1 << 20);
  if (o.profile) r.timeline = cuda::decode::read_timeline();
  return r;
}
#endif

}  // namespace

BenchRecord throughput_record(const BenchOptions& o, const ModelConfig& config, double median_s,
                              long long parameters) {
  BenchRecord r = timed_record(o, median_s, parameters);
  r.seq = o.seq;
  r.tokens_per_s = double(o.batch) * o.seq / median_s;
  r.gflop_per_iter = forward_flops(config, o.batch, o.seq) * (o.mode == "train" ? 3 : 1) / 1e9;
  return r;
}

BenchRecord run_bench(const BenchOptions& o) {
  if (o.mode != "forward" && o.mode != "train" && o.mode != "decode")
    throw std::invalid_argument("--mode " + o.mode + ": expected forward, train or decode");
  if (o.batch < 1 || o.seq < 1 || o.iters < 1)
    throw std::invalid_argument("--batch, --seq and --iters must be positive");
  const ModelConfig config = resolve_model_config(o.preset, "", o.overrides);
  if (o.mode == "decode") {
    if (o.context < 1) throw std::invalid_argument("--context must be at least 1");
    check_generation_length(config, o.context, o.warmup + o.iters);
  }
  const std::string device = o.mode == "decode" ? resolve_decode_device(o.device, config) : resolve_device(o.device);
  if (device == "cuda") {
#ifdef MUSE_HAVE_CUDA
    return o.mode == "decode" ? run_cuda_decode_bench(o, config) : run_cuda_bench(o, config);
#endif
  }
  if (o.mode == "decode") return run_decode_bench(o, config);
  Model<float> model(config);
  model.init(1);
  Rng rng(2);
  std::vector<int32_t> ids(size_t(o.batch) * o.seq), targets(ids.size());
  for (auto& id : ids) id = int32_t(rng.below(config.vocab_size));
  for (auto& id : targets) id = int32_t(rng.below(config.vocab_size));

  AdamW optimizer(model.table(), AdamWConfig{});
  auto iteration = [&] {
    model.forward(ids.data(), o.batch, o.seq);
    if (o.mode == "train") {
      model.loss(targets.data());
      model.zero_grads();
      model.backward();
      clip_grad_norm(model.grads().data(), model.grads().size(), 1.0);
      optimizer.step(model.params().data(), model.grads().data(), 1e-4);
    }
  };
  const double median = median_seconds(o.warmup, o.iters, iteration);
  BenchRecord r = throughput_record(o, config, median, (long long)model.table().count());
  r.device = "cpu";
  r.peak_mem_mb = peak_resident_mb();
  return r;
}

}  // namespace muse
