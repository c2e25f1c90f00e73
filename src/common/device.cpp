#include "common/device.h"

#include <stdexcept>

namespace muse {

bool cuda_built() {
#ifdef MUSE_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

std::string resolve_device(const std::string& requested) {
  if (requested != "cpu" && requested != "cuda" && requested != "auto")
    throw std::invalid_argument("--device " + requested + ": expected cpu, cuda or auto");
  if (requested == "cpu") return "cpu";
  int gpus = 0;
#ifdef MUSE_HAVE_CUDA
  gpus = cuda::device_count();
#endif
  if (gpus > 0) return "cuda";
  if (requested == "auto") return "cpu";
  throw std::invalid_argument(cuda_built() ? "--device cuda: no CUDA device is visible (check nvidia-smi and "
                                             "CUDA_VISIBLE_DEVICES)"
                                           : "--device cuda: this muse was built without the CUDA backend "
                                             "(configure with nvcc on PATH)");
}

}  // namespace muse
