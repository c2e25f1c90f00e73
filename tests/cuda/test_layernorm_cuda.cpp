#include "ops/layernorm.cuh"

#include "cuda/gpu_support.h"
#include "ops/layernorm.h"
#include "support/test_util.h"

namespace muse::test {

// fp32 on both sides; differences come from summation order only. Tolerance: 1e-5 absolute plus 1e-4
// relative (rows up to D = 1031 of O(1) values).
constexpr double kAtol = 1e-5, kRtol = 1e-4;

void check_shape(int rows, int D) {
  SCOPED_TRACE("rows " + std::to_string(rows) + ", D " + std::to_string(D));
  Rng rng(rows * 131 + D);
  auto x = random_normal<float>(size_t(rows) * D, rng, 1.5, 0.2);
  auto gain = random_normal<float>(D, rng, 0.2, 1.0), bias = random_normal<float>(D, rng, 0.2);
  auto dy = random_normal<float>(x.size(), rng), dradius = random_normal<float>(rows, rng);

  std::vector<float> y(x.size()), mean(rows), rstd(rows), radius(rows);
  layernorm_forward(y.data(), mean.data(), rstd.data(), radius.data(), x.data(), gain.data(), bias.data(), rows, D);
  std::vector<float> dx(x.size(), 0.25f), dgain(D, 0.5f), dbias(D, -0.5f);  // non-zero: checks accumulation
  std::vector<float> dx_gpu_init = dx, dgain_gpu_init = dgain, dbias_gpu_init = dbias;
  layernorm_backward(dx.data(), dgain.data(), dbias.data(), dy.data(), dradius.data(), x.data(), gain.data(),
                     mean.data(), rstd.data(), rows, D);

  DeviceBuffer<float> gx(x), ggain(gain), gbias(bias), gy(x.size()), gmean(rows), grstd(rows), gradius(rows);
  cuda::layernorm_forward(gy.get(), gmean.get(), grstd.get(), gradius.get(), gx.get(), ggain.get(), gbias.get(),
                          rows, D);
  expect_close_to_reference(gy.download(), y, kAtol, kRtol, "y");
  expect_close_to_reference(gmean.download(), mean, kAtol, kRtol, "mean");
  expect_close_to_reference(grstd.download(), rstd, kAtol, kRtol, "rstd");
  expect_close_to_reference(gradius.download(), radius, kAtol, kRtol, "radius");

  DeviceBuffer<float> gdy(dy), gdradius(dradius), gdx(dx_gpu_init), gdgain(dgain_gpu_init), gdbias(dbias_gpu_init);
  cuda::layernorm_backward(gdx.get(), gdgain.get(), gdbias.get(), gdy.get(), gdradius.get(), gx.get(), ggain.get(),
                           gmean.get(), grstd.get(), rows, D);
  expect_close_to_reference(gdx.download(), dx, kAtol, kRtol, "dx");
  // Column sums over up to 300 rows: tolerance scaled by the row count.
  expect_close_to_reference(gdgain.download(), dgain, kAtol * rows, kRtol, "dgain");
  expect_close_to_reference(gdbias.download(), dbias, kAtol * rows, kRtol, "dbias");
}

TEST(layernorm_cuda, forward_and_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (auto [rows, D] : {std::pair{1, 1}, std::pair{7, 33}, std::pair{64, 512}, std::pair{300, 1031}}) check_shape(rows, D);
}

}  // namespace muse::test
