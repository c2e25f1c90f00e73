// What the CUDA backend can see. Plain C++ so the CLI and tests need no CUDA headers.
#pragma once
#include <string>

namespace muse::cuda {

// Number of usable CUDA devices (0 when there is no driver or no GPU).
int device_count();
// One line per device: index, name, compute capability, memory.
std::string device_summary();

}  // namespace muse::cuda
