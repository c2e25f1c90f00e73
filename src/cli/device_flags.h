// What `muse train`, `eval` and `bench` share: the device choice and the GEMM math of the GPU path.
#pragma once
#include <CLI/CLI.hpp>
#include <string>

namespace muse::cli {

// --device cpu|cuda|auto; `what_auto_means` ends the help text (each command says what auto does for it).
inline void add_device_flag(CLI::App* cmd, std::string& device, const std::string& what_auto_means) {
  cmd->add_option("--device", device, "cpu, cuda, or auto (" + what_auto_means + ")")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
}

inline void add_gpu_math_flag(CLI::App* cmd, std::string& gpu_math) {
  cmd->add_option("--gpu-math", gpu_math,
                  "GEMM math on the GPU: bf16 (GEMM inputs rounded to bf16 for the bf16 tensor cores, fp32\n"
                  "accumulation, ~4e-3 relative per product; the training head writes bf16 logits and gradients\n"
                  "from bf16 copies of x and E, with fp32 softmax statistics), tf32 (tensor cores on fp32 storage,\n"
                  "~1e-3 relative) or fp32 (the reference mode, matching the CPU to rounding)")
      ->capture_default_str()
      ->check(CLI::IsMember({"tf32", "bf16", "fp32"}));
}

}  // namespace muse::cli
