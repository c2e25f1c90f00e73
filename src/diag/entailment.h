// Hyperbolic entailment cones (Ganea, Bécigneul & Hofmann 2018) on the Poincaré ball of curvature −c
// (SPEC §5), in ball coordinates. The cone of a point x opens away from the origin along the ray through
// x; a pair (x, y) — x the premise, y the hypothesis — is "entailed" when y lies inside the cone of x:
//
//   half-aperture   ψ(x)   = arcsin( clip( K(1 − c‖x‖²) / (√c‖x‖), −1, 1 ) )
//   exterior angle  Ξ(x,y) = arccos( (⟨x,y⟩(1 + c‖x‖²) − ‖x‖²(1 + c‖y‖²))
//                                    / (‖x‖·‖x−y‖·√(1 + c²‖x‖²‖y‖² − 2c⟨x,y⟩)) )
//   energy          E(x,y) = relu(Ξ(x,y) − ψ(x))
//
// Ξ is the angle at x between the outward radial direction and the geodesic from x to y (0: y lies
// straight outwards, π: straight towards the origin). Both formulas are Ganea's c = 1 formulas applied to
// √c·x, √c·y, which is what the ball of curvature −c is (c cancels from Ξ's ratio, so its form does not
// change); using the c = 1 formulas on raw coordinates is up to 2 rad wrong for other c.
//
// The arccos argument is clipped to [−1+1e-7, 1−1e-7] with zero gradient outside; pairs with x = y or
// ‖x‖ < 1e-6 have no cone or no direction and are skipped (never counted, no gradient). Backward
// functions ACCUMULATE (+=) into the gradients they are given and return the scalar ∂/∂c.
#pragma once
#include <cstdint>
#include <vector>

namespace muse {

inline constexpr double kConeMinNorm = 1e-6;     // premises closer to the origin than this are skipped
inline constexpr double kConeArgClip = 1e-7;     // arccos argument ∈ [−1 + 1e-7, 1 − 1e-7]

struct ConeOptions {
  double K = 0.1;          // `cone_k`: aperture constant
  double violation = 0.0;  // `cone_violation`: a pair violates when E > this (rad)
  double margin = 0.1;     // γ of the max-margin order loss (rad)
};

// ψ(x) for one D-vector; half_aperture_backward adds g·∂ψ/∂x to dx and returns g·∂ψ/∂c.
template <typename T> T half_aperture(const T* x, int D, T c, T K);
template <typename T> T half_aperture_backward(T* dx, T g, const T* x, int D, T c, T K);

// Ξ(x, y); exterior_angle_backward adds g·∂Ξ/∂x to dx and g·∂Ξ/∂y to dy (either may be null) and
// returns g·∂Ξ/∂c.
template <typename T> T exterior_angle(const T* x, const T* y, int D, T c);
template <typename T> T exterior_angle_backward(T* dx, T* dy, T g, const T* x, const T* y, int D, T c);

// Whether the pair has a cone and a direction: ‖x‖ ≥ 1e-6 and x ≠ y.
template <typename T> bool cone_pair_valid(const T* x, const T* y, int D);

// E(x, y) and its backward (same conventions). Call only on valid pairs.
template <typename T> T cone_energy(const T* x, const T* y, int D, T c, T K);
template <typename T> T cone_energy_backward(T* dx, T* dy, T g, const T* x, const T* y, int D, T c, T K);

// Summary of the cone test over pairs (x_r, y_r), r < rows.
struct ConeStats {
  int64_t pairs = 0;           // pairs given
  int64_t skipped = 0;         // of those, x = y or ‖x‖ < 1e-6
  int64_t violations = 0;      // valid pairs with E > options.violation
  double violation_rate = 0;   // violations / valid pairs (0 when none is valid)
  double mean_energy = 0;      // over valid pairs (rad)
  double mean_half_aperture = 0;
  double mean_exterior_angle = 0;
};
template <typename T>
ConeStats cone_stats(const T* x, const T* y, int rows, int D, T c, const ConeOptions& options);

// Max-margin order loss over labelled pairs (x_r, y_r, label_r), label 1 = the premise entails the
// hypothesis, 0 = it does not:
//   L = mean_{label 1} E(x, y) + mean_{label 0} relu(γ − E(x, y))
// (each mean over that label's valid pairs; an empty group contributes 0). Adds g·∂L/∂x, g·∂L/∂y into
// dx, dy (null: not computed) and g·∂L/∂c into *dc (when non-null); returns L.
template <typename T>
T order_loss(T* dx, T* dy, T* dc, T g, const T* x, const T* y, const std::vector<uint8_t>& labels, int D, T c,
             const ConeOptions& options);

}  // namespace muse
