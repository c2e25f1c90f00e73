#include "diag/topology.h"

#include <iostream>  // before GUDHI: Persistent_cohomology.h uses std::cout without including it

#include <gudhi/Persistent_cohomology.h>
#include <gudhi/Rips_complex.h>
#include <gudhi/Simplex_tree.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "common/rng.h"
#include "ops/poincare.h"

namespace muse {

namespace {

// GUDHI's fast-persistence options with double filtration values (its default stores floats, which
// would round the distances that the tests compare with single-linkage merge heights).
struct RipsTreeOptions {
  typedef Gudhi::linear_indexing_tag Indexing_tag;
  typedef int Vertex_handle;
  typedef double Filtration_value;
  typedef std::uint32_t Simplex_key;
  static const bool store_key = true;
  static const bool store_filtration = true;
  static const bool contiguous_vertices = true;
};
using RipsTree = Gudhi::Simplex_tree<RipsTreeOptions>;
using RipsCohomology = Gudhi::persistent_cohomology::Persistent_cohomology<RipsTree,
                                                                           Gudhi::persistent_cohomology::Field_Zp>;

// Rows of the symmetric matrix, the shape GUDHI's distance-matrix constructor reads.
struct MatrixRows {
  const std::vector<double>* dist;
  int n;
  size_t size() const { return size_t(n); }
  const double* operator[](size_t i) const { return dist->data() + i * size_t(n); }
};

}  // namespace

Persistence rips_persistence(const std::vector<double>& dist, int n, double bound) {
  if (dist.size() != size_t(n) * n) throw std::invalid_argument("rips_persistence: distance matrix is not n×n");
  Persistence out;
  out.bound = bound;
  if (n == 0) return out;
  Gudhi::rips_complex::Rips_complex<double> rips(MatrixRows{&dist, n}, bound);
  RipsTree tree;
  // Triangles fill the H1 cycles; H2 is not asked for. (GUDHI's edge collapse would make dense
  // low-dimensional clouds ~20× faster but, measured on 64 points on a circle, loses the H1 class that
  // is still alive at the bound: it is only exact for unbounded filtrations.)
  rips.create_complex(tree, 2);
  RipsCohomology cohomology(tree);
  cohomology.init_coefficients(2);
  cohomology.compute_persistent_cohomology(0.0);
  for (int dim = 0; dim < 2; ++dim)
    for (const auto& [birth, death] : cohomology.intervals_in_dimension(dim)) {
      PersistenceBar bar;
      bar.birth = birth;
      bar.essential = !std::isfinite(death);
      bar.death = bar.essential ? bound : death;
      out.bars[dim].push_back(bar);
    }
  for (auto& bars : out.bars)
    std::sort(bars.begin(), bars.end(), [](const PersistenceBar& a, const PersistenceBar& b) {
      return a.death - a.birth > b.death - b.birth || (a.death - a.birth == b.death - b.birth && a.birth < b.birth);
    });
  return out;
}

int betti_number(const Persistence& p, int dim, double eps) {
  int count = 0;
  for (const PersistenceBar& b : p.bars[dim])
    if (b.birth <= eps && (b.essential || eps < b.death)) ++count;
  return count;
}

std::vector<double> bar_lengths(const Persistence& p, int dim) {
  std::vector<double> lengths;
  bool whole_cloud_skipped = dim != 0;
  for (const PersistenceBar& b : p.bars[dim]) {
    if (b.essential && !whole_cloud_skipped) {
      whole_cloud_skipped = true;
      continue;
    }
    lengths.push_back(b.death - b.birth);
  }
  return lengths;
}

double persistent_entropy(const std::vector<double>& lengths) {
  double total = 0;
  for (double l : lengths)
    if (l > 0) total += l;
  if (total <= 0) return 0;
  double h = 0;
  for (double l : lengths)
    if (l > 0) h -= (l / total) * std::log(l / total);
  return h;
}

std::vector<int> subsample_indices(int n, int max_points, uint64_t seed) {
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  if (n <= max_points) return idx;
  Rng rng(seed);
  for (int i = 0; i < max_points; ++i) std::swap(idx[i], idx[i + rng.below(uint64_t(n - i))]);  // partial shuffle
  idx.resize(max_points);
  std::sort(idx.begin(), idx.end());
  return idx;
}

std::vector<double> poincare_distance_matrix(const double* points, const std::vector<int>& idx, int D, double c) {
  const int n = int(idx.size());
  std::vector<double> dist(size_t(n) * n, 0.0);
  // Threads pay off on model widths (256 points × D = 512 is ~17M flops), not on small test clouds.
#pragma omp parallel for schedule(dynamic, 8) if (size_t(n) * n * D > (size_t(1) << 22))
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j) {
      const double d = ball_distance_pair(points + size_t(idx[i]) * D, points + size_t(idx[j]) * D, D, c);
      dist[size_t(i) * n + j] = dist[size_t(j) * n + i] = d;
    }
  return dist;
}

TopologyReport topology_report(const double* points, int rows, int D, double c, const TopologyOptions& o) {
  if (o.max_points < 2) throw std::invalid_argument("topology: max_points must be at least 2");
  if (!(o.max_edge > 0 && o.max_edge <= 1)) throw std::invalid_argument("topology: ph_max_edge must be in (0, 1]");
  if (!(o.scale >= 0 && o.scale <= o.max_edge))
    throw std::invalid_argument("topology: ph_scale (" + std::to_string(o.scale) +
                                ") must lie in [0, ph_max_edge]: Betti numbers above the filtration bound are unknown");
  TopologyReport r;
  r.total_points = rows;
  const std::vector<int> idx = subsample_indices(rows, o.max_points, o.seed);
  r.points = int(idx.size());
  const std::vector<double> dist = poincare_distance_matrix(points, idx, D, c);
  for (double d : dist) r.diameter = std::max(r.diameter, d);
  r.bound = o.max_edge * r.diameter;
  r.scale = o.scale * r.diameter;
  r.persistence = rips_persistence(dist, r.points, r.bound);
  for (int dim = 0; dim < 2; ++dim) {
    DimensionSummary& s = r.dim[dim];
    for (const PersistenceBar& b : r.persistence.bars[dim]) {
      ++s.bars;
      s.essential += b.essential;
    }
    s.betti = betti_number(r.persistence, dim, r.scale);
    const std::vector<double> lengths = bar_lengths(r.persistence, dim);
    s.entropy = persistent_entropy(lengths);
    s.normalized_entropy = lengths.size() > 1 ? s.entropy / std::log(double(lengths.size())) : 0.0;
    for (double l : lengths) {
      s.total_persistence += l;
      s.longest = std::max(s.longest, l);
    }
  }
  r.circular = r.dim[1].longest > o.circular * r.diameter;
  return r;
}

std::vector<MstEdge> minimum_spanning_tree(const std::vector<double>& dist, int n) {
  std::vector<MstEdge> edges;
  if (n < 2) return edges;
  std::vector<double> best(n, std::numeric_limits<double>::infinity());
  std::vector<int> from(n, 0);
  std::vector<bool> in_tree(n, false);
  int current = 0;
  in_tree[0] = true;
  for (int added = 1; added < n; ++added) {
    int next = -1;
    for (int v = 0; v < n; ++v) {
      if (in_tree[v]) continue;
      const double d = dist[size_t(current) * n + v];
      if (d < best[v]) best[v] = d, from[v] = current;
      if (next < 0 || best[v] < best[next]) next = v;
    }
    in_tree[next] = true;
    edges.push_back({from[next], next, best[next]});
    current = next;
  }
  return edges;
}

template <typename T>
T h0_regularizer(T* dpoints, T* dc, T g, const T* points, int n, int D, T c, T margin) {
  std::vector<double> dist(size_t(n) * n, 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j)
      dist[size_t(i) * n + j] = dist[size_t(j) * n + i] =
          double(ball_distance_pair(points + size_t(i) * D, points + size_t(j) * D, D, c));
  T loss = 0, grad_c = 0;
  for (const MstEdge& e : minimum_spanning_tree(dist, n)) {
    if (e.w <= double(margin)) continue;
    loss += T(e.w) - margin;
    if (dpoints || dc)
      grad_c += ball_distance_pair_backward(dpoints ? dpoints + size_t(e.u) * D : nullptr,
                                            dpoints ? dpoints + size_t(e.v) * D : nullptr, g, points + size_t(e.u) * D,
                                            points + size_t(e.v) * D, D, c);
  }
  if (dc) *dc += grad_c;
  return loss;
}

template float h0_regularizer<float>(float*, float*, float, const float*, int, int, float, float);
template double h0_regularizer<double>(double*, double*, double, const double*, int, int, double, double);

}  // namespace muse
