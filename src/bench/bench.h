// `muse bench` (SPEC §7): median throughput over timed iterations after warm-up, and peak memory.
//   forward: B×N×Vp logits written (fp32 on the CPU) from resident weights, E materialised per call;
//   train:   one full optimizer step (forward, loss, backward, clip, AdamW).
#pragma once
#include <string>
#include <vector>

#include "model/config.h"

namespace muse {

struct BenchOptions {
  std::string preset;
  std::vector<std::string> overrides;
  std::string mode = "forward";  // forward | train
  int batch = 1, seq = 256;
  int warmup = 2, iters = 10;
  std::string device = "cpu";
};

struct BenchRecord {
  std::string preset, mode, device;
  int batch = 0, seq = 0, threads = 0, iters = 0;
  double tokens_per_s = 0;      // B·N / median seconds per iteration
  double median_ms = 0;
  double peak_mem_mb = 0;       // the process's resident high-water mark
  double gflop_per_iter = 0;    // SPEC §7 FLOP count
  long long parameters = 0;
};

BenchRecord run_bench(const BenchOptions& options);

// FLOPs of one forward of B×N tokens as SPEC §7 counts them (×3 for a training step).
double forward_flops(const ModelConfig& config, int B, int N);

// Peak resident memory of this process in MiB (VmHWM).
double peak_resident_mb();

}  // namespace muse
