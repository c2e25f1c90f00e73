#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "diag/diagnose.h"
#include "diag/topology.h"
#include "ops/poincare.h"
#include "support/gradcheck.h"
#include "support/test_util.h"

namespace muse::test {

namespace {

// Ball points exp_c(v) of tangent vectors v [n, D].
std::vector<double> to_ball(const std::vector<double>& v, int D, double c) {
  std::vector<double> p(v.size());
  poincare_exp_forward<double>(p.data(), v.data(), c, int(v.size() / D), D);
  return p;
}

std::vector<int> all_indices(int n) {
  std::vector<int> idx(n);
  for (int i = 0; i < n; ++i) idx[i] = i;
  return idx;
}

// Single-linkage agglomerative clustering, the textbook O(n³) way (independent of the MST and of
// GUDHI): repeatedly merge the two clusters at the smallest minimum pairwise distance; returns the
// merge heights in order.
std::vector<double> single_linkage_heights(const std::vector<double>& dist, int n) {
  std::vector<int> cluster = all_indices(n);
  std::vector<double> heights;
  for (int merges = 0; merges < n - 1; ++merges) {
    double best = std::numeric_limits<double>::infinity();
    int a = -1, b = -1;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j)
        if (cluster[i] != cluster[j] && dist[size_t(i) * n + j] < best) best = dist[size_t(i) * n + j], a = cluster[i], b = cluster[j];
    for (int& k : cluster)
      if (k == b) k = a;
    heights.push_back(best);
  }
  return heights;
}

}  // namespace

TEST(topology_betti, four_separated_clusters_give_beta0_four) {
  const int D = 8, per = 40;
  const double c = 1.0;
  Rng rng(4);
  std::vector<double> v;
  for (int k = 0; k < 4; ++k)
    for (int i = 0; i < per; ++i)
      for (int e = 0; e < D; ++e) v.push_back((e == k ? 1.5 : 0.0) + 0.04 * rng.normal());
  const std::vector<double> p = to_ball(v, D, c);
  const int n = 4 * per;
  const std::vector<double> dist = poincare_distance_matrix(p.data(), all_indices(n), D, c);
  double intra = 0, inter = std::numeric_limits<double>::infinity(), diameter = 0;
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j) {
      const double d = dist[size_t(i) * n + j];
      if (i / per == j / per)
        intra = std::max(intra, d);
      else
        inter = std::min(inter, d);
      diameter = std::max(diameter, d);
    }
  ASSERT_LT(2 * intra, inter) << "clusters not separated";
  TopologyOptions o;
  o.scale = 1.5 * intra / diameter;  // between the intra- and inter-cluster scales
  const TopologyReport r = topology_report(p.data(), n, D, c, o);
  EXPECT_EQ(r.points, n);
  EXPECT_NEAR(r.diameter, diameter, 1e-12);
  EXPECT_EQ(r.dim[0].betti, 4);
  // Below the intra-cluster scale there are more components, above the inter-cluster scale one.
  EXPECT_GT(betti_number(r.persistence, 0, 0.5 * intra), 4);
  EXPECT_EQ(betti_number(r.persistence, 0, std::min(1.01 * inter, r.bound)), inter < r.bound ? 1 : 4);
  EXPECT_FALSE(r.circular);
}

TEST(topology_h1, points_on_a_circle_give_one_long_bar) {
  const int D = 6, n = 64;
  const double c = 0.8;
  Rng rng(9);
  std::vector<double> p(size_t(n) * D, 0.0);
  const double rho = 0.6 / std::sqrt(c);  // Euclidean radius of the circle in the ball
  for (int i = 0; i < n; ++i) {
    const double t = 2 * M_PI * (i + 0.2 * rng.uniform()) / n;
    p[size_t(i) * D + 1] = rho * std::cos(t);  // a 2-D subspace of the 6-D ball
    p[size_t(i) * D + 4] = rho * std::sin(t);
  }
  TopologyOptions o;
  const TopologyReport r = topology_report(p.data(), n, D, c, o);
  int long_bars = 0;
  for (const PersistenceBar& b : r.persistence.bars[1]) long_bars += b.death - b.birth > o.circular * r.diameter;
  EXPECT_EQ(long_bars, 1);
  EXPECT_TRUE(r.circular);
  // The cycle is born at the neighbour spacing and lives past the bound (Rips fills a circle at ~0.87 ×
  // its diameter, above the 0.5 bound), so the bar is essential and truncated there.
  const PersistenceBar& bar = r.persistence.bars[1][0];
  EXPECT_TRUE(bar.essential);
  EXPECT_LT(bar.birth, 0.2 * r.diameter);
  EXPECT_GT(r.dim[1].longest, 0.3 * r.diameter);
  EXPECT_EQ(r.dim[0].betti, 1);  // the circle is connected at the scale
  EXPECT_EQ(r.dim[1].betti, 1);  // and has one hole
}

TEST(topology_h1, uniform_cloud_has_no_long_bar) {
  // 200 points uniform in a tangent disk of radius 1 (c = 1), several seeds: the cloud is dense enough
  // that its holes are noise, well under the flag's 0.1 × diameter (measured 0.068–0.074 over 5 seeds). In three
  // dimensions 200 points are too sparse for that: noise bars reach 0.10–0.14 × diameter there
  // (docs/DIAGNOSTICS.md).
  const int D = 2, n = 200;
  const double c = 1.0;
  for (uint64_t seed : {1, 2}) {
    SCOPED_TRACE(seed);
    Rng rng(seed);
    std::vector<double> v;
    while (int(v.size()) < n * D) {
      const std::vector<double> x = random_uniform(D, rng, -1.0, 1.0);
      if (x[0] * x[0] + x[1] * x[1] <= 1) v.insert(v.end(), x.begin(), x.end());
    }
    const std::vector<double> p = to_ball(v, D, c);
    TopologyOptions o;
    const TopologyReport r = topology_report(p.data(), n, D, c, o);
    EXPECT_GT(r.dim[1].bars, 10);  // small cycles appear and die quickly
    EXPECT_LT(r.dim[1].longest, 0.09 * r.diameter);
    EXPECT_FALSE(r.circular);
    EXPECT_EQ(r.dim[1].essential, 0);
  }
}

TEST(topology_h0, deaths_equal_single_linkage_merge_heights) {
  const int D = 4, n = 50;
  const double c = 2.0;
  Rng rng(17);
  const std::vector<double> p = to_ball(random_normal(size_t(n) * D, rng, 0.5), D, c);
  const std::vector<double> dist = poincare_distance_matrix(p.data(), all_indices(n), D, c);
  std::vector<double> heights = single_linkage_heights(dist, n);
  std::sort(heights.begin(), heights.end());
  std::vector<double> mst;
  for (const MstEdge& e : minimum_spanning_tree(dist, n)) mst.push_back(e.w);
  std::sort(mst.begin(), mst.end());
  ASSERT_EQ(mst.size(), heights.size());
  for (size_t i = 0; i < mst.size(); ++i) EXPECT_DOUBLE_EQ(mst[i], heights[i]);

  // Full filtration: n − 1 finite H0 bars at the merge heights, one essential.
  const double diameter = *std::max_element(dist.begin(), dist.end());
  for (double bound : {diameter, heights[n / 2]}) {
    SCOPED_TRACE(bound);
    const Persistence ph = rips_persistence(dist, n, bound);
    std::vector<double> deaths;
    int essential = 0;
    for (const PersistenceBar& b : ph.bars[0]) {
      EXPECT_EQ(b.birth, 0.0);
      if (b.essential)
        ++essential;
      else
        deaths.push_back(b.death);
    }
    std::sort(deaths.begin(), deaths.end());
    // A bounded filtration sees the merges up to the bound; the later ones stay essential.
    std::vector<double> expected;
    for (double h : heights)
      if (h <= bound) expected.push_back(h);
    ASSERT_EQ(deaths.size(), expected.size());
    for (size_t i = 0; i < deaths.size(); ++i) EXPECT_DOUBLE_EQ(deaths[i], expected[i]);
    EXPECT_EQ(essential, 1 + int(heights.size() - expected.size()));
  }
}

TEST(topology_summary, entropy_lengths_and_betti_on_hand_made_bars) {
  Persistence p;
  p.bound = 3;
  p.bars[0] = {{0, 3, true}, {0, 3, true}, {0, 2, false}, {0, 1, false}};
  p.bars[1] = {{0.5, 1.5, false}, {1, 3, true}};
  // H0: one essential bar is the whole cloud (left out); the other is truncated at the bound.
  std::vector<double> l0 = bar_lengths(p, 0);
  std::sort(l0.begin(), l0.end());
  EXPECT_EQ(l0, (std::vector<double>{1, 2, 3}));
  EXPECT_EQ(bar_lengths(p, 1), (std::vector<double>{1, 2}));
  const double q[] = {1.0 / 6, 2.0 / 6, 3.0 / 6};
  EXPECT_NEAR(persistent_entropy(l0), -(q[0] * std::log(q[0]) + q[1] * std::log(q[1]) + q[2] * std::log(q[2])), 1e-15);
  EXPECT_NEAR(persistent_entropy({1, 1, 1, 1}), std::log(4.0), 1e-15);
  EXPECT_EQ(persistent_entropy({5}), 0.0);
  EXPECT_EQ(betti_number(p, 0, 0.5), 4);
  EXPECT_EQ(betti_number(p, 0, 1.0), 3);  // a bar [0, 1) is dead at 1
  EXPECT_EQ(betti_number(p, 0, 2.5), 2);
  EXPECT_EQ(betti_number(p, 1, 0.4), 0);
  EXPECT_EQ(betti_number(p, 1, 1.2), 2);
  EXPECT_EQ(betti_number(p, 1, 2.0), 1);
}

TEST(topology_subsample, seeded_sorted_and_bounded) {
  const std::vector<int> a = subsample_indices(1000, 256, 5), b = subsample_indices(1000, 256, 5);
  EXPECT_EQ(a, b);
  ASSERT_EQ(a.size(), 256u);
  EXPECT_TRUE(std::is_sorted(a.begin(), a.end()));
  EXPECT_EQ(std::adjacent_find(a.begin(), a.end()), a.end());
  EXPECT_NE(a, subsample_indices(1000, 256, 6));
  EXPECT_EQ(subsample_indices(7, 256, 5), all_indices(7));
  TopologyOptions o;
  o.scale = 0.7;  // above the filtration bound: refused
  std::vector<double> p = {0.1, 0.0, 0.0, 0.2};
  EXPECT_THROW(topology_report(p.data(), 2, 2, 1.0, o), std::invalid_argument);
}

TEST(topology_grad, h0_regularizer_through_the_exp_map_float64) {
  // R(exp_c(h/√D)) with respect to the tangent vectors h and c; the margin leaves some MST edges out.
  const int D = 5, n = 14;
  Rng rng(23);
  std::vector<double> h = random_normal(size_t(n) * D, rng, 1.5);
  std::vector<double> c(1, 0.7);
  std::vector<double> p(h.size());
  residual_to_ball<double>(p.data(), h.data(), n, D, c[0]);
  std::vector<double> w;
  for (const MstEdge& e : minimum_spanning_tree(poincare_distance_matrix(p.data(), all_indices(n), D, c[0]), n))
    w.push_back(e.w);
  std::sort(w.begin(), w.end());
  const double margin = 0.5 * (w[n / 2 - 1] + w[n / 2]);  // half the edges above it, none near it
  auto loss = [&] {
    std::vector<double> q(h.size());
    residual_to_ball<double>(q.data(), h.data(), n, D, c[0]);
    return h0_regularizer<double>(nullptr, nullptr, 1.0, q.data(), n, D, c[0], margin);
  };
  std::vector<double> dp(h.size(), 0.0), dh(h.size(), 0.0), dc(1, 0.0);
  const double R = h0_regularizer<double>(dp.data(), dc.data(), 1.0, p.data(), n, D, c[0], margin);
  EXPECT_GT(R, 0.0);
  residual_to_ball_backward<double>(dh.data(), dc.data(), dp.data(), h.data(), n, D, c[0]);
  expect_gradients_match(loss, {{"h", &h, &dh}, {"c", &c, &dc}});
}

}  // namespace muse::test
