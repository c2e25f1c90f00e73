// Float64 gradient checks (SPEC §3): for each tensor, one random-direction directional derivative and
// a few random coordinates, by central differences, against the analytic gradient.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace muse::test {

struct GradTensor {
  std::string name;
  std::vector<double>* value;         // perturbed in place (and restored) by the check
  const std::vector<double>* grad;    // the analytic gradient of the loss with respect to value
};

struct GradCheckOptions {
  double step = 1e-6;       // central-difference step h
  double rel_tol = 1e-6;    // |numeric − analytic| ≤ rel_tol · max(|numeric|, |analytic|, floor)
  double floor = 1e-2;      // keeps derivatives near zero from being judged on rounding noise alone
  int coordinates = 8;      // random coordinates per tensor, besides the random direction
  uint64_t seed = 12345;
};

// loss() recomputes the scalar loss from the current tensor values. Reports every mismatch through
// GoogleTest (ADD_FAILURE with the tensor name, coordinate and both values).
void expect_gradients_match(const std::function<double()>& loss, const std::vector<GradTensor>& tensors,
                            const GradCheckOptions& options = {});

}  // namespace muse::test
