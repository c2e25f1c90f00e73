#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "diag/diagnose.h"
#include "diag/entailment.h"
#include "support/gradcheck.h"
#include "support/test_util.h"
#include "tokenizer/byte_tokenizer.h"

namespace muse::test {

namespace {

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
double norm(const std::vector<double>& a) { return std::sqrt(dot(a, a)); }

// Möbius addition on the ball of curvature −c (written out here, independently of the code under test).
std::vector<double> mobius_add(const std::vector<double>& x, const std::vector<double>& y, double c) {
  const double xy = dot(x, y), x2 = dot(x, x), y2 = dot(y, y);
  const double den = 1 + 2 * c * xy + c * c * x2 * y2;
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = ((1 + 2 * c * xy + c * y2) * x[i] + (1 - c * x2) * y[i]) / den;
  return out;
}

// exp_x(v): the point reached from x along the geodesic with initial tangent v. Its exterior angle at x
// is, by definition, the angle between v and the outward radial direction x/‖x‖.
std::vector<double> exp_at(const std::vector<double>& x, const std::vector<double>& v, double c) {
  const double lambda = 2 / (1 - c * dot(x, x)), nv = norm(v), sc = std::sqrt(c);
  std::vector<double> step(v.size());
  for (size_t i = 0; i < v.size(); ++i) step[i] = std::tanh(sc * lambda * nv / 2) * v[i] / (sc * nv);
  return mobius_add(x, step, c);
}

// A unit tangent at x making angle phi with x̂, in the plane of x̂ and a random direction.
std::vector<double> direction_at_angle(const std::vector<double>& x, double phi, Rng& rng) {
  const double nx = norm(x);
  std::vector<double> u(x.size()), w = random_normal(x.size(), rng);
  for (size_t i = 0; i < x.size(); ++i) u[i] = x[i] / nx;
  const double proj = dot(w, u);
  for (size_t i = 0; i < w.size(); ++i) w[i] -= proj * u[i];
  const double nw = norm(w);
  std::vector<double> v(x.size());
  for (size_t i = 0; i < v.size(); ++i) v[i] = std::cos(phi) * u[i] + std::sin(phi) * w[i] / nw;
  return v;
}

// A random point at Euclidean norm r/√c (so √c‖x‖ = r).
std::vector<double> point_at(int D, double r, double c, Rng& rng) {
  std::vector<double> x = random_normal(D, rng);
  const double n = norm(x);
  for (double& e : x) e *= r / (std::sqrt(c) * n);
  return x;
}

}  // namespace

TEST(entail_forward, half_aperture_closed_form) {
  const double K = 0.1;
  // c = 1, ‖x‖ = 0.5: ψ = arcsin(K(1 − 0.25)/0.5) = arcsin(0.15).
  const std::vector<double> x = {0.3, 0.4, 0.0};
  EXPECT_NEAR(half_aperture(x.data(), 3, 1.0, K), std::asin(0.15), 1e-15);
  // c = 4, ‖x‖ = 0.25: √c‖x‖ = 0.5, the same number.
  const std::vector<double> y = {0.15, 0.2, 0.0};
  EXPECT_NEAR(half_aperture(y.data(), 3, 4.0, K), std::asin(0.15), 1e-15);
  // ψ_c(x) = ψ_1(√c·x) at several curvatures and radii.
  Rng rng(3);
  for (double c : {0.05, 0.7, 2.5, 10.0})
    for (double r : {0.05, 0.3, 0.9, 0.999}) {
      const std::vector<double> p = point_at(6, r, c, rng);
      std::vector<double> q = p;
      for (double& e : q) e *= std::sqrt(c);
      EXPECT_NEAR(half_aperture(p.data(), 6, c, K), half_aperture(q.data(), 6, 1.0, K), 1e-12) << c << " " << r;
      EXPECT_NEAR(half_aperture(p.data(), 6, c, K), std::asin(std::min(1.0, K * (1 - r * r) / r)), 1e-12);
    }
  // Near the origin the clip opens the cone to a half-space; at the edge it closes.
  const std::vector<double> tiny = {1e-4, 0, 0};
  EXPECT_DOUBLE_EQ(half_aperture(tiny.data(), 3, 1.0, K), M_PI / 2);
  const std::vector<double> edge = {0.9999999, 0, 0};
  EXPECT_LT(half_aperture(edge.data(), 3, 1.0, K), 1e-6);
}

TEST(entail_forward, exterior_angle_is_the_geodesic_angle) {
  // Ξ(x, exp_x(v)) = ∠(v, x̂): the geodesic from x leaves in direction v (checked at several c, radii,
  // angles, distances along the geodesic, in 7 dimensions).
  Rng rng(11);
  for (double c : {0.1, 1.0, 3.7})
    for (double r : {0.2, 0.6, 0.9})
      for (double phi : {0.05, 0.4, 1.2, M_PI / 2, 2.3, 3.0})
        for (double len : {0.05, 0.5, 2.0}) {
          const std::vector<double> x = point_at(7, r, c, rng);
          std::vector<double> v = direction_at_angle(x, phi, rng);
          for (double& e : v) e *= len;
          const std::vector<double> y = exp_at(x, v, c);
          EXPECT_NEAR(exterior_angle(x.data(), y.data(), 7, c), phi, 1e-8)
              << "c " << c << " r " << r << " phi " << phi << " len " << len;
        }
}

TEST(entail_forward, exterior_angle_along_the_radius) {
  const std::vector<double> x = {0.2, -0.1, 0.3};
  std::vector<double> out = x, in = x;
  for (double& e : out) e *= 1.8;  // further from the origin on the same ray
  for (double& e : in) e *= 0.4;   // towards the origin
  // The clipped arccos argument bounds the angles by acos(1 − 1e-7) ≈ 4.5e-4 rad.
  EXPECT_LT(exterior_angle(x.data(), out.data(), 3, 1.5), 5e-4);
  EXPECT_GT(exterior_angle(x.data(), in.data(), 3, 1.5), M_PI - 5e-4);
  // On the far side of the origin, the geodesic passes through the origin: angle π too.
  std::vector<double> opposite = x;
  for (double& e : opposite) e *= -1;
  EXPECT_GT(exterior_angle(x.data(), opposite.data(), 3, 1.5), M_PI - 5e-4);
}

TEST(entail_energy, zero_inside_the_cone_positive_outside) {
  Rng rng(5);
  const double K = 0.1;
  for (double c : {0.3, 1.0, 6.0})
    for (double r : {0.15, 0.5, 0.8}) {
      const std::vector<double> x = point_at(5, r, c, rng);
      const double psi = half_aperture(x.data(), 5, c, K);
      ASSERT_GT(psi, 0.02);
      ASSERT_LT(psi, M_PI / 2);
      for (double frac : {0.0, 0.3, 0.95}) {  // inside: the geodesic leaves at less than ψ
        const std::vector<double> y = exp_at(x, direction_at_angle(x, frac * psi + 1e-3 * (frac == 0), rng), c);
        EXPECT_EQ(cone_energy(x.data(), y.data(), 5, c, K), 0.0) << "c " << c << " r " << r << " frac " << frac;
      }
      for (double extra : {0.02, 0.5, 1.5}) {  // outside by `extra` rad
        std::vector<double> v = direction_at_angle(x, psi + extra, rng);
        for (double& e : v) e *= 0.7;
        const std::vector<double> y = exp_at(x, v, c);
        EXPECT_NEAR(cone_energy(x.data(), y.data(), 5, c, K), extra, 1e-8) << "c " << c << " r " << r;
      }
    }
}

TEST(entail_energy, violation_rate_counts_and_skips) {
  // c = 1, K = 0.1. Pair 0 inside the cone, pairs 1–2 outside, pair 3 has x = y, pair 4 has x at the
  // origin: the rate is over the three valid pairs.
  const double c = 1;
  Rng rng(2);
  const std::vector<double> x = {0.6, 0.0, 0.0};
  const std::vector<double> inside = exp_at(x, {0.3, 0.001, 0.0}, c);
  const std::vector<double> side = exp_at(x, {0.0, 0.3, 0.0}, c);
  const std::vector<double> back = {0.1, 0.0, 0.0};
  std::vector<double> xs, ys;
  auto add = [&](const std::vector<double>& a, const std::vector<double>& b) {
    xs.insert(xs.end(), a.begin(), a.end());
    ys.insert(ys.end(), b.begin(), b.end());
  };
  add(x, inside);
  add(x, side);
  add(x, back);
  add(x, x);
  add({0, 0, 0}, side);
  ConeOptions o;
  const ConeStats s = cone_stats(xs.data(), ys.data(), 5, 3, c, o);
  EXPECT_EQ(s.pairs, 5);
  EXPECT_EQ(s.skipped, 2);
  EXPECT_EQ(s.violations, 2);
  EXPECT_DOUBLE_EQ(s.violation_rate, 2.0 / 3.0);
  const double psi = std::asin(0.1 * (1 - 0.36) / 0.6);
  EXPECT_NEAR(s.mean_half_aperture, psi, 1e-12);
  EXPECT_NEAR(s.mean_exterior_angle, (std::atan(0.001 / 0.3) + M_PI / 2 + M_PI) / 3, 1e-3);
  EXPECT_NEAR(s.mean_energy, (M_PI / 2 - psi + M_PI - psi) / 3, 1e-3);
  // A threshold above the side pair's energy leaves only the pair pointing back.
  o.violation = 2.0;
  EXPECT_EQ(cone_stats(xs.data(), ys.data(), 5, 3, c, o).violations, 1);
}

TEST(entail_grad, aperture_angle_energy_float64) {
  Rng rng(21);
  const int D = 6;
  for (double c0 : {0.4, 1.0, 3.0}) {
    SCOPED_TRACE(c0);
    // Premises at √c‖x‖ ∈ [0.3, 0.8] keep ψ's arcsin unclipped; pairs with Ξ − ψ ≤ 0.05 or an extreme
    // arccos argument are redrawn, so no kink is within reach of the finite differences.
    const int rows = 5;
    std::vector<double> x, y;
    while (int(x.size()) < rows * D) {
      const std::vector<double> a = point_at(D, rng.uniform(0.3, 0.8), c0, rng);
      const std::vector<double> b = point_at(D, rng.uniform(0.1, 0.9), c0, rng);
      const double xi = exterior_angle(a.data(), b.data(), D, c0);
      if (xi - half_aperture(a.data(), D, c0, 0.1) < 0.05 || xi > 3.0) continue;
      x.insert(x.end(), a.begin(), a.end());
      y.insert(y.end(), b.begin(), b.end());
    }
    std::vector<double> c = {c0};
    const std::vector<double> w = random_normal(rows, rng);
    enum Which { psi, xi, energy };
    for (Which which : {psi, xi, energy}) {
      SCOPED_TRACE(int(which));
      auto loss = [&] {
        double s = 0;
        for (int r = 0; r < rows; ++r) {
          const double* a = x.data() + r * D;
          const double* b = y.data() + r * D;
          const double v = which == psi   ? half_aperture(a, D, c[0], 0.1)
                           : which == xi ? exterior_angle(a, b, D, c[0])
                                         : cone_energy(a, b, D, c[0], 0.1);
          s += w[r] * v;
        }
        return s;
      };
      std::vector<double> dx(x.size(), 0.0), dy(y.size(), 0.0), dc = {0.0};
      for (int r = 0; r < rows; ++r) {
        double* gx = dx.data() + r * D;
        double* gy = dy.data() + r * D;
        const double* a = x.data() + r * D;
        const double* b = y.data() + r * D;
        dc[0] += which == psi  ? half_aperture_backward(gx, w[r], a, D, c[0], 0.1)
                 : which == xi ? exterior_angle_backward(gx, gy, w[r], a, b, D, c[0])
                               : cone_energy_backward(gx, gy, w[r], a, b, D, c[0], 0.1);
      }
      std::vector<GradTensor> tensors = {{"x", &x, &dx}, {"c", &c, &dc}};
      if (which != psi) tensors.push_back({"y", &y, &dy});
      expect_gradients_match(loss, tensors);
    }
  }
}

TEST(entail_grad, order_loss_float64) {
  Rng rng(31);
  const int D = 5, rows = 8;
  const double c0 = 0.9;
  ConeOptions o;
  o.margin = 2.8;  // large, so some negatives are inside the margin and carry a gradient
  std::vector<double> x, y;
  std::vector<uint8_t> labels;
  int active_negatives = 0;
  while (int(labels.size()) < rows) {
    const std::vector<double> a = point_at(D, rng.uniform(0.3, 0.8), c0, rng);
    const std::vector<double> b = point_at(D, rng.uniform(0.1, 0.9), c0, rng);
    const double e = cone_energy(a.data(), b.data(), D, c0, o.K);
    const uint8_t label = labels.size() % 2;
    if (e < 0.05 || std::abs(o.margin - e) < 0.05 || exterior_angle(a.data(), b.data(), D, c0) > 3.0) continue;
    active_negatives += !label && e < o.margin;
    x.insert(x.end(), a.begin(), a.end());
    y.insert(y.end(), b.begin(), b.end());
    labels.push_back(label);
  }
  ASSERT_GT(active_negatives, 0);
  std::vector<double> c = {c0}, dx(x.size(), 0.0), dy(y.size(), 0.0), dc = {0.0};
  const double L = order_loss(dx.data(), dy.data(), dc.data(), 1.0, x.data(), y.data(), labels, D, c[0], o);
  // The value: mean positive energy + mean negative hinge.
  double pos = 0, neg = 0;
  for (int r = 0; r < rows; ++r) {
    const double e = cone_energy(x.data() + r * D, y.data() + r * D, D, c0, o.K);
    (labels[r] ? pos : neg) += labels[r] ? e : std::max(o.margin - e, 0.0);
  }
  EXPECT_NEAR(L, pos / 4 + neg / 4, 1e-12);
  auto loss = [&] { return order_loss<double>(nullptr, nullptr, nullptr, 1.0, x.data(), y.data(), labels, D, c[0], o); };
  expect_gradients_match(loss, {{"x", &x, &dx}, {"y", &y, &dy}, {"c", &c, &dc}});
}

TEST(entail_pairs, pair_file_and_errors) {
  const auto dir = std::filesystem::temp_directory_path() / ("muse_entail_pairs_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string good = (dir / "good.tsv").string(), bad = (dir / "bad.tsv").string();
  std::ofstream(good) << "# comment\nanimal\tdog\n\nA man sleeps.\tA person rests.\t1\ndog\tanimal\t0\r\n";
  const std::vector<PhrasePair> p = read_pair_file(good);
  ASSERT_EQ(p.size(), 3u);
  EXPECT_EQ(p[0].premise, "animal");
  EXPECT_EQ(p[0].hypothesis, "dog");
  EXPECT_EQ(p[0].label, 1);
  EXPECT_EQ(p[1].hypothesis, "A person rests.");
  EXPECT_EQ(p[2].label, 0);
  std::ofstream(bad) << "animal\tdog\nno tab here\n";
  try {
    read_pair_file(bad);
    ADD_FAILURE() << "accepted a line without a tab";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.tsv:2"), std::string::npos) << e.what();
  }
  std::ofstream(bad) << "animal\tdog\tmaybe\n";
  EXPECT_THROW(read_pair_file(bad), std::runtime_error);
  EXPECT_THROW(read_pair_file((dir / "missing.tsv").string()), std::runtime_error);

  // Tokenizing drops pairs whose phrase encodes to nothing.
  std::vector<PhrasePair> with_empty = p;
  with_empty.push_back({"", "x", 1});
  int64_t dropped = 0;
  const std::vector<TokenPair> t = tokenize_pairs(with_empty, ByteTokenizer(), &dropped);
  EXPECT_EQ(t.size(), 3u);
  EXPECT_EQ(dropped, 1);
  EXPECT_EQ(t[0].premise.size(), 6u);
  std::filesystem::remove_all(dir);
}

TEST(entail_pairs, wordnet_hypernym_pointers) {
  // Three synsets in WordNet's data.noun format: dog → canine → carnivore ('@' = hypernym; '~' hyponym
  // pointers and the licence header are ignored).
  const auto path = std::filesystem::temp_directory_path() / ("muse_wordnet_" + std::to_string(::getpid()));
  std::ofstream(path) << "  1 This software and database is being provided\n"
                         "02083346 05 n 01 canine 0 002 @ 02075296 n 0000 ~ 02084071 n 0000 | dogs etc\n"
                         "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis\n"
                         "02075296 05 n 01 carnivore 0 001 ~ 02083346 n 0000 | a terrestrial or aquatic flesh-eater\n";
  const std::vector<PhrasePair> all = wordnet_pairs(path.string(), 0, 1);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].premise, "carnivore");
  EXPECT_EQ(all[0].hypothesis, "canine");
  EXPECT_EQ(all[1].premise, "canine");
  EXPECT_EQ(all[1].hypothesis, "dog");
  EXPECT_EQ(wordnet_pairs(path.string(), 1, 7).size(), 1u);
  // Seeded sampling without replacement, in file order: a chain of 40 synsets.
  {
    std::ofstream chain(path);
    for (int i = 0; i < 40; ++i)
      chain << 10000000 + i << " 05 n 01 word" << i << " 0 001 @ " << 10000000 + (i + 1) % 40 << " n 0000 | g\n";
  }
  const std::vector<PhrasePair> a = wordnet_pairs(path.string(), 10, 9), b = wordnet_pairs(path.string(), 10, 9);
  ASSERT_EQ(a.size(), 10u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].hypothesis, b[i].hypothesis);
  EXPECT_NE(a[0].hypothesis + a[5].hypothesis, wordnet_pairs(path.string(), 10, 10)[0].hypothesis +
                                                   wordnet_pairs(path.string(), 10, 10)[5].hypothesis);
  std::filesystem::remove(path);
  EXPECT_THROW(wordnet_pairs(path.string(), 0, 1), std::runtime_error);

  // The Debian database, when installed (scripts/setup-debian.sh installs wordnet-base).
  if (!std::filesystem::exists(kWordnetNouns)) GTEST_SKIP() << kWordnetNouns << " not installed";
  const std::vector<PhrasePair> debian = wordnet_pairs(kWordnetNouns, 0, 1);
  EXPECT_GT(debian.size(), 70000u);
  bool found = false;
  for (const PhrasePair& p : debian) found |= p.premise == "canine" && p.hypothesis == "dog";
  EXPECT_TRUE(found) << "(canine, dog) missing";
}

}  // namespace muse::test
