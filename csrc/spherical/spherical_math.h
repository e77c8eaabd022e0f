// Per-row math of the spherical losses (spec/spherical.md), shared by the CPU and CUDA kernels.
//
// A row's loss depends on its logits `o` only through s = Σ(o_k − K), q = Σ(o_k − K)² and o_c − K,
// and its gradient is  ∂L/∂o_k = α + β·(o_k − K) + γ·[k = c]. The shift K is 0 for every kind but the
// Z-loss, which is shift invariant: there K = o_c, so the variance is computed about a value inside
// the row and large common offsets do not cancel catastrophically in q/D − μ².
#pragma once

#include "../common/math.h"

#include <cmath>
#include <cstdint>

namespace fusedtrain {
namespace spherical {

enum Kind : int { kZ = 0, kSpherical = 1, kTaylor = 2, kMse = 3 };
enum Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

// Hyperparameters, passed by value to kernels.
struct Params {
  int kind;
  double a, b, eps, var_eps;
};

// Loss and gradient coefficients of one row. (α, β, γ) as in the header comment; `shift` is K.
template <typename T>
struct RowCoefficients {
  T loss, alpha, beta, gamma;
};

// Whether the row's statistics are taken about K = o_c (else about 0).
FT_HOST_DEVICE inline bool shifts_by_target(int kind) { return kind == kZ; }

// s, q: shifted sums over the row; oc: shifted target logit (0 when shifted by it); D: row length.
template <typename T>
FT_HOST_DEVICE inline RowCoefficients<T> row_coefficients(T s, T q, T oc, T D, const Params& p) {
  using std::log; using std::sqrt;
  RowCoefficients<T> r;
  switch (p.kind) {
    case kZ: {
      // μ = s/D, v = q/D − μ², σ² = max(v, 0) + var_eps, z_c = (o_c − μ)/σ,
      // L = softplus(a(b − z_c))/a. Chain rule through the clamp (torch.clamp's convention: the
      // gradient passes where v >= 0).
      const T a = T(p.a), b = T(p.b);
      const T mu = s / D;
      const T v = q / D - mu * mu;
      const bool through = v >= T(0);
      const T var = (through ? v : T(0)) + T(p.var_eps);
      const T sigma = sqrt(var);
      const T z = (oc - mu) / sigma;
      const T t = a * (b - z);
      const T g = sigmoid(t);  // = −∂L/∂z_c
      r.loss = softplus(t) / a;
      r.gamma = -g / sigma;
      r.beta = through ? g * z / (var * D) : T(0);
      r.alpha = g / (sigma * D) * (T(1) - (through ? z * mu / sigma : T(0)));
      break;
    }
    case kSpherical: {
      // L = log(q + D·eps) − log(o_c² + eps)
      const T eps = T(p.eps);
      const T denom = q + D * eps;
      const T num = oc * oc + eps;
      r.loss = log(denom) - log(num);
      r.alpha = T(0);
      r.beta = T(2) / denom;
      r.gamma = -T(2) * oc / num;
      break;
    }
    case kTaylor: {
      // L = log(D + s + q/2) − log(1 + o_c + o_c²/2); both arguments are > 0 for any real input.
      const T denom = D + s + T(0.5) * q;
      const T num = T(1) + oc + T(0.5) * oc * oc;
      r.loss = log(denom) - log(num);
      r.alpha = T(1) / denom;
      r.beta = T(1) / denom;
      r.gamma = -(T(1) + oc) / num;
      break;
    }
    default: {  // kMse: L = q − 2·o_c + 1
      r.loss = q - T(2) * oc + T(1);
      r.alpha = T(0);
      r.beta = T(2);
      r.gamma = T(-2);
      break;
    }
  }
  return r;
}

// Coefficient layout of the saved (N, 4) tensor: weighted α, β, γ and the shift K.
constexpr int kCoefAlpha = 0, kCoefBeta = 1, kCoefGamma = 2, kCoefShift = 3, kCoefCount = 4;

// A target is usable when it is ignore_index (row skipped) or a class in [0, D).
FT_HOST_DEVICE inline bool target_is_valid(int64_t c, int64_t D, int64_t ignore_index) {
  return c == ignore_index || (c >= 0 && c < D);
}

}  // namespace spherical
}  // namespace fusedtrain
