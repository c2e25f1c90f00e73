// Error checking for CUDA runtime calls: a failure throws with the call, file and line, so callers
// get a clear message instead of a sticky error surfacing later.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define MUSE_CUDA_CHECK(call)                                                                        \
  do {                                                                                               \
    cudaError_t muse_err_ = (call);                                                                  \
    if (muse_err_ != cudaSuccess)                                                                    \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(muse_err_) + " in " + \
                               #call + " at " + __FILE__ + ":" + std::to_string(__LINE__));          \
  } while (0)
