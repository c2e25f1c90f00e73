#include "ops/xent.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/gpu_support.h"
#include "ops/htt.h"
#include "ops/xent.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

// Tolerances. The GPU keeps fp32 softmax statistics (online max / Σexp over ≤ 98 columns per thread, then
// a fixed tree) where the CPU sums exp in double: Σexp is within ~1e-6 relative, so lse and the row losses
// (≈ log V ≈ 11) are within ~2e-6 absolute; kLossAtol = 2e-5 (10× margin). The mean adds ≤ 256 such rows.
// The gradient entries are scale·(p − ε/V) (+ the target term) added onto the initial values; p carries
// the lse error (~1e-6 relative): compared with 1e-5 of the largest |gradient| absolute plus 1e-5 relative.
constexpr double kLossAtol = 2e-5, kLossRtol = 1e-6, kGradRel = 1e-5;

double max_abs_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  return m;
}

// ignore_mode: 0 none ignored, 1 every 5th row ignored, 2 every row ignored (count = 0).
void check_xent(int rows, int V, float smoothing, int ignore_mode, int32_t ignore_index = -1) {
  const int Vp = padded_vocab(V);
  SCOPED_TRACE("rows " + std::to_string(rows) + ", V " + std::to_string(V) + ", smoothing " +
               std::to_string(smoothing) + ", ignore mode " + std::to_string(ignore_mode) + ", ignore index " +
               std::to_string(ignore_index));
  Rng rng(uint64_t(rows) * 7 + V + ignore_mode * 3 + int(smoothing * 10));
  std::vector<float> logits(size_t(rows) * Vp);
  for (int r = 0; r < rows; ++r)
    for (int v = 0; v < Vp; ++v)
      // Spread logits (std 3, a few large) so the softmax is far from uniform; NaN in the padded columns,
      // which must never be read.
      logits[size_t(r) * Vp + v] = v < V ? float(3.0 * rng.normal() + (v % 97 == 0 ? 8.0 : 0.0)) : std::nanf("");
  std::vector<int32_t> targets(rows);
  for (int r = 0; r < rows; ++r) {
    do targets[r] = int32_t(rng.below(V));
    while (targets[r] == ignore_index);
    if (ignore_mode == 2 || (ignore_mode == 1 && r % 5 == 1)) targets[r] = ignore_index;
  }
  if (rows > 1 && ignore_mode != 2) targets[rows - 1] = V - 1;  // the last real column

  std::vector<float> row_loss(rows), row_lse(rows);
  const XentResult cpu = xent_forward(row_loss.data(), row_lse.data(), logits.data(), targets.data(), rows, V, Vp,
                                      smoothing, ignore_index);

  DeviceBuffer<float> glogits(logits), gloss(std::vector<float>(rows, std::nanf(""))),
      glse(std::vector<float>(rows, std::nanf(""))), gresult(std::vector<float>(2, std::nanf("")));
  DeviceBuffer<int32_t> gtargets(targets);
  cuda::xent_forward(gloss.get(), glse.get(), gresult.get(), glogits.get(), gtargets.get(), rows, V, Vp, smoothing,
                     ignore_index);
  expect_close_to_reference(gloss.download(), row_loss, kLossAtol, kLossRtol, "row_loss");
  expect_close_to_reference(glse.download(), row_lse, kLossAtol, kLossRtol, "row_lse");
  const auto result = gresult.download();
  EXPECT_NEAR(result[0], cpu.mean_loss, kLossAtol + kLossRtol * std::abs(cpu.mean_loss)) << "mean_loss";
  EXPECT_EQ(result[1], float(cpu.count)) << "count";

  // The training head's pass, a chunk of rows at a time (chunks of 1, 16 and all rows): the same losses,
  // and each chunk overwritten by the CPU op's gradient of the batch's mean loss (from zero, dloss = 1), with
  // zeros in the padded columns (NaN before: they must be overwritten, never read) and in ignored rows.
  std::vector<float> from_zero(logits.size(), 0.f);
  xent_backward(from_zero.data(), 1.f, logits.data(), row_lse.data(), targets.data(), rows, V, Vp, smoothing, cpu.count,
                ignore_index);
  const double scale = max_abs_difference(from_zero, std::vector<float>(from_zero.size(), 0.f));  // 0 if count = 0
  for (int chunk : {1, 16, rows}) {
    SCOPED_TRACE("chunk " + std::to_string(chunk));
    DeviceBuffer<float> gchunked(logits), gcount(std::vector<float>(2, std::nanf(""))),
        gloss2(std::vector<float>(rows, std::nanf(""))), glse2(std::vector<float>(rows, std::nanf("")));
    cuda::xent_count(gcount.get(), gtargets.get(), rows, ignore_index);
    for (int first = 0; first < rows; first += chunk) {
      const int n = std::min(chunk, rows - first);
      cuda::xent_rows(gloss2.get() + first, glse2.get() + first, gchunked.get() + size_t(first) * Vp,
                      gtargets.get() + first, n, V, Vp, smoothing, gcount.get(), ignore_index);
    }
    EXPECT_EQ(gcount.download()[1], float(cpu.count)) << "count";
    EXPECT_EQ(gloss2.download(), gloss.download()) << "row_loss: the same kernel with or without the gradient";
    EXPECT_EQ(glse2.download(), glse.download()) << "row_lse";
    expect_close_to_reference(gchunked.download(), from_zero, kGradRel * scale, kGradRel, "dlogits");
  }
  // The bf16 head's form: bf16 logits (here the same ones rounded to bf16), fp32 statistics, and the gradient
  // written over them in bf16 (8-bit mantissa: within 2^-8 relative), against the CPU op on the rounded values.
  std::vector<__nv_bfloat16> rounded(logits.size());
  std::vector<float> widened(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) {
    rounded[i] = __float2bfloat16(logits[i]);
    widened[i] = __bfloat162float(rounded[i]);
  }
  std::vector<float> loss_of_rounded(rows), lse_of_rounded(rows), grad_of_rounded(logits.size(), 0.f);
  xent_forward(loss_of_rounded.data(), lse_of_rounded.data(), widened.data(), targets.data(), rows, V, Vp, smoothing,
               ignore_index);
  xent_backward(grad_of_rounded.data(), 1.f, widened.data(), lse_of_rounded.data(), targets.data(), rows, V, Vp,
                smoothing, cpu.count, ignore_index);
  DeviceBuffer<__nv_bfloat16> gbf16(rounded);
  DeviceBuffer<float> gcount(std::vector<float>(2, std::nanf(""))), gloss3(std::vector<float>(rows, std::nanf(""))),
      glse3(std::vector<float>(rows, std::nanf("")));
  cuda::xent_count(gcount.get(), gtargets.get(), rows, ignore_index);
  cuda::xent_rows(gloss3.get(), glse3.get(), gbf16.get(), gtargets.get(), rows, V, Vp, smoothing, gcount.get(),
                  ignore_index);
  expect_close_to_reference(gloss3.download(), loss_of_rounded, kLossAtol, kLossRtol, "row_loss of bf16 logits");
  expect_close_to_reference(glse3.download(), lse_of_rounded, kLossAtol, kLossRtol, "row_lse of bf16 logits");
  std::vector<float> from_bf16;
  for (const __nv_bfloat16& d : gbf16.download()) from_bf16.push_back(__bfloat162float(d));
  expect_close_to_reference(from_bf16, grad_of_rounded, kGradRel * scale, 1.0 / 256, "dlogits in bf16");
}

}  // namespace

TEST(xent_cuda, forward_and_chunked_gradient_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (int V : {37, 50257})
    for (int rows : {1, 37, 256})
      for (float smoothing : {0.f, 0.1f}) check_xent(rows, V, smoothing, rows > 1 ? 1 : 0);
}

TEST(xent_cuda, ignored_rows_and_custom_ignore_index) {
  MUSE_REQUIRE_GPU();
  check_xent(37, 37, 0.1f, 2);            // every row ignored: mean 0, count 0, no gradient
  check_xent(1, 50257, 0.f, 2);           // the single row ignored
  check_xent(37, 37, 0.1f, 1, 3);         // ignore index inside the vocabulary
  check_xent(37, 50257, 0.f, 1, 50256);   // ignore index = the last real column
}

// A target outside [0, V) that is not the ignore index: its row's loss and lse are NaN, so the mean is (the
// trainer's non-finite check stops the run), its gradient row is NaN, and the other rows are untouched.
TEST(xent_cuda, invalid_target_turns_its_row_and_the_mean_nan) {
  MUSE_REQUIRE_GPU();
  const int rows = 37, V = 50257, Vp = padded_vocab(V), bad = 3;
  Rng rng(5);
  std::vector<float> logits(size_t(rows) * Vp, 0.f);
  for (float& z : logits) z = float(rng.normal());
  std::vector<int32_t> targets(rows);
  for (int32_t& t : targets) t = int32_t(rng.below(V));
  targets[bad] = V + 5;
  DeviceBuffer<float> glogits(logits), gloss{size_t(rows)}, glse{size_t(rows)}, gresult{size_t(2)};
  DeviceBuffer<int32_t> gtargets(targets);
  cuda::xent_count(gresult.get(), gtargets.get(), rows);
  cuda::xent_rows(gloss.get(), glse.get(), glogits.get(), gtargets.get(), rows, V, Vp, 0.1f, gresult.get());
  cuda::xent_mean(gresult.get(), gloss.get(), gtargets.get(), rows);
  const std::vector<float> loss = gloss.download(), lse = glse.download(), result = gresult.download();
  const std::vector<float> dlogits = glogits.download();
  EXPECT_TRUE(std::isnan(loss[bad]) && std::isnan(lse[bad]));
  EXPECT_TRUE(std::isnan(result[0])) << "mean";
  EXPECT_EQ(result[1], float(rows)) << "count";
  for (int v = 0; v < V; ++v) ASSERT_TRUE(std::isnan(dlogits[size_t(bad) * Vp + v])) << "column " << v;
  for (int r = 0; r < rows; ++r)
    if (r != bad) {
      EXPECT_TRUE(std::isfinite(loss[r])) << "row " << r;
      EXPECT_TRUE(std::isfinite(dlogits[size_t(r) * Vp])) << "row " << r;
    }
}

}  // namespace muse::test
