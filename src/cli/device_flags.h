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
                  "GEMM math on the GPU: tf32 (tensor cores, fp32 storage and accumulation), bf16 (GEMM inputs\n"
                  "rounded to bf16 for the bf16 tensor cores, fp32 accumulation, ~4e-3 relative per product; the\n"
                  "training head multiplies bf16 copies of x and E and bf16 dlogits, 2.5x faster than tf32 there)\n"
                  "or fp32 (the reference mode, matching the CPU to rounding)")
      ->capture_default_str()
      ->check(CLI::IsMember({"tf32", "bf16", "fp32"}));
}

}  // namespace muse::cli
