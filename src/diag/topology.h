// Persistent homology of a cloud of points on the Poincaré ball (SPEC §5): the Vietoris–Rips filtration
// on Poincaré distances (GUDHI's Rips complex, simplex tree and persistent cohomology over GF(2)),
// persistence in dimensions 0 and 1, and the numbers derived from it; plus the differentiable H0
// regulariser Σ_{MST edges} relu(w − margin).
//
// The filtration is bounded at `max_edge` × the cloud's diameter (a full Rips complex to dimension 2 has
// C(n,3) triangles). A bar still alive at the bound is *essential* here: its death is unknown, only that it
// is later than the bound. Lengths, entropies and total persistence truncate essential bars at the bound,
// except the one H0 bar of the whole cloud, which never dies in any filtration and is left out. Betti
// numbers at a scale ε ≤ bound are exact: β_k(ε) = #{k-bars with birth ≤ ε < death}.
#pragma once
#include <cstdint>
#include <vector>

namespace muse {

struct TopologyOptions {
  int max_points = 256;    // clouds larger than this are sub-sampled (seeded)
  double max_edge = 0.5;   // `ph_max_edge`: filtration bound, fraction of the diameter
  double scale = 0.25;     // `ph_scale`: Betti numbers at this fraction of the diameter (≤ max_edge)
  double circular = 0.1;   // `ph_circular`: flag an H1 bar longer than this fraction of the diameter
  double margin = 0.5;     // `ph_margin`: the regulariser penalises MST edges longer than this (distance units)
  uint64_t seed = 1234;    // sub-sampling
};

struct PersistenceBar {
  double birth = 0, death = 0;  // death = the bound for essential bars
  bool essential = false;
};

struct Persistence {
  double bound = 0;
  std::vector<PersistenceBar> bars[2];  // dimensions 0 and 1, zero-length bars dropped
};

// Vietoris–Rips persistence (dimensions 0, 1) of n points with the symmetric distance matrix dist
// [n, n] (row-major), edges up to `bound`.
Persistence rips_persistence(const std::vector<double>& dist, int n, double bound);

// β_dim(ε): bars alive at ε (essential bars count as never dying); exact for ε ≤ bound.
int betti_number(const Persistence& p, int dim, double eps);

// Lengths entering entropy and total persistence: death − birth, essential bars truncated at the bound,
// minus one essential H0 bar (the whole cloud).
std::vector<double> bar_lengths(const Persistence& p, int dim);

// −Σ pᵢ ln pᵢ with pᵢ = lᵢ/Σl over the positive lengths (0 for fewer than two bars).
double persistent_entropy(const std::vector<double>& lengths);

struct DimensionSummary {
  int bars = 0;               // bars of positive length (essential included)
  int essential = 0;          // of those, alive at the bound
  int betti = 0;              // β at the scale
  double entropy = 0;         // persistent entropy
  double normalized_entropy = 0;  // entropy / ln(#lengths), in [0, 1]
  double total_persistence = 0;
  double longest = 0;         // longest bar (truncated at the bound)
};

struct TopologyReport {
  int points = 0;             // points used (after sub-sampling)
  int total_points = 0;       // points given
  double diameter = 0, bound = 0, scale = 0;  // absolute distances
  DimensionSummary dim[2];
  bool circular = false;      // dim[1].longest > circular × diameter
  Persistence persistence;
};

// Up to max_points distinct indices of [0, n), sorted; all of them when n ≤ max_points.
std::vector<int> subsample_indices(int n, int max_points, uint64_t seed);

// Poincaré distance matrix d_c between the rows `idx` of points [*, D] (ball coordinates).
std::vector<double> poincare_distance_matrix(const double* points, const std::vector<int>& idx, int D, double c);

// Sub-samples, measures and summarises a cloud of ball points [rows, D].
TopologyReport topology_report(const double* points, int rows, int D, double c, const TopologyOptions& options);

// Minimum spanning tree of the complete graph with weights dist [n, n] (Prim, O(n²)): n − 1 edges,
// whose weights are the H0 death times of the Rips filtration.
struct MstEdge {
  int u = 0, v = 0;
  double w = 0;
};
std::vector<MstEdge> minimum_spanning_tree(const std::vector<double>& dist, int n);

// H0 regulariser R = Σ_{MST edges} relu(d_c(x_u, x_v) − margin) on ball points [n, D]. Adds g·∂R/∂points
// into dpoints and g·∂R/∂c into *dc (either may be null); returns R. Almost everywhere differentiable:
// the tree is fixed by the current distances and the gradient flows through the distance formula.
template <typename T>
T h0_regularizer(T* dpoints, T* dc, T g, const T* points, int n, int D, T c, T margin);

}  // namespace muse
