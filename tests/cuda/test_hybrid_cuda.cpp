#include "ops/hybrid.cuh"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/math.h"
#include "cuda/gpu_support.h"
#include "ops/hybrid.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

constexpr double kRtol = 1e-5;

void expect_accumulated(const std::vector<float>& gpu, const std::vector<float>& start,
                        const std::vector<float>& increment, double atol, const std::string& what) {
  muse::test::expect_accumulated(gpu, start, increment, atol, kRtol, what);
}


// Tolerances. Elementwise outputs (a handful of roundings, σ/tanh within 2 ulp of the host's): 1e-6 of the
// tensor's scale. Scalar reductions (dc, ds): 1e-5·Σ|terms| (fp32 summation error is at most rows·ε of that
// sum in the worst case, ~√rows·ε typically; no cancellation can hide behind a bound on the magnitudes).

void check_curvature_mix(int rows, int width, float c) {
  SCOPED_TRACE("curvature mix rows " + std::to_string(rows) + ", width " + std::to_string(width) + ", c " +
               std::to_string(c));
  Rng rng(rows * 17 + width + int(c * 100));
  const long n = long(rows) * width;
  const auto y_loc = random_normal<float>(n, rng), y_lin = random_normal<float>(n, rng, 2.0),
             dy_att = random_normal<float>(n, rng);
  std::vector<float> y_att(n), dy_loc(n, 0.f), dy_lin(n, 0.f), dc(1, 0.f);
  curvature_mix_forward<float>(y_att.data(), y_loc.data(), y_lin.data(), c, rows, width);
  curvature_mix_backward<float>(dy_loc.data(), dy_lin.data(), dc.data(), dy_att.data(), y_loc.data(), y_lin.data(), c,
                                rows, width);
  const double alpha = curvature_mix_alpha(double(c));
  double S = 0;
  for (long i = 0; i < n; ++i) S += std::abs(dy_att[i] * (y_loc[i] - y_lin[i]));
  S *= kCurvatureMixSlope * alpha * (1 - alpha);

  DeviceBuffer<float> gc(std::vector<float>{c}), gloc(y_loc), glin(y_lin), gatt(nans(n)), gdatt(dy_att);
  cuda::curvature_mix_forward(gatt.get(), gloc.get(), glin.get(), gc.get(), rows, width);
  expect_close_to_reference(gatt.download(), y_att, 1e-6 * max_abs(y_att), kRtol, "y_att");
  // The bf16 output (the output projection's operand in bf16 math): the same values rounded, to within one
  // bf16 step of the CPU's.
  DeviceBuffer<__nv_bfloat16> gatt_bf16(n);
  cuda::curvature_mix_forward(gatt_bf16.get(), gloc.get(), glin.get(), gc.get(), rows, width);
  std::vector<float> widened(n);
  const std::vector<__nv_bfloat16> rounded = gatt_bf16.download();
  for (long i = 0; i < n; ++i) widened[i] = __bfloat162float(rounded[i]);
  expect_close_to_reference(widened, y_att, 1e-6 * max_abs(y_att), 1.0 / 256, "y_att in bf16");
  const auto dloc0 = accumulation_start(dy_loc), dlin0 = accumulation_start(dy_lin), dc0 = accumulation_start(dc);
  DeviceBuffer<float> gdloc(dloc0), gdlin(dlin0), gdc(dc0);
  DeviceBuffer<float> workspace(nans(cuda::curvature_mix_backward_workspace_floats(rows, width)));
  cuda::curvature_mix_backward(gdloc.get(), gdlin.get(), gdc.get(), gdatt.get(), gloc.get(), glin.get(), gc.get(),
                               rows, width, workspace.get());
  expect_accumulated(gdloc.download(), dloc0, dy_loc, 1e-6 * max_abs(dy_loc), "dy_loc");
  expect_accumulated(gdlin.download(), dlin0, dy_lin, 1e-6 * max_abs(dy_lin), "dy_lin");
  expect_accumulated(gdc.download(), dc0, dc, 1e-5 * S, "dc");
  // accumulate = false writes dy_loc, dy_lin over whatever was there (NaN here).
  DeviceBuffer<float> wdloc(nans(n)), wdlin(nans(n));
  cuda::curvature_mix_backward(wdloc.get(), wdlin.get(), nullptr, gdatt.get(), gloc.get(), glin.get(), gc.get(), rows,
                               width, nullptr, 0, /*accumulate=*/false);
  expect_close_to_reference(wdloc.download(), dy_loc, 1e-6 * max_abs(dy_loc), kRtol, "dy_loc written");
  expect_close_to_reference(wdlin.download(), dy_lin, 1e-6 * max_abs(dy_lin), kRtol, "dy_lin written");
}

void check_phase7_gate(int rows) {
  SCOPED_TRACE("phase 7 gate rows " + std::to_string(rows));
  Rng rng(rows * 3 + 1);
  // Both signs of Im g (the model only has Im g > 0, the op defines both).
  const auto g = random_normal<float>(2L * rows, rng, 3.0), dxi = random_normal<float>(rows, rng);
  const float s = 1.3f;
  std::vector<float> xi(rows), dg(2L * rows, 0.f), ds(1, 0.f);
  phase7_gate_forward<float>(xi.data(), g.data(), s, rows);
  phase7_gate_backward<float>(dg.data(), ds.data(), dxi.data(), xi.data(), g.data(), s, rows);
  double S = 0;
  for (int r = 0; r < rows; ++r) S += std::abs(dxi[r] * xi[r] * (1 - xi[r]) * g[2L * r + 1]);

  DeviceBuffer<float> gs(std::vector<float>{s}), gg(g), gxi(nans(rows)), gdxi(dxi);
  cuda::phase7_gate_forward(gxi.get(), gg.get(), gs.get(), rows);
  expect_close_to_reference(gxi.download(), xi, 1e-6, kRtol, "xi");
  const auto dg0 = accumulation_start(dg), ds0 = accumulation_start(ds);
  DeviceBuffer<float> sxi(xi), gdg(dg0), gds(ds0), workspace(nans(cuda::phase7_gate_backward_workspace_floats(rows)));
  cuda::phase7_gate_backward(gdg.get(), gds.get(), gdxi.get(), sxi.get(), gg.get(), gs.get(), rows, workspace.get());
  expect_accumulated(gdg.download(), dg0, dg, 1e-6 * max_abs(dg), "dg");
  expect_accumulated(gds.download(), ds0, ds, 1e-5 * S, "ds");
}

struct ResidualCase {
  int rows, D;
  bool in_place;      // h_out == h
  bool all_grads;     // otherwise dh, dgain and dxi are null
};

void check_residual_mix(const ResidualCase& c) {
  SCOPED_TRACE("residual mix rows " + std::to_string(c.rows) + ", D " + std::to_string(c.D) +
               (c.in_place ? ", in place" : "") + (c.all_grads ? "" : ", some grads null"));
  const int rows = c.rows, D = c.D;
  const long n = long(rows) * D;
  Rng rng(rows * 7 + D);
  // Branch outputs up to ~40 so cap30 bends; ξ anywhere in (0, 1).
  const auto h = random_normal<float>(n, rng), y_att = random_normal<float>(n, rng, 12.0),
             y_glob = random_normal<float>(n, rng, 8.0), xi = random_uniform<float>(rows, rng, 0.0, 1.0),
             gain = random_normal<float>(D, rng, 0.2, 1.0), bias = random_normal<float>(D, rng, 0.2),
             dh_out = random_normal<float>(n, rng);
  std::vector<float> h_out(n), capped(n), mean(rows), rstd(rows);
  residual_mix_forward<float>(h_out.data(), {capped.data(), mean.data(), rstd.data()}, h.data(), y_att.data(),
                              y_glob.data(), xi.data(), gain.data(), bias.data(), rows, D);
  std::vector<float> dh(n, 0.f), dy_att(n, 0.f), dy_glob(n, 0.f), dxi(rows, 0.f), dgain(D, 0.f), dbias(D, 0.f);
  residual_mix_backward<float>(dh.data(), dy_att.data(), dy_glob.data(), dxi.data(), dgain.data(), dbias.data(),
                               dh_out.data(), {capped.data(), mean.data(), rstd.data()}, y_att.data(), y_glob.data(),
                               xi.data(), gain.data(), rows, D);

  // Forward: cap30 then a LayerNorm of the row (mean and variance sums over D in a different order, tanh
  // within 2 ulp): 1e-5 of each tensor's scale. Backward: the LayerNorm backward's two row sums, then
  // elementwise: 1e-5 of the scale; dxi is a row sum over D (1e-5 of its scale); dgain, dbias are column sums
  // over rows: 1e-5·max_d Σ_rows |dh_out·x̂| (resp. |dh_out|).
  constexpr double kTol = 1e-5;
  double S_gain = 0, S_bias = 0;
  for (int d = 0; d < D; ++d) {
    double sg = 0, sb = 0;
    for (int r = 0; r < rows; ++r) {
      const long i = long(r) * D + d;
      sg += std::abs(dh_out[i] * (capped[i] - mean[r]) * rstd[r]);
      sb += std::abs(dh_out[i]);
    }
    S_gain = std::max(S_gain, sg);
    S_bias = std::max(S_bias, sb);
  }

  DeviceBuffer<float> gh(h), gatt(y_att), gglob(y_glob), gxi(xi), ggain(gain), gbias(bias), gout(nans(n)),
      gcapped(nans(n)), gmean(nans(rows)), grstd(nans(rows));
  float* out = c.in_place ? gh.get() : gout.get();
  cuda::residual_mix_forward(out, {gcapped.get(), gmean.get(), grstd.get()}, gh.get(), gatt.get(), gglob.get(),
                             gxi.get(), ggain.get(), gbias.get(), rows, D);
  expect_close_to_reference(c.in_place ? gh.download() : gout.download(), h_out, kTol * max_abs(h_out), kRtol,
                            "h_out");
  expect_close_to_reference(gcapped.download(), capped, kTol * max_abs(capped), kRtol, "capped");
  expect_close_to_reference(gmean.download(), mean, kTol * max_abs(mean), kRtol, "mean");
  expect_close_to_reference(grstd.download(), rstd, kTol * max_abs(rstd), kRtol, "rstd");

  // Backward from the CPU's saved tensors.
  const auto dh0 = accumulation_start(dh), datt0 = accumulation_start(dy_att), dglob0 = accumulation_start(dy_glob),
             dxi0 = accumulation_start(dxi), dgain0 = accumulation_start(dgain), dbias0 = accumulation_start(dbias);
  DeviceBuffer<float> scapped(capped), smean(mean), srstd(rstd), gdh_out(dh_out), gdh(dh0), gdatt(datt0),
      gdglob(dglob0), gdxi(dxi0), gdgain(dgain0), gdbias(dbias0);
  DeviceBuffer<float> workspace(nans(cuda::residual_mix_backward_workspace_floats(rows, D)));
  cuda::residual_mix_backward(c.all_grads ? gdh.get() : nullptr, gdatt.get(), gdglob.get(),
                              c.all_grads ? gdxi.get() : nullptr, c.all_grads ? gdgain.get() : nullptr, gdbias.get(),
                              gdh_out.get(), {scapped.get(), smean.get(), srstd.get()}, gatt.get(), gglob.get(),
                              gxi.get(), ggain.get(), rows, D, workspace.get());
  expect_accumulated(gdatt.download(), datt0, dy_att, kTol * max_abs(dy_att), "dy_att");
  expect_accumulated(gdglob.download(), dglob0, dy_glob, kTol * max_abs(dy_glob), "dy_glob");
  expect_accumulated(gdbias.download(), dbias0, dbias, kTol * S_bias, "dbias");
  if (c.all_grads) {
    expect_accumulated(gdh.download(), dh0, dh, 0, "dh");  // one exact addition
    expect_accumulated(gdxi.download(), dxi0, dxi, kTol * max_abs(dxi), "dxi");
    expect_accumulated(gdgain.download(), dgain0, dgain, kTol * S_gain, "dgain");
  } else {
    EXPECT_EQ(gdh.download(), dh0) << "dh (null) must not be written";
  }
  // accumulate = false writes the per-row outputs over whatever was there (NaN here).
  DeviceBuffer<float> wdatt(nans(n)), wdglob(nans(n)), wdxi(nans(rows));
  cuda::residual_mix_backward(nullptr, wdatt.get(), wdglob.get(), wdxi.get(), nullptr, nullptr, gdh_out.get(),
                              {scapped.get(), smean.get(), srstd.get()}, gatt.get(), gglob.get(), gxi.get(),
                              ggain.get(), rows, D, workspace.get(), 0, /*accumulate=*/false);
  expect_close_to_reference(wdatt.download(), dy_att, kTol * max_abs(dy_att), kRtol, "dy_att written");
  expect_close_to_reference(wdglob.download(), dy_glob, kTol * max_abs(dy_glob), kRtol, "dy_glob written");
  expect_close_to_reference(wdxi.download(), dxi, kTol * max_abs(dxi), kRtol, "dxi written");
}

}  // namespace

TEST(hybrid_cuda, curvature_mix_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (float c : {0.3f, 0.55f, 1.2f})
    for (auto [rows, width] : {std::pair{1, 37}, std::pair{37, 37}, std::pair{4096, 512}})
      check_curvature_mix(rows, width, c);
}

TEST(hybrid_cuda, phase7_gate_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  for (int rows : {1, 37, 4096}) check_phase7_gate(rows);
}

TEST(hybrid_cuda, residual_mix_forward_backward_match_cpu) {
  MUSE_REQUIRE_GPU();
  check_residual_mix({3, 1, false, true});
  check_residual_mix({1, 37, false, true});
  check_residual_mix({37, 37, true, true});
  check_residual_mix({5, 1031, false, false});
  check_residual_mix({4096, 512, false, true});
  check_residual_mix({4096, 512, true, false});
}

// dc and dgain/dbias are two-stage reductions in a fixed order: two runs agree bit for bit.
TEST(hybrid_cuda, reductions_are_deterministic) {
  MUSE_REQUIRE_GPU();
  const int rows = 4096, D = 512;
  const long n = long(rows) * D;
  Rng rng(3);
  DeviceBuffer<float> c(std::vector<float>{0.7f}), a(random_normal<float>(n, rng)), b(random_normal<float>(n, rng)),
      dy(random_normal<float>(n, rng)), xi(random_uniform<float>(rows, rng, 0.0, 1.0)),
      gain(random_normal<float>(D, rng, 0.2, 1.0)), bias(random_normal<float>(D, rng, 0.2)), h(random_normal<float>(n, rng)),
      h_out(n), capped(n), mean(rows), rstd(rows);
  const ResidualMixSaved<float> saved{capped.get(), mean.get(), rstd.get()};
  cuda::residual_mix_forward(h_out.get(), saved, h.get(), a.get(), b.get(), xi.get(), gain.get(), bias.get(), rows, D);
  DeviceBuffer<float> workspace(std::max(cuda::curvature_mix_backward_workspace_floats(rows, D),
                                         cuda::residual_mix_backward_workspace_floats(rows, D)));
  std::vector<std::vector<float>> runs;
  for (int run = 0; run < 2; ++run) {
    DeviceBuffer<float> dc(std::vector<float>(1, 0.f)), dgain(std::vector<float>(D, 0.f)),
        dbias(std::vector<float>(D, 0.f));
    cuda::curvature_mix_backward(nullptr, nullptr, dc.get(), dy.get(), a.get(), b.get(), c.get(), rows, D,
                                 workspace.get());
    cuda::residual_mix_backward(nullptr, nullptr, nullptr, nullptr, dgain.get(), dbias.get(), dy.get(), saved, a.get(),
                                b.get(), xi.get(), gain.get(), rows, D, workspace.get());
    auto all = dc.download();
    for (auto* buf : {&dgain, &dbias}) {
      const auto v = buf->download();
      all.insert(all.end(), v.begin(), v.end());
    }
    runs.push_back(all);
  }
  EXPECT_EQ(runs[0], runs[1]);
}

}  // namespace muse::test
