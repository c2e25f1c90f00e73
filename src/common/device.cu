#include <cuda_runtime.h>

#include <sstream>

#include "common/device.h"

namespace muse::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the error so later calls do not see it
    return 0;
  }
  return n;
}

std::string device_summary() {
  const int n = device_count();
  if (n == 0) return "no CUDA device";
  std::ostringstream out;
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    out << (i ? "\n" : "") << "cuda:" << i << " " << p.name << " (sm_" << p.major << p.minor << ", "
        << (p.totalGlobalMem >> 20) << " MiB)";
  }
  return out.str();
}

}  // namespace muse::cuda
