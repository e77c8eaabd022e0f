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
#include <limits>

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

// Scaled row statistics (as BLAS nrm2 scales): when q = Σ(o_k − K)² would overflow the accumulate
// type, or its reciprocal (β ~ 1/q) underflow, a row's statistics are taken divided by a power of
// two S ≈ max|o_k|: s/S, q/S², exactly representable scalings. Rows with q above this bound are
// re-summed scaled (rare: |o| beyond about 2^32 in fp32, 2^256 in fp64); the MSE never needs it (its
// q overflows only when its loss does).
template <typename T>
FT_HOST_DEVICE inline T scaled_stats_bound() {
  return sizeof(T) >= 8 ? T(1.3407807929942597e154) /* 2^512 */ : T(1.8446744073709552e19) /* 2^64 */;
}
template <typename T>
FT_HOST_DEVICE inline bool wants_scaled_stats(int kind, T q) {
  return kind != kMse && q > scaled_stats_bound<T>();
}
// The power of two S = 2^e with m/S in [1, 2) for a finite m > 0: returns 1/S and log(S).
template <typename T>
FT_HOST_DEVICE inline void power_of_two_scale(T m, T& inv_scale, T& log_scale) {
  using std::ilogb; using std::ldexp;
  const int e = ilogb(m);
  inv_scale = ldexp(T(1), -e);
  log_scale = T(e) * T(0.693147180559945309417232121458176568);
}

// log(x² + c) and 2x/(x² + c) for c >= 0 without overflow of x² (|x| up to the type's maximum).
template <typename T>
FT_HOST_DEVICE inline void log_square_plus(T x, T c, T& log_value, T& two_x_over) {
  using std::log; using std::log1p; using std::fabs; using std::isinf;
  const T v = x * x + c;
  if (isinf(v) && !isinf(x)) {  // x² overflowed: factor it out
    const T r = T(1) / x;
    log_value = T(2) * log(fabs(x)) + log1p(c * r * r);
    two_x_over = T(2) * r / (T(1) + c * r * r);
  } else {
    log_value = log(v);
    two_x_over = T(2) * x / v;
  }
}

// s, q: sums over the row of (o_k − K)/S and ((o_k − K)/S)² (S = 1/inv_scale, log_scale = log S:
// 1 and 0 for unscaled statistics); oc: o_c − K, not scaled; D: row length. The returned `beta` is
// β·S, the coefficient of (o_k − K)/S:  ∂L/∂o_k = α + beta·(o_k − K)/S + γ·[k = c]. NaN statistics give
// NaN coefficients and loss (the clamp below lets NaN through); statistics that overflowed (q = inf
// from finite logits, e.g. the fused linear op's Gram matrix) give NaN for the Z-loss, inf for the
// others, never a finite value.
template <typename T>
FT_HOST_DEVICE inline RowCoefficients<T> row_coefficients(T s, T q, T oc, T D, const Params& p,
                                                          T inv_scale = T(1), T log_scale = T(0)) {
  using std::log; using std::sqrt; using std::isinf;
  RowCoefficients<T> r;
  const T inv2 = inv_scale * inv_scale;
  switch (p.kind) {
    case kZ: {
      // μ = s/D, v = q/D − μ², σ² = max(v, 0) + var_eps, z_c = (o_c − μ)/σ,
      // L = softplus(a(b − z_c))/a, all in units of S (z_c is scale free). Chain rule through the
      // clamp (torch.clamp's convention: the gradient passes where v >= 0); NaN passes the clamp.
      const T a = T(p.a), b = T(p.b);
      const T mu = s / D;
      const T v = q / D - mu * mu;
      const bool through = !(v < T(0));
      const T var = (through ? v : T(0)) + T(p.var_eps) * inv2;
      // An infinite variance from finite statistics is an overflow: z_c would be a plausible 0.
      const T sigma = isinf(var) ? std::numeric_limits<T>::quiet_NaN() : sqrt(var);
      const T z = (oc * inv_scale - mu) / sigma;
      const T t = a * (b - z);
      const T g = sigmoid(t);  // = −∂L/∂z_c
      r.loss = softplus(t) / a;
      r.gamma = -g / sigma * inv_scale;
      r.beta = through ? g * z / (var * D) * inv_scale : T(0);
      r.alpha = g / (sigma * D) * inv_scale * (T(1) - (through ? z * mu / sigma : T(0)));
      break;
    }
    case kSpherical: {
      // L = log(q + D·eps) − log(o_c² + eps); the first log in units of S² plus 2·log S.
      const T eps = T(p.eps);
      const T denom = q + D * eps * inv2;
      T log_num, two_oc_over_num;
      log_square_plus(oc, eps, log_num, two_oc_over_num);
      r.loss = log(denom) + T(2) * log_scale - log_num;
      r.alpha = T(0);
      r.beta = T(2) / denom * inv_scale;
      r.gamma = -two_oc_over_num;
      break;
    }
    case kTaylor: {
      // L = log(D + s + q/2) − log(1 + o_c + o_c²/2); both arguments are > 0 for any real input.
      // The first in units of S² plus 2·log S; the second factors out o_c² where that overflows.
      const T denom = D * inv2 + s * inv_scale + T(0.5) * q;
      const T num = T(1) + oc + T(0.5) * oc * oc;
      T log_num, ratio;  // ratio = (1 + o_c)/num
      if (isinf(num) && !isinf(oc)) {
        const T x = T(1) / oc, top = x * (T(1) + x);  // (1 + o_c)/o_c², num/o_c² = 1/2 + top
        log_num = T(2) * log(std::fabs(oc)) + log(T(0.5) + top);
        ratio = top / (T(0.5) + top);
      } else {
        log_num = log(num);
        ratio = (T(1) + oc) / num;
      }
      r.loss = log(denom) + T(2) * log_scale - log_num;
      r.beta = T(1) / denom * inv_scale;
      r.alpha = r.beta * inv_scale;
      r.gamma = -ratio;
      break;
    }
    default: {  // kMse: L = q − 2·o_c + 1, never scaled (wants_scaled_stats)
      r.loss = q - T(2) * oc + T(1);
      r.alpha = T(0);
      r.beta = T(2);
      r.gamma = T(-2);
      break;
    }
  }
  return r;
}

// Coefficient layout of the saved (N, 4) tensor: weighted α, β·S, γ, and 1/S signed by the shift:
// −1/S when the row is shifted by its target logit (K = o_c, read back from the logits), +1/S when
// K = 0. The gradient is α + (β·S)·(o_k/S − K/S) + γ·[k = c].
constexpr int kCoefAlpha = 0, kCoefBeta = 1, kCoefGamma = 2, kCoefScale = 3, kCoefCount = 4;

// The signed scale slot and back.
template <typename T>
FT_HOST_DEVICE inline T encode_scale(T inv_scale, bool shifted) { return shifted ? -inv_scale : inv_scale; }
template <typename T>
FT_HOST_DEVICE inline T decoded_inv_scale(T slot) { return slot < T(0) ? -slot : slot; }
template <typename T>
FT_HOST_DEVICE inline T decoded_shift(T slot, T target_logit) { return slot < T(0) ? target_logit : T(0); }

// A target is usable when it is ignore_index (row skipped) or a class in [0, D).
FT_HOST_DEVICE inline bool target_is_valid(int64_t c, int64_t D, int64_t ignore_index) {
  return c == ignore_index || (c >= 0 && c < D);
}

}  // namespace spherical
}  // namespace fusedtrain
