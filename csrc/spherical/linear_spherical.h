// The fused linear spherical loss (spec/spherical.md, "Fused linear op"): o = W·h + bias is never
// formed. With the bias folded in as W' = [W | bias], h' = [h, 1], the column sums w̄' = W'ᵀ·1 and the
// centered Gram matrix C = Σ_k (W'_k − w̄'/D)(W'_k − w̄'/D)ᵀ give per row  s = h'·w̄',
// qc = Σ_k (o_k − s/D)² = h'·p  (p = C·h', the row's "projection"),  o_c = W_c·h + bias_c,  and the
// row's loss and gradient coefficients come from the same row_coefficients() as the logits-level op
// (spherical_math.h). With ∂L/∂o_k = α + β·(o_k − s/D) + γ·[k = c]:
//   ∂L/∂h  = α·w̄ + β·p + γ·W_c                                  (first d entries)
//   ∂L/∂W' = 1·(a − M'·w̄'/D)ᵀ + W'·M' + Σ_n γ_n·e_{c_n}·h'_nᵀ,  a = Σ α_n h'_n,  M' = Σ β_n h'_n h'_nᵀ.
// This header is the interface between the device-independent half (linear_spherical.cpp: checks,
// the dense products through at::mm, reductions) and each backend's three row kernels.
#pragma once

#include "spherical.h"

#include <ATen/core/Tensor.h>

#include <array>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace fusedtrain {
namespace spherical {
namespace linear {

// Per-row coefficients saved by the forward, (N, 3) in the accumulate type, already multiplied by
// the reduction weight (1/count for "mean"), in the row-centered form
//   ∂L/∂o_k = α + β·(o_k − μ) + γ·[k = c],   μ = s/D the row's mean logit,
// which is what the centered Gram matrix C (see gram()) turns into ∂L/∂h = α·w̄ + β·C·h' + γ·W_c.
constexpr int kAlpha = 0, kBeta = 1, kGamma = 2, kCoefs = 3;

// A row's loss and centered coefficients from s = h'·w̄', the centered spread qc = h'ᵀCh'
// = Σ(o_k − μ)² and o_c, through the logits-level op's row_coefficients (spherical_math.h). The
// shift-invariant Z-loss takes its statistics about μ (s − D·μ = 0, no cancellation at all); the
// other kinds need q about 0, q = qc + s·μ (a sum of two non-negative terms), and their
// α + β·o_k = (α + β·μ) + β·(o_k − μ). Where q would overflow (or 1/q underflow) s and q go in units
// of S ≈ max(√qc, |s|) as in the logits-level op; a non-finite qc (an overflowed Gram matrix) stays
// as it is and gives NaN or inf. Shared by the CPU and CUDA kernels.
template <typename acc>
FT_HOST_DEVICE inline RowCoefficients<acc> centered_row_coefficients(acc s, acc qc, acc oc, acc D,
                                                                     const Params& p) {
  using std::fabs; using std::isfinite; using std::sqrt;
  const acc mu = s / D;
  RowCoefficients<acc> r;
  if (shifts_by_target(p.kind)) {
    r = row_coefficients<acc>(acc(0), qc, oc - mu, D, p);
  } else {
    acc q = qc + s * mu, inv = acc(1), log_scale = acc(0), ss = s;
    if (wants_scaled_stats(p.kind, q)) {
      const acc m = sqrt(qc) > fabs(s) ? sqrt(qc) : fabs(s);
      if (isfinite(m) && m > acc(0)) {
        power_of_two_scale(m, inv, log_scale);
        ss = s * inv;
        q = qc * inv * inv + ss * (mu * inv);
      }
    }
    r = row_coefficients<acc>(ss, q, oc, D, p, inv, log_scale);
    r.alpha += r.beta * (mu * inv);  // r.beta is β·S
    r.beta *= inv;
  }
  if (!(isfinite(s) && isfinite(qc) && isfinite(oc))) {
    // Non-finite operands (input, weight, bias or stats=) or an overflowed Gram matrix: the loss
    // is not finite, and neither may any gradient be (the MSE's coefficients, or a β of 2/inf = 0,
    // would leave the weight gradient finite).
    const acc nan = std::numeric_limits<acc>::quiet_NaN();
    r.alpha = r.beta = r.gamma = nan;
    if (isfinite(r.loss)) r.loss = nan;
  }
  return r;
}

// Whether a row with target c gathers nothing: c is ignore_index or out of range. Its outputs then
// hold `fill`: 0 for an ignored row, NaN for an out-of-range target (which the forward flags).
// Shared by the CPU and CUDA kernels.
template <typename acc>
FT_HOST_DEVICE inline bool skips_row(int64_t c, int64_t D, int64_t ignore_index, acc& fill) {
  if (!(c == ignore_index || !target_is_valid(c, D, ignore_index))) return false;
  fill = c == ignore_index ? acc(0) : std::numeric_limits<acc>::quiet_NaN();
  return true;
}

// Forward rows: s, qc, o_c -> row_loss, coef; flags out-of-range targets.
struct ForwardLaunch {
  at::Tensor input;      // (N, d), stride(1) == 1
  at::Tensor weight;     // (D, d), stride(1) == 1
  at::Tensor bias;       // (D,) contiguous, or undefined
  at::Tensor target;     // (N,) int64 contiguous
  at::Tensor colsum;     // (d',) accumulate type, d' = d + has_bias
  at::Tensor proj;       // (N, d') accumulate type, contiguous: rows of H'·C
  int64_t ignore_index;
  Params params;
  at::Tensor scale;      // 0-dim accumulate type (1/count for "mean") or undefined for 1
  at::Tensor row_loss;   // (N,) accumulate type
  at::Tensor coef;       // (N, 3) accumulate type
  at::Tensor bad_target; // int32 (1,), set to 1 when a target is out of range
};

// Backward rows: grad_input[n] = α·w̄ + β·p_n + γ·W_{c_n} with upstream-scaled coefficients
// (p_n = C·h'_n, the first d entries).
struct InputGradLaunch {
  at::Tensor weight, target, colsum, proj;
  at::Tensor coef;        // (N, 3) accumulate type, upstream gradient included
  int64_t ignore_index;
  at::Tensor grad_input;  // (N, d) input dtype, contiguous
};

// Target-row scatter: grad_weight[c] += Σ_{n: c_n = c} γ_n·h_n, grad_bias[c] += Σ γ_n, one segment of
// the stably sorted targets at a time, in sorted order: deterministic, no atomics.
struct ScatterLaunch {
  at::Tensor input;        // (N, d), stride(1) == 1
  at::Tensor coef;         // (N, 3) accumulate type, upstream gradient included
  at::Tensor sorted_key;   // (N,) int64: the target, or D for rows that scatter nothing
  at::Tensor order;        // (N,) int64: row of each sorted key
  at::Tensor grad_weight;  // (D, d) contiguous, or undefined
  at::Tensor grad_bias;    // (D,) contiguous, or undefined
};

// What each backend supplies (common/backend.h).
struct Kernels {
  void (*forward)(const ForwardLaunch&);
  void (*input_grad)(const InputGradLaunch&);
  void (*scatter)(const ScatterLaunch&);
  static void impl_ops(torch::Library& m);  // linear_spherical.cpp
};

}  // namespace linear
}  // namespace spherical
}  // namespace fusedtrain
