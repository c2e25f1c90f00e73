#include "support/gradcheck.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "common/rng.h"

namespace muse::test {

namespace {

bool close(double numeric, double analytic, const GradCheckOptions& o) {
  const double scale = std::max({std::abs(numeric), std::abs(analytic), o.floor});
  return std::isfinite(numeric) && std::isfinite(analytic) && std::abs(numeric - analytic) <= o.rel_tol * scale;
}

}  // namespace

void expect_gradients_match(const std::function<double()>& loss, const std::vector<GradTensor>& tensors,
                            const GradCheckOptions& o) {
  Rng rng(o.seed);
  for (const GradTensor& t : tensors) {
    std::vector<double>& x = *t.value;
    const std::vector<double>& g = *t.grad;
    ASSERT_EQ(x.size(), g.size()) << t.name << ": gradient has the wrong size";
    ASSERT_FALSE(x.empty()) << t.name << ": empty tensor";

    // Random unit direction u: numeric (L(x+hu) − L(x−hu))/2h against analytic g·u.
    std::vector<double> u(x.size());
    double norm = 0;
    for (double& ui : u) {
      ui = rng.normal();
      norm += ui * ui;
    }
    norm = std::sqrt(norm);
    double analytic = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      u[i] /= norm;
      analytic += g[i] * u[i];
    }
    const std::vector<double> saved = x;
    for (size_t i = 0; i < x.size(); ++i) x[i] = saved[i] + o.step * u[i];
    const double plus = loss();
    for (size_t i = 0; i < x.size(); ++i) x[i] = saved[i] - o.step * u[i];
    const double minus = loss();
    x = saved;
    const double numeric = (plus - minus) / (2 * o.step);
    EXPECT_TRUE(close(numeric, analytic, o))
        << t.name << ": directional derivative numeric " << numeric << " vs analytic " << analytic;

    // Random coordinates (with replacement on small tensors).
    for (int c = 0; c < o.coordinates; ++c) {
      const size_t i = rng.below(x.size());
      x[i] = saved[i] + o.step;
      const double p = loss();
      x[i] = saved[i] - o.step;
      const double m = loss();
      x[i] = saved[i];
      const double num = (p - m) / (2 * o.step);
      EXPECT_TRUE(close(num, g[i], o)) << t.name << "[" << i << "]: numeric " << num << " vs analytic " << g[i];
    }
  }
}

}  // namespace muse::test
