// The spherical-loss ops' device-independent halves (argument checks, allocation, reductions),
// and the interface each backend's row kernels implement.
#pragma once

#include "spherical_math.h"

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

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

using RowKernel = void (*)(const RowLaunch&);
using ScaleKernel = void (*)(at::Tensor& grad, const at::Tensor& factor);

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& logits, const at::Tensor& target, const std::string& kind, double a, double b,
    double eps, double var_eps, int64_t ignore_index, const std::string& reduction, bool compute_grad,
    bool check_target, RowKernel kernel);

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                    const at::Tensor& coef, int64_t ignore_index, RowKernel kernel);

void scale_grad(at::Tensor& grad, const at::Tensor& grad_loss, ScaleKernel kernel);

}  // namespace spherical
}  // namespace fusedtrain
