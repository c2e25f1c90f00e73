#include <gtest/gtest.h>

#include <cmath>

#include "train/optimizer.h"

namespace muse::test {

TEST(train_adamw, matches_hand_computed_steps) {
  // Two parameters: p0 with decay, p1 without. lr 0.1, β (0.9, 0.95), eps 1e-8, wd 0.1.
  AdamW opt({{0, 1, true}, {1, 1, false}}, 2, AdamWConfig{});
  float p[2] = {1.0f, -2.0f};
  const float g1[2] = {0.5f, -1.0f};
  opt.step(p, g1, 0.1);
  // t = 1: m̂ = g, v̂ = g², update = g/(|g| + eps) = sign(g) (to 1e-8).
  EXPECT_NEAR(p[0], 1.0 * (1 - 0.1 * 0.1) - 0.1, 1e-6);
  EXPECT_NEAR(p[1], -2.0 + 0.1, 1e-6);
  const float g2[2] = {-0.25f, 2.0f};
  const double p0 = p[0], p1 = p[1];
  opt.step(p, g2, 0.05);
  // t = 2 for p0: m = 0.9·0.05 + 0.1·(−0.25)·… computed explicitly.
  auto expected = [](double p, double ga, double gb, double lr, bool decay) {
    const double m = 0.9 * (0.1 * ga) + 0.1 * gb, v = 0.95 * (0.05 * ga * ga) + 0.05 * gb * gb;
    const double mhat = m / (1 - 0.81), vhat = v / (1 - 0.9025);
    return p * (decay ? 1 - lr * 0.1 : 1.0) - lr * mhat / (std::sqrt(vhat) + 1e-8);
  };
  EXPECT_NEAR(p[0], expected(p0, 0.5, -0.25, 0.05, true), 1e-6);
  EXPECT_NEAR(p[1], expected(p1, -1.0, 2.0, 0.05, false), 1e-6);
  EXPECT_EQ(opt.steps_taken(), 2);
}

TEST(train_clip, scales_to_max_norm_and_reports_the_original) {
  float g[2] = {3.0f, 4.0f};
  EXPECT_DOUBLE_EQ(clip_grad_norm(g, 2, 1.0), 5.0);
  EXPECT_NEAR(g[0], 0.6, 1e-7);
  EXPECT_NEAR(g[1], 0.8, 1e-7);
  float h[2] = {0.3f, 0.4f};
  EXPECT_NEAR(clip_grad_norm(h, 2, 1.0), 0.5, 1e-7);
  EXPECT_FLOAT_EQ(h[0], 0.3f);  // under the limit: untouched
}

TEST(train_schedule, warmup_then_cosine_to_final_fraction) {
  LrSchedule s{1e-3, 10, 110, 0.1};
  EXPECT_NEAR(s.at(0), 1e-4, 1e-12);
  EXPECT_NEAR(s.at(9), 1e-3, 1e-12);
  EXPECT_NEAR(s.at(10), 1e-3, 1e-12);
  EXPECT_NEAR(s.at(109), 1e-4, 1e-12);
  // Halfway through the decay: the cosine is at its midpoint, (1 + 0.1)/2 of the peak.
  LrSchedule odd{1.0, 0, 101, 0.1};
  EXPECT_NEAR(odd.at(50), 0.55, 1e-12);
}

// A time budget's schedule length: the rest of the budget at the steady step time, not at the average that
// includes the slow first steps (on the GPU, the eager first step and the captured second took as long as
// the next thousands: the `demo` preset's 45 s budget ended after 21 s).
TEST(train_schedule, time_budget_uses_the_steady_step_time) {
  // 20 steps in 4.25 s, the first 2 in 2 s: 0.125 s a step since, 55.75 s left: 446 more steps (times exact
  // in binary, so that the floor is).
  EXPECT_EQ(steps_for_budget(60.0, 20, 4.25, 2, 2.0), 20 + 446);
  // No settling cost: the budget over the step time.
  EXPECT_EQ(steps_for_budget(10.0, 20, 2.5, 2, 0.25), 80);
  // The budget already spent, or no measurable time: one more step.
  EXPECT_EQ(steps_for_budget(1.0, 20, 4.25, 2, 2.0), 21);
  EXPECT_EQ(steps_for_budget(60.0, 20, 0.0, 2, 0.0), 21);
}

}  // namespace muse::test
