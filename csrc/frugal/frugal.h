// The fused FRUGAL step's device-independent half: the arguments of one call, their checks, and
// each tensor's view as a matrix. The CPU and CUDA files supply only the loops.
#pragma once

#include "frugal_math.h"

#include <ATen/core/Tensor.h>

#include <cmath>
#include <string>
#include <vector>

namespace fusedtrain {
namespace frugal {

// One call of frugal_step_: every list has one entry per tensor (empty tensors where a kind has
// nothing there: no moments for kFree, no indices outside kColumns/kRows, no residual_bases /
// dense_updates outside kResidual). All params share one dtype and device.
struct StepArgs {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, indices, residual_bases, dense_updates;
  std::vector<int64_t> kinds, steps;
  double lr, beta1, beta2, eps, weight_decay, free_lr_scale;
  int free_update;
};

// A tensor seen as an (rows x cols) matrix: dim >= 2 as (size(0), rest), 1-D as one row.
inline int64_t matrix_rows(const at::Tensor& t) { return t.dim() >= 2 ? t.size(0) : 1; }
inline int64_t matrix_cols(const at::Tensor& t) {
  if (t.dim() < 2) return t.numel();
  int64_t cols = 1;
  for (int64_t d = 1; d < t.dim(); ++d) cols *= t.size(d);
  return cols;
}

// Checks every argument (names the bad one) and returns them gathered; `validate_index_values`
// also reads the index tensors (range, strictly increasing): only where that costs no sync (CPU).
StepArgs make_step_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList indices,
                        at::TensorList residual_bases, at::TensorList dense_updates,
                        at::IntArrayRef kinds, at::IntArrayRef steps, double lr, double beta1,
                        double beta2, double eps, double weight_decay, const std::string& free_update,
                        double free_lr_scale, bool validate_index_values);

// Tensor i's constants (bias corrections in double, then rounded to the accumulate type).
template <typename acc>
Scalars<acc> scalars_for(const StepArgs& a, size_t i) {
  const bool adam = a.kinds[i] == kDense || a.kinds[i] == kColumns || a.kinds[i] == kRows;
  const double t = adam ? static_cast<double>(a.steps[i]) : 1.0;
  const double bc1 = 1.0 - std::pow(a.beta1, t);
  const double bc2 = 1.0 - std::pow(a.beta2, t);
  Scalars<acc> s;
  s.decay = static_cast<acc>(1.0 - a.lr * a.weight_decay);
  s.lr = static_cast<acc>(a.lr);
  s.step_size = static_cast<acc>(a.lr / bc1);
  s.bc2_sqrt = static_cast<acc>(std::sqrt(bc2));
  s.free_scale = static_cast<acc>(a.lr * a.free_lr_scale);
  s.one_minus_b1 = static_cast<acc>(1.0 - a.beta1);
  s.beta2 = static_cast<acc>(a.beta2);
  s.one_minus_b2 = static_cast<acc>(1.0 - a.beta2);
  s.eps = static_cast<acc>(a.eps);
  s.free_update = a.free_update;
  return s;
}

}  // namespace frugal
}  // namespace fusedtrain
