// The whole model on the GPU against the CPU model (model/model.h) from the same parameters: logits, loss
// and every parameter tensor's gradient, for Phase 7, Phase 8 (with each ablation) and the gpt baseline;
// then 20 training steps of `tiny` on each device from the same initialisation, with matching losses.
//
// Tolerances: both sides run fp32 (cuBLASLt without TF32), so differences are summation-order rounding,
// grown through the layers: logits within 2e-4 + 1e-3·|x|, the loss within 1e-4 nats, each gradient tensor
// within an L2 error of 2e-3 of its norm (plus 1e-5 of the whole gradient's), and the 20-step losses within
// 2e-3 nats (SPEC §6 allows 0.02); with TF32 GEMMs, the 20-step losses within SPEC's 0.02 nats.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <ostream>
#include <string>
#include <vector>

#include "common/rng.h"
#include "cuda/gpu_support.h"
#include "model/config.h"
#include "model/cuda_model.h"
#include "model/model.h"
#include "support/test_util.h"
#include "train/optimizer.cuh"
#include "train/optimizer.h"

namespace muse::test {
namespace {

struct Variant {
  std::string name;
  std::vector<std::string> overrides;  // on top of the tiny preset
};

// gtest prints a parameter with this (otherwise it dumps the struct's bytes).
void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

ModelConfig variant_config(const Variant& v) {
  ModelConfig c = find_preset("tiny").model;
  c.vocab_size = 301;  // pads to 384: padded columns must stay out of the loss
  for (const std::string& o : v.overrides) apply_override(c, o);
  validate(c);
  return c;
}

double l2(const float* x, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += double(x[i]) * x[i];
  return std::sqrt(s);
}

double l2_difference(const float* a, const float* b, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return std::sqrt(s);
}

// The tiny preset on the GPU from a CPU model's initialisation (init_seed), with 2×32 random ids and targets.
struct TinyOnGpu {
  TinyOnGpu(uint64_t init_seed, uint64_t data_seed) : config(variant_config({"tiny", {}})), gpu(config) {
    Model<float> cpu(config);
    cpu.init(init_seed);
    gpu.upload_params(cpu.params().data());
    Rng rng(data_seed);
    ids = random_ids(64, config.vocab_size, rng);
    targets = random_ids(64, config.vocab_size, rng);
  }
  ModelConfig config;
  cuda::Model gpu;
  std::vector<int32_t> ids, targets;
};

const std::vector<Variant>& variants() {
  static const std::vector<Variant> v = {
      {"phase8_tiny", {}},
      {"phase8_dense_embedding_no_linear", {"embedding=dense", "linear_attn=false"}},
      {"phase8_ablations", {"key_gate=false", "rank_mask=false", "curvature_mix=false", "bk_hopping=false"}},
      {"phase8_block_learned", {"attn_mode=block", "pos_embedding=learned", "max_seq=64"}},
      {"phase7", {"arch=phase7", "attn_mode=block", "ffn=none", "pos_embedding=learned", "max_seq=64"}},
      {"gpt", {"arch=gpt", "ffn=dense", "embedding=dense"}},
      // D² = 1,296 floats is no multiple of the parameter table's 64-float alignment: w_q, w_k, w_v are not
      // one [3D, D] block (the bf16 q/k/v backward's three-GEMM case).
      {"phase8_width_36", {"d_model=36", "n_heads=3"}},
  };
  return v;
}

class CudaModelTest : public ::testing::TestWithParam<Variant> {};

// One forward, loss and backward of `c` at B = 3, N = 37 on each device from the same parameters, the GPU's
// GEMMs in `math`: logits within abs + rel·|x|, the loss within loss_tol nats, and each parameter tensor's
// gradient within an L2 error of grad_rel of its norm (plus grad_floor of the whole gradient's).
struct Tolerances {
  double logits_abs, logits_rel, loss, grad_rel, grad_floor;
};
void expect_gradients_match_cpu(const ModelConfig& c, const std::string& name, cuda::GemmMath math,
                                const Tolerances& tol) {
  const int B = 3, N = 37;  // odd, and longer than the window (16)
  Model<float> cpu(c);
  cpu.init(7);
  cuda::Model gpu(c);
  gpu.set_gemm_math(math);
  gpu.upload_params(cpu.params().data());
  gpu.set_head_chunk_rows(40);  // the head in chunks of 40, 40 and 31 rows

  Rng rng(11);
  const std::vector<int32_t> ids = random_ids(size_t(B) * N, c.vocab_size, rng);
  std::vector<int32_t> targets = random_ids(size_t(B) * N, c.vocab_size, rng);
  targets[5] = targets[40] = -1;  // ignored targets

  cpu.forward(ids.data(), B, N);
  gpu.forward(ids.data(), B, N);
  const size_t logit_count = size_t(B) * N * c.padded_vocab();
  std::vector<float> gpu_logits(logit_count);
  // The model works on its own non-blocking stream, which cudaMemcpy (default stream) does not wait for.
  MUSE_CUDA_CHECK(cudaStreamSynchronize(gpu.stream()));
  MUSE_CUDA_CHECK(cudaMemcpy(gpu_logits.data(), gpu.logits(), logit_count * sizeof(float), cudaMemcpyDeviceToHost));
  expect_close_to_reference(gpu_logits, std::vector<float>(cpu.logits(), cpu.logits() + logit_count),
                            tol.logits_abs, tol.logits_rel, name + " logits");

  const double cpu_loss = cpu.loss(targets.data());
  gpu.loss(targets.data(), 0.0, 1.0, /*with_gradient=*/true);
  const double gpu_loss = gpu.take_loss_sum();
  EXPECT_NEAR(gpu_loss, cpu_loss, tol.loss) << name;

  // A scale other than 1 (what gradient accumulation passes) reaches the head's share of the gradient too.
  cpu.zero_grads();
  cpu.backward(0.5);
  gpu.zero_grads();
  gpu.backward(0.5);
  std::vector<float> gpu_grads(gpu.size());
  gpu.download_grads(gpu_grads.data());
  const double all = l2(cpu.grads().data(), cpu.grads().size());
  for (const ParamInfo& p : cpu.table().entries()) {
    const double ref = l2(cpu.grads().data() + p.offset, p.size);
    const double err = l2_difference(gpu_grads.data() + p.offset, cpu.grads().data() + p.offset, p.size);
    EXPECT_LE(err, tol.grad_rel * ref + tol.grad_floor * all)
        << name << ": gradient of " << p.name << " (‖cpu‖ " << ref << ", ‖all‖ " << all << ")";
  }
}

// fp32: per tensor ‖Δ‖ ≤ 2e-3·‖g_cpu‖ + 1e-5·‖g_all‖. The floor covers gradients that are zero up to
// rounding: the key-gate bias's is Σ ∂L/∂log μ·(1 − μ), and Σ ∂L/∂log μ vanishes exactly (softmax is
// invariant to a bias shared by all keys), so with μ nearly constant at initialisation only cancellation
// noise is left.
TEST_P(CudaModelTest, forward_loss_and_gradients_match_cpu) {
  MUSE_REQUIRE_GPU();
  expect_gradients_match_cpu(variant_config(GetParam()), GetParam().name, cuda::GemmMath::fp32,
                             {2e-4, 1e-3, 1e-4, 2e-3, 1e-5});
}

// bf16 math: the training head and the layers' large GEMMs multiply bf16 copies of their operands (8-bit
// mantissas, fp32 accumulation), the rest of the model stays fp32.
TEST_P(CudaModelTest, forward_loss_and_gradients_in_bf16_match_cpu) {
  MUSE_REQUIRE_GPU();
  expect_gradients_match_cpu(variant_config(GetParam()), GetParam().name, cuda::GemmMath::bf16,
                             {2e-2, 2e-2, 1e-2, 5e-2, 1e-3});
}

INSTANTIATE_TEST_SUITE_P(model_cuda, CudaModelTest, ::testing::ValuesIn(variants()),
                         [](const auto& info) { return info.param.name; });

// An evaluation's loss (no head gradient) is the training loss's, bit for bit, and backward() refuses to run
// after it, naming what it needs.
TEST(model_cuda, backward_needs_a_loss_with_gradient) {
  MUSE_REQUIRE_GPU();
  TinyOnGpu tiny(5, 4);
  cuda::Model& gpu = tiny.gpu;
  const std::vector<int32_t>& targets = tiny.targets;
  gpu.forward(tiny.ids.data(), 2, 32);
  gpu.loss(targets.data());
  double evaluated = 0, trained = 0;
  gpu.read_loss(&evaluated, nullptr);
  EXPECT_THROW(gpu.backward(), std::logic_error);
  gpu.loss(targets.data(), 0.0, 0.0, /*with_gradient=*/true);
  gpu.read_loss(&trained, nullptr);
  EXPECT_EQ(evaluated, trained);
  EXPECT_NO_THROW(gpu.backward());
  EXPECT_THROW(gpu.backward(), std::logic_error) << "one backward per loss";
}

// 20 optimizer steps (forward, loss, backward, clip, AdamW) on each device from the same initialisation:
// within `tolerance` nats at every step, with the GPU's GEMMs in `math`.
void expect_twenty_steps_match_cpu(cuda::GemmMath math, double tolerance) {
  const ModelConfig c = variant_config({"tiny", {}});
  const int B = 4, N = 32, steps = 20;
  const double lr = 3e-3, clip = 1.0;
  Model<float> cpu(c);
  cpu.init(3);
  cuda::Model gpu(c);
  gpu.set_gemm_math(math);
  gpu.upload_params(cpu.params().data());
  AdamW cpu_adam(cpu.table(), AdamWConfig{});
  cuda::AdamW gpu_adam(gpu.table(), AdamWConfig{});
  DeviceBuffer<double> norm(1), partials(cuda::kGradNormBlocks);

  // A learnable stream: each token is a fixed function of the previous one, so the loss falls.
  Rng rng(5);
  std::vector<double> cpu_losses, gpu_losses;
  for (int step = 0; step < steps; ++step) {
    std::vector<int32_t> seq(size_t(B) * (N + 1));
    for (int b = 0; b < B; ++b) {
      seq[size_t(b) * (N + 1)] = int32_t(rng.below(c.vocab_size));
      for (int t = 1; t <= N; ++t)
        seq[size_t(b) * (N + 1) + t] = (seq[size_t(b) * (N + 1) + t - 1] * 7 + 3) % c.vocab_size;
    }
    std::vector<int32_t> ids(size_t(B) * N), targets(size_t(B) * N);
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < N; ++t) {
        ids[size_t(b) * N + t] = seq[size_t(b) * (N + 1) + t];
        targets[size_t(b) * N + t] = seq[size_t(b) * (N + 1) + t + 1];
      }

    cpu.zero_grads();
    cpu.forward(ids.data(), B, N);
    cpu_losses.push_back(cpu.loss(targets.data()));
    cpu.backward(1.0);
    clip_grad_norm(cpu.grads().data(), cpu.grads().size(), clip);
    cpu_adam.step(cpu.params().data(), cpu.grads().data(), lr);

    gpu.zero_grads();
    gpu.forward(ids.data(), B, N);
    gpu.loss(targets.data(), 0.0, 1.0, /*with_gradient=*/true);
    gpu.backward(1.0);
    cuda::grad_norm(norm.get(), gpu.grads(), gpu.size(), partials.get(), gpu.stream());
    gpu_adam.step(gpu.params(), gpu.grads(), lr, gpu.stream(), norm.get(), clip);
    gpu_losses.push_back(gpu.take_loss_sum());
  }
  for (int step = 0; step < steps; ++step)
    EXPECT_NEAR(gpu_losses[step], cpu_losses[step], tolerance) << "step " << step;
  EXPECT_LT(cpu_losses.back(), cpu_losses.front() - 0.1) << "the run should learn something";
}

TEST(model_cuda, twenty_training_steps_match_cpu) {
  MUSE_REQUIRE_GPU();
  expect_twenty_steps_match_cpu(cuda::GemmMath::fp32, 2e-3);
}

// The fast mode (TF32 tensor-core GEMMs) within SPEC §6's per-step tolerance.
TEST(model_cuda, twenty_training_steps_in_tf32_match_cpu) {
  MUSE_REQUIRE_GPU();
  expect_twenty_steps_match_cpu(cuda::GemmMath::tf32, 0.02);
}

// bf16 tensor cores (inputs rounded to 8-bit mantissas, 2^-9 relative, where TF32 rounds to 2^-12; fp32
// accumulation; the head's GEMMs on bf16 copies of x and E and on bf16 dlogits). The rounding compounds over
// 20 AdamW steps at the tiny preset's learning rate: 0.039 nats at most on the H200 (step 14 of 20), so
// 0.06 nats per step here, three times SPEC §6's example tolerance; fp32 math is the exact comparison.
TEST(model_cuda, twenty_training_steps_in_bf16_match_cpu) {
  MUSE_REQUIRE_GPU();
  expect_twenty_steps_match_cpu(cuda::GemmMath::bf16, 0.06);
}


// Garbage in: a token id outside the vocabulary is refused on the host, naming the id and position.
TEST(model_cuda, refuses_out_of_range_ids) {
  MUSE_REQUIRE_GPU();
  cuda::Model gpu(variant_config({"tiny", {}}));
  std::vector<int32_t> ids(8, 1);
  ids[3] = 301;
  try {
    gpu.forward(ids.data(), 1, 8);
    FAIL() << "expected an exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("token id 301 at position 3"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace muse::test

namespace muse::test {
namespace {

// The per-group profile (muse bench --profile) names the groups that ran, with positive times, and the
// forward's result does not change when it is on.
TEST(model_cuda, profile_names_every_group_and_leaves_results_alone) {
  MUSE_REQUIRE_GPU();
  TinyOnGpu tiny(1, 3);
  cuda::Model& gpu = tiny.gpu;
  const std::vector<int32_t>& ids = tiny.ids;
  const std::vector<int32_t>& targets = tiny.targets;
  gpu.forward(ids.data(), 2, 32);
  gpu.loss(targets.data());
  double plain = 0, profiled = 0;
  gpu.read_loss(&plain, nullptr);

  gpu.set_profiling(true);
  gpu.forward(ids.data(), 2, 32);
  gpu.loss(targets.data(), 0.0, 0.0, /*with_gradient=*/true);
  gpu.backward();
  gpu.read_loss(&profiled, nullptr);
  const auto groups = gpu.profile();
  EXPECT_EQ(profiled, plain);
  std::vector<std::string> names;
  for (const auto& [name, ms] : groups) {
    names.push_back(name);
    EXPECT_GT(ms, 0) << name;
  }
  for (const char* expected : {"fwd htt materialise", "fwd bk core", "fwd local attention", "fwd linear attention",
                               "fwd ssm", "fwd head gemm", "bwd head gemm", "bwd ssm", "bwd local attention"})
    EXPECT_NE(std::find(names.begin(), names.end(), expected), names.end()) << expected;
}

}  // namespace
}  // namespace muse::test

namespace muse::test {
namespace {

// An inference-only model shares one layer's buffers between the blocks and alternates the residual
// stream between two buffers: its logits are bit-identical to the training arena's, in less memory.
TEST(model_cuda, inference_only_arena_gives_the_same_logits_in_less_memory) {
  MUSE_REQUIRE_GPU();
  for (const Variant& v : {Variant{"phase8", {"n_layers=3"}}, Variant{"gpt", {"arch=gpt", "ffn=dense", "n_layers=3"}}}) {
    const ModelConfig c = variant_config(v);
    Model<float> cpu(c);
    cpu.init(5);
    cuda::Model train(c), infer(c);
    infer.set_inference_only(true);
    train.upload_params(cpu.params().data());
    infer.upload_params(cpu.params().data());
    Rng rng(9);
    const int B = 2, N = 40;
    const std::vector<int32_t> ids = random_ids(size_t(B) * N, c.vocab_size, rng);
    train.forward(ids.data(), B, N);
    infer.forward(ids.data(), B, N);
    const size_t n = size_t(B) * N * c.padded_vocab();
    std::vector<float> a(n), b(n);
    MUSE_CUDA_CHECK(cudaStreamSynchronize(train.stream()));
    MUSE_CUDA_CHECK(cudaStreamSynchronize(infer.stream()));
    MUSE_CUDA_CHECK(cudaMemcpy(a.data(), train.logits(), n * sizeof(float), cudaMemcpyDeviceToHost));
    MUSE_CUDA_CHECK(cudaMemcpy(b.data(), infer.logits(), n * sizeof(float), cudaMemcpyDeviceToHost));
    EXPECT_EQ(a, b) << v.name;
    EXPECT_LT(infer.device_bytes(), train.device_bytes()) << v.name;
    EXPECT_THROW(infer.backward(), std::logic_error) << v.name;
  }
}

// Serving writes bf16 logits from a kept bf16 copy of E with fp32 accumulation: within bf16 rounding of the
// fp32 logits (inputs rounded to 8-bit mantissas: ~0.4 % per product, and the output once more), for the
// HTT and the dense embedding; refreshed by upload_params; logits()/loss() refuse.
TEST(model_cuda, serving_writes_bf16_logits_close_to_the_fp32_ones) {
  MUSE_REQUIRE_GPU();
  for (const Variant& v : {Variant{"htt", {"n_layers=2"}}, Variant{"dense", {"embedding=dense", "n_layers=2"}}}) {
    const ModelConfig c = variant_config(v);
    Model<float> cpu(c);
    cpu.init(5);
    cuda::Model reference(c), serving(c);
    reference.set_inference_only(true);
    serving.set_inference_only(true);
    EXPECT_THROW(cuda::Model(c).prepare_serving(), std::logic_error) << v.name;
    reference.upload_params(cpu.params().data());
    serving.upload_params(cpu.params().data());
    serving.prepare_serving();
    Rng rng(9);
    const int B = 2, N = 40;
    const std::vector<int32_t> ids = random_ids(size_t(B) * N, c.vocab_size, rng);
    const size_t n = size_t(B) * N * c.padded_vocab();
    auto compare = [&](const std::string& what) {
      reference.forward(ids.data(), B, N);
      serving.forward(ids.data(), B, N);
      std::vector<float> fp32(n);
      std::vector<__nv_bfloat16> bf16(n);
      MUSE_CUDA_CHECK(cudaStreamSynchronize(reference.stream()));
      MUSE_CUDA_CHECK(cudaStreamSynchronize(serving.stream()));
      MUSE_CUDA_CHECK(cudaMemcpy(fp32.data(), reference.logits(), n * sizeof(float), cudaMemcpyDeviceToHost));
      MUSE_CUDA_CHECK(cudaMemcpy(bf16.data(), serving.logits_bf16(), n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
      double scale = 0;
      for (float x : fp32) scale = std::max(scale, double(std::abs(x)));
      ASSERT_GT(scale, 0) << what;
      std::vector<float> widened(n);
      for (size_t i = 0; i < n; ++i) widened[i] = __bfloat162float(bf16[i]);
      expect_close_to_reference(widened, fp32, 1e-2 * scale, 1e-2, what);
    };
    compare(v.name);
    // New parameters reach the kept E through upload_params.
    cpu.init(6);
    reference.upload_params(cpu.params().data());
    serving.upload_params(cpu.params().data());
    compare(v.name + " after upload_params");
    EXPECT_THROW(serving.logits(), std::logic_error) << v.name;
    const std::vector<int32_t> targets(size_t(B) * N, 1);
    EXPECT_THROW(serving.loss(targets.data()), std::logic_error) << v.name;
  }
}

// Captured passes replay exactly what the host would launch: logits and gradients bit-identical to a model
// that runs every kernel itself, over repeated steps (the first run of a shape is eager, the second is
// captured, later ones replay) and across a change of shape (the arena is re-planned, the graphs dropped).
TEST(model_cuda, graphs_replay_the_eager_passes_bit_exactly) {
  MUSE_REQUIRE_GPU();
  const ModelConfig c = variant_config(Variant{"phase8", {"n_layers=2"}});
  Model<float> cpu(c);
  cpu.init(3);
  cuda::Model graphed(c), eager(c);
  eager.set_graphs(false);
  graphed.upload_params(cpu.params().data());
  eager.upload_params(cpu.params().data());
  Rng rng(4);
  for (const auto& [B, N] : std::vector<std::pair<int, int>>{{2, 24}, {2, 24}, {2, 24}, {3, 17}, {3, 17}, {3, 17}}) {
    const std::vector<int32_t> ids = random_ids(size_t(B) * N, c.vocab_size, rng);
    const std::vector<int32_t> targets = random_ids(size_t(B) * N, c.vocab_size, rng);
    std::vector<std::vector<float>> logits, grads;
    for (cuda::Model* m : {&graphed, &eager}) {
      m->zero_grads();
      m->forward(ids.data(), B, N);
      const size_t n = size_t(B) * N * c.padded_vocab();
      logits.emplace_back(n);
      MUSE_CUDA_CHECK(cudaStreamSynchronize(m->stream()));
      MUSE_CUDA_CHECK(cudaMemcpy(logits.back().data(), m->logits(), n * sizeof(float), cudaMemcpyDeviceToHost));
      m->loss(targets.data(), 0.1, 0.0, /*with_gradient=*/true);
      m->backward(0.5);
      grads.emplace_back(m->size());
      m->download_grads(grads.back().data());
    }
    EXPECT_EQ(logits[0], logits[1]) << "B=" << B << " N=" << N;
    EXPECT_EQ(grads[0], grads[1]) << "B=" << B << " N=" << N;
  }
}

}  // namespace
}  // namespace muse::test
