// The spherical-loss ops' device-independent halves (argument checks, allocation, reductions),
// and the interface each backend's row kernels implement.
#pragma once

#include "spherical_math.h"

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace torch {
class Library;
}

namespace fusedtrain {
namespace spherical {

// What one launch of a backend's row kernel reads and writes. Rows are unit-stride, `row_stride`
// apart. Forward mode (upstream undefined): per-row statistics -> row_loss, coef (weighted by
// `weight`, a 0-dim accumulate-type tensor or undefined for 1) and, when `grad` is defined, the
// weighted gradient. Backward mode (upstream defined, shape () or (N,)): grad = upstream_n·(α + β·(o−K)
// + γ·e_c) from the saved coef.
struct RowLaunch {
  at::Tensor logits;     // (N, D), stride(1) == 1
  at::Tensor target;     // (N,) int64, contiguous
  int64_t ignore_index;
  Params params;
  at::Tensor weight;     // forward: 1/count for "mean", else undefined
  at::Tensor row_loss;   // forward: (N,) accumulate type
  at::Tensor coef;       // (N, 4) accumulate type: written in forward, read in backward
  at::Tensor grad;       // (N, D) contiguous, logits dtype; undefined when not written
  at::Tensor upstream;   // backward: () or (N,) accumulate type; undefined in forward
  at::Tensor bad_target; // forward: int32 (1,) set to 1 when a target is out of range
};

// The launch as raw pointers, the form both backends' row loops take.
template <typename scalar_t>
struct RowPointers {
  using acc = acc_t<scalar_t>;
  const scalar_t* logits = nullptr;
  int64_t stride = 0, N = 0, D = 0;
  const int64_t* target = nullptr;
  int64_t ignore_index = 0;
  Params params{};
  const acc* weight = nullptr;    // forward: reduction weight, or null for 1
  acc* row_loss = nullptr;        // forward
  acc* coef = nullptr;            // written in forward, read in backward
  scalar_t* grad = nullptr;       // null in a forward that writes no gradient
  const acc* upstream = nullptr;  // backward only (null in forward)
  int64_t up_stride = 0;          // 0 for a scalar upstream gradient, 1 for per-row
  int* bad = nullptr;             // forward: set to 1 when a target is out of range
};

template <typename scalar_t>
RowPointers<scalar_t> row_pointers(const RowLaunch& L) {
  using acc = acc_t<scalar_t>;
  RowPointers<scalar_t> p;
  p.logits = L.logits.data_ptr<scalar_t>();
  p.stride = L.logits.stride(0);
  p.N = L.logits.size(0);
  p.D = L.logits.size(1);
  p.target = L.target.data_ptr<int64_t>();
  p.ignore_index = L.ignore_index;
  p.params = L.params;
  p.coef = L.coef.data_ptr<acc>();
  p.grad = L.grad.defined() ? L.grad.data_ptr<scalar_t>() : nullptr;
  if (L.upstream.defined()) {
    p.upstream = L.upstream.data_ptr<acc>();
    p.up_stride = L.upstream.numel() == 1 ? 0 : 1;
  } else {
    p.weight = L.weight.defined() ? L.weight.data_ptr<acc>() : nullptr;
    p.row_loss = L.row_loss.data_ptr<acc>();
    p.bad = L.bad_target.data_ptr<int>();
  }
  return p;
}

// Argument parsing and conventions shared by the logits-level and the fused linear op.
Params make_params(const std::string& kind, double a, double b, double eps, double var_eps);
int parse_reduction(const std::string& reduction);
[[noreturn]] void throw_bad_target(int64_t D, int64_t ignore_index);
// For reduction 'mean': the kept rows (target != ignore_index), counted on the device (no sync), in
// the accumulate type `acc`; undefined for 'sum' and 'none'.
at::Tensor mean_count(const at::Tensor& target, int64_t ignore_index, int reduction, at::ScalarType acc);
// The loss of per-row losses: the rows for 'none', else their sum (divided by `count` for 'mean':
// 0/0 = NaN when every row is ignored, as torch), converted to `dtype`.
at::Tensor reduce_loss(const at::Tensor& row_loss, int reduction, const at::Tensor& count, at::ScalarType dtype);

// What each backend supplies (common/backend.h).
struct Kernels {
  // The row kernel of one launch, forward or backward (RowLaunch::upstream decides).
  void (*rows)(const RowLaunch& launch);
  // grad *= factor (a 0-dim accumulate-type tensor), in place.
  void (*scale)(at::Tensor& grad, const at::Tensor& factor);
  static void impl_ops(torch::Library& m);  // spherical.cpp
};

}  // namespace spherical
}  // namespace fusedtrain
