// What the CUDA backend can see, and the choice of device for a command. Plain C++ so the CLI and tests
// need no CUDA headers.
#pragma once
#include <string>

namespace muse {

// "cpu", "cuda" or "auto" (cuda when this build has the CUDA backend and a GPU is visible, else cpu) →
// "cpu" or "cuda". Throws std::invalid_argument for any other value, or for "cuda" without a usable GPU
// (saying which is missing).
std::string resolve_device(const std::string& requested);

// True when this binary was built with the CUDA backend.
bool cuda_built();

}  // namespace muse

namespace muse::cuda {

// Number of usable CUDA devices (0 when there is no driver or no GPU). CUDA builds only.
int device_count();
// One line per device: index, name, compute capability, memory. CUDA builds only.
std::string device_summary();

}  // namespace muse::cuda
