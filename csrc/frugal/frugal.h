// The fused FRUGAL step's device-independent half: the arguments of one call, their checks, and
// each tensor's view as a matrix. The CPU and CUDA files supply only the loops.
#pragma once

#include "frugal_math.h"

#include <ATen/core/Tensor.h>

#include <cmath>
#include <string>
#include <vector>

namespace torch {
class Library;
}

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

// What each backend supplies (common/backend.h).
struct Kernels {
  // The whole step of one call (params non-empty, all on this backend's device).
  void (*step)(const StepArgs& a);
  static void impl_ops(torch::Library& m);  // frugal.cpp
};

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

// Tensor i of a call as raw pointers and its matrix shape: what both backends' loops read (the CUDA
// kernel gets a table of these copied to the device, so it stays trivially copyable).
template <typename scalar_t>
struct TensorPtrs {
  using acc = acc_t<scalar_t>;
  scalar_t* w = nullptr;
  const scalar_t* g = nullptr;
  scalar_t* m = nullptr;
  scalar_t* v = nullptr;
  // kColumns / kRows: the selected columns (rows), k of them, and the moment slot of each (null:
  // slot j is entry j); state_k is the moments' slot count (the `indices` length), their row
  // stride in kColumns. The CPU passes the index list as read (frugal_math.h: a set) in canonical
  // form here; CUDA passes `indices` itself and reads it as a set on the device.
  const int32_t* idx = nullptr;
  const int64_t* slot = nullptr;
  int64_t state_k = 0;
  const scalar_t* base = nullptr;
  const scalar_t* update = nullptr;
  int64_t rows = 0, cols = 0, k = 0;
  int kind = kFree;
  Scalars<acc> s{};
};

template <typename T>
T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

template <typename scalar_t>
TensorPtrs<scalar_t> tensor_ptrs(const StepArgs& a, size_t i) {
  TensorPtrs<scalar_t> T;
  T.w = a.params[i].data_ptr<scalar_t>();
  T.g = a.grads[i].data_ptr<scalar_t>();
  T.m = ptr_or_null<scalar_t>(a.exp_avgs[i]);
  T.v = ptr_or_null<scalar_t>(a.exp_avg_sqs[i]);
  T.idx = ptr_or_null<int32_t>(a.indices[i]);
  T.base = ptr_or_null<scalar_t>(a.residual_bases[i]);
  T.update = ptr_or_null<scalar_t>(a.dense_updates[i]);
  T.rows = matrix_rows(a.params[i]);
  T.cols = matrix_cols(a.params[i]);
  T.k = a.indices[i].defined() ? a.indices[i].numel() : 0;
  T.state_k = T.k;
  T.kind = static_cast<int>(a.kinds[i]);
  T.s = scalars_for<acc_t<scalar_t>>(a, i);
  return T;
}

}  // namespace frugal
}  // namespace fusedtrain
