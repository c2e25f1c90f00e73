// `muse bench` (SPEC §7): median throughput over timed iterations after warm-up, and peak memory.
//   forward: B×N×Vp logits written (fp32 on the CPU) from resident weights, E materialised per call;
//   train:   one full optimizer step (forward, loss, backward, clip, AdamW);
//   decode:  one recurrent decode step of `batch` streams after a prompt of `context` tokens each
//            (infer/decoder.h): tokens/s in total and per stream.
#pragma once
#include <algorithm>
#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"

namespace muse {

struct BenchOptions {
  std::string preset;
  std::vector<std::string> overrides;
  std::string mode = "forward";  // forward | train | decode
  int batch = 1, seq = 256;
  int context = 100;             // decode: prompt tokens per stream before the timed steps
  int warmup = 2, iters = 10;
  std::string device = "cpu";    // cpu, cuda or auto
  bool profile = false;          // GPU: time each group of kernels (BenchRecord::profile); decode: the
                                 // step's timeline (BenchRecord::timeline)
  std::string gpu_math = "bf16"; // GPU GEMMs: bf16, tf32 or fp32 (train's default)
};

struct BenchRecord {
  std::string preset, mode, device;
  std::string gpu_math;         // GPU runs: the GEMM math
  int batch = 0, seq = 0, threads = 0, iters = 0;
  double tokens_per_s = 0;      // B·N / median seconds per iteration (decode: B / median seconds per step)
  double tokens_per_s_per_stream = 0;  // decode: 1 / median seconds per step
  int context = 0;              // decode: prompt tokens per stream
  double median_ms = 0;
  double peak_mem_mb = 0;       // CPU: the process's resident high-water mark; GPU: device memory in use
  double gflop_per_iter = 0;    // SPEC §7 FLOP count
  long long parameters = 0;
  // With BenchOptions::profile: (group of kernels, ms per iteration) over the timed iterations, in the order
  // the groups run (cuda::Model::profile).
  std::vector<std::pair<std::string, double>> profile;
  // GPU decode with BenchOptions::profile: (phase, µs) of the last step's last block (infer/decode_timeline.h).
  std::vector<std::pair<std::string, double>> timeline;
};

BenchRecord run_bench(const BenchOptions& options);

// The fields every forward/train record shares, from the options and the median seconds per iteration
// (device, memory and the rest are the caller's).
BenchRecord throughput_record(const BenchOptions& options, const ModelConfig& config, double median_s,
                              long long parameters);

// forward and train on the GPU (bench/cuda_bench.cpp; CUDA builds only): the same measurements, each
// iteration synchronised, memory as the device memory the run holds (weights included).
BenchRecord run_cuda_bench(const BenchOptions& options, const ModelConfig& config);

// Runs `iteration` warmup times untimed, then iters times timed; returns the median seconds.
template <typename F>
double median_seconds(int warmup, int iters, F&& iteration) {
  for (int i = 0; i < warmup; ++i) iteration();
  std::vector<double> seconds;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    iteration();
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(seconds.begin(), seconds.end());
  return seconds.size() % 2 ? seconds[seconds.size() / 2]
                            : 0.5 * (seconds[seconds.size() / 2 - 1] + seconds[seconds.size() / 2]);
}

// FLOPs of one forward of B×N tokens as SPEC §7 counts them (×3 for a training step).
double forward_flops(const ModelConfig& config, int B, int N);

// FLOPs of one decode step of B streams at a context of `context` tokens, counted as forward_flops counts
// them (the head is the factored HTT head when the embedding is HTT).
double decode_flops(const ModelConfig& config, int B, int context);

// Peak resident memory of this process in MiB (VmHWM).
double peak_resident_mb();

}  // namespace muse
