// CUDA AdamW and global grad-norm clipping (SPEC §3, §6.8): the same arithmetic as train/optimizer.h on a
// flat fp32 parameter/gradient array in device memory, with no host synchronisation in the step loop.
//
//   grad_norm      ‖grads‖₂ into a device double: a fixed grid of blocks writes per-block partial sums of
//                  squares (double), one block adds them in a fixed order — deterministic for a given n.
//   clip_grads     grads *= float(max_norm / norm) when max_norm > 0 and norm > max_norm, reading the norm
//                  from the device scalar (so the host never waits for it).
//   AdamW::step    one launch over all parameter ranges (one block per ≤ 4096-element chunk of a range, so
//                  the decay flag is block-uniform); can apply the clip scale on the fly (fused clipping).
//
// The per-element update repeats the CPU op's double-precision expression with explicitly rounded
// intrinsics (no FMA contraction), so parameters and moments are bit-identical to muse::AdamW::step for
// identical inputs. The CPU accumulates the norm sequentially, the GPU in a tree, so the norm agrees to
// ~1e-15 relative and the clip scale almost always exactly.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "train/optimizer.h"

namespace muse::cuda {

// grad_norm's scratch: kGradNormBlocks doubles of device memory (per-block partial sums).
inline constexpr int kGradNormBlocks = 1024;

// norm[0] (device double) = ‖grads[0, n)‖₂.
void grad_norm(double* norm, const float* grads, size_t n, double* partials, cudaStream_t stream = 0);

// grads[0, n) *= float(max_norm / norm[0]) when max_norm > 0 and norm[0] > max_norm.
void clip_grads(float* grads, size_t n, const double* norm, double max_norm, cudaStream_t stream = 0);

// The CPU clip_grad_norm: grad_norm then clip_grads; the norm before clipping is left in norm[0].
void clip_grad_norm(float* grads, size_t n, double max_norm, double* norm, double* partials,
                    cudaStream_t stream = 0);

// AdamW with decoupled weight decay over a flat parameter array on the current device. The moments (fp32,
// zero-initialised) and the chunk table live on the device, allocated once by the constructor.
class AdamW {
 public:
  AdamW(std::vector<ParamRange> ranges, size_t total, AdamWConfig config);
  AdamW(const ParamTable& table, AdamWConfig config) : AdamW(param_ranges(table), table.total(), config) {}
  ~AdamW();
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  // One update of params from grads at learning rate lr (the step counter advances first, as on the CPU).
  // With clip_norm non-null and max_norm > 0, every gradient is read as float(g·float(max_norm/‖g‖)) when
  // *clip_norm > max_norm — the values clip_grads would have written — while grads stays unmodified. With
  // clip_norm non-null and *clip_norm not finite, nothing changes (parameters and moments stay; the step
  // counter still advances, and the caller stops the run).
  void step(float* params, const float* grads, double lr, cudaStream_t stream = 0, const double* clip_norm = nullptr,
            double max_norm = 0);

  int64_t steps_taken() const { return t_; }
  void set_steps_taken(int64_t t) { t_ = t; }
  // Device pointers to the moments ([total] floats each), for checkpointing.
  float* first_moment_data() { return m_; }
  float* second_moment_data() { return v_; }
  const float* first_moment_data() const { return m_; }
  const float* second_moment_data() const { return v_; }
  size_t size() const { return total_; }
  const AdamWConfig& config() const { return config_; }

  struct Chunk {
    unsigned long long offset;  // first element
    int size;                   // ≤ kChunk elements
    int decay;                  // 1 when weight decay applies
  };
  static constexpr int kChunk = 4096;

 private:
  AdamWConfig config_;
  size_t total_;
  float* m_ = nullptr;
  float* v_ = nullptr;
  Chunk* chunks_ = nullptr;
  int num_chunks_ = 0;
  int64_t t_ = 0;
};

}  // namespace muse::cuda
