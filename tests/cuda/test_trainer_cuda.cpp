// The training loop on the GPU (train/trainer.h with device = cuda): the same losses as the CPU run from the
// same seed (within 2e-3 nats over six steps: fp32 on both sides, summation order differs), a bit-exact
// resume from a checkpoint written from device state, and checkpoints that the CPU model loads.
#include <gtest/gtest.h>

#include <cmath>

#include "cuda/gpu_support.h"
#include "support/train_fixture.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace muse::test {
namespace {

TEST(train_cuda, matches_cpu_and_resumes_bit_exactly) {
  MUSE_REQUIRE_GPU();
  TempDir dir("train_cuda");
  prepare_small_corpus(dir);
  std::vector<std::string> cpu_log, gpu_log, resumed_log;
  TrainOptions cpu_run = tiny_run(dir, "cpu");
  cpu_run.device = "cpu";
  train(cpu_run, [&](const std::string& l) { cpu_log.push_back(l); });
  TrainOptions gpu_run = tiny_run(dir, "gpu");
  gpu_run.device = "cuda";
  gpu_run.gpu_math = "fp32";
  train(gpu_run, [&](const std::string& l) { gpu_log.push_back(l); });
  const std::vector<double> cpu = losses_of(cpu_log), gpu = losses_of(gpu_log);
  ASSERT_EQ(gpu.size(), 6u);
  for (size_t i = 0; i < gpu.size(); ++i) EXPECT_NEAR(gpu[i], cpu[i], 2e-3) << "step " << i + 1;

  // Resume the GPU run from its step-3 checkpoint: the last three losses repeat bit for bit.
  fs::create_directories(dir.path / "crashed" / "checkpoints");
  fs::copy(dir.path / "gpu" / "checkpoints" / "step-00000003", dir.path / "crashed" / "checkpoints" / "step-00000003",
           fs::copy_options::recursive);
  std::ofstream(dir.str("crashed/latest")) << "checkpoints/step-00000003\n";
  TrainOptions resume = tiny_run(dir, "crashed");
  resume.device = "cuda";
  resume.gpu_math = "fp32";
  resume.resume = true;
  train(resume, [&](const std::string& l) { resumed_log.push_back(l); });
  const std::vector<double> resumed = losses_of(resumed_log);
  ASSERT_EQ(resumed.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(resumed[i], gpu[3 + i]) << "step " << 4 + i;

  // The final checkpoint holds the device's weights: the CPU model loads them and they are finite.
  const LoadedModel m = load_model(dir.str("gpu"));
  for (float p : m.model.params()) ASSERT_TRUE(std::isfinite(p));
}

TEST(train_cuda, auxiliary_losses_need_the_cpu) {
  MUSE_REQUIRE_GPU();
  TempDir dir("train_cuda_aux");
  prepare_small_corpus(dir);
  TrainOptions o = tiny_run(dir, "run");
  o.device = "cuda";
  o.topology_weight = 0.1;
  try {
    train(o, [](const std::string&) {});
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("--device cpu"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace muse::test
