// Shared pieces of the GPU test driver: skip without a GPU, device buffers, and a comparison of a GPU
// result with the CPU reference under a stated tolerance (|gpu − cpu| ≤ atol + rtol·|cpu| per element).
#pragma once
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/cuda_check.cuh"
#include "common/device.h"

#define MUSE_REQUIRE_GPU()                                               \
  do {                                                                   \
    if (muse::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

namespace muse::test {

template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) { MUSE_CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(n, 1) * sizeof(T))); }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void upload(const std::vector<T>& host) {
    MUSE_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    MUSE_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  T* get() { return ptr_; }

 private:
  T* ptr_ = nullptr;
  size_t n_;
};

inline void expect_close_to_reference(const std::vector<float>& gpu, const std::vector<float>& cpu, double atol,
                                      double rtol, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  size_t bad = 0;
  double worst = 0;
  size_t worst_i = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double err = std::abs(double(gpu[i]) - double(cpu[i]));
    const double allowed = atol + rtol * std::abs(double(cpu[i]));
    if (!(err <= allowed)) ++bad;
    if (!(err <= worst)) {
      worst = err;
      worst_i = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << cpu.size() << " elements out of tolerance (atol " << atol
                     << ", rtol " << rtol << "); worst at " << worst_i << ": gpu " << gpu[worst_i] << " cpu "
                     << cpu[worst_i];
}


inline double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::abs(x)));
  return m;
}

// Outputs are filled with NaN before a GPU op runs, so an element it fails to write fails the comparison.
inline std::vector<float> nans(size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }

// Non-zero starting values for a gradient buffer (to check that the GPU op accumulates), sized like the
// increment so a kernel that overwrites instead of adding fails by far.
inline std::vector<float> accumulation_start(const std::vector<float>& increment) {
  const double s = std::max(max_abs(increment), 1e-3);
  std::vector<float> v(increment.size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(s * (i % 2 ? 0.75 : -0.5));
  return v;
}

// gpu (started at `start`) must equal start + increment (the CPU op run from zero) within
// atol + rtol·|ref|, plus the rounding of the final addition.
inline void expect_accumulated(const std::vector<float>& gpu, const std::vector<float>& start,
                               const std::vector<float>& increment, double atol, double rtol,
                               const std::string& what) {
  std::vector<float> expected(increment.size());
  for (size_t i = 0; i < expected.size(); ++i) expected[i] = start[i] + increment[i];
  expect_close_to_reference(gpu, expected, atol + 2.4e-7 * max_abs(start), rtol, what);
}

}  // namespace muse::test
