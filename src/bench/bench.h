// `muse bench` (SPEC §7): median throughput over timed iterations after warm-up, and peak memory.
//   forward: B×N×Vp logits written (fp32 on the CPU) from resident weights, E materialised per call;
//   train:   one full optimizer step (forward, loss, backward, clip, AdamW);
//   decode:  one recurrent decode step of `batch` streams after a prompt of `context` tokens each
//            (infer/decoder.h): tokens/s in total and per stream.
#pragma once
#include <string>
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
  std::string device = "cpu";
};

struct BenchRecord {
  std::string preset, mode, device;
  int batch = 0, seq = 0, threads = 0, iters = 0;
  double tokens_per_s = 0;      // B·N / median seconds per iteration (decode: B / median seconds per step)
  double tokens_per_s_per_stream = 0;  // decode: 1 / median seconds per step
  int context = 0;              // decode: prompt tokens per stream
  double median_ms = 0;
  double peak_mem_mb = 0;       // the process's resident high-water mark
  double gflop_per_iter = 0;    // SPEC §7 FLOP count
  long long parameters = 0;
};

BenchRecord run_bench(const BenchOptions& options);

// FLOPs of one forward of B×N tokens as SPEC §7 counts them (×3 for a training step).
double forward_flops(const ModelConfig& config, int B, int N);

// FLOPs of one decode step of B streams at a context of `context` tokens, counted as forward_flops counts
// them (the head is the factored HTT head when the embedding is HTT).
double decode_flops(const ModelConfig& config, int B, int context);

// Peak resident memory of this process in MiB (VmHWM).
double peak_resident_mb();

}  // namespace muse
