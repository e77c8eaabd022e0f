// Schema of the fused FRUGAL step and its argument checks, shared by the CPU and CUDA kernels.
#include "frugal.h"

#include "../common/backend.h"
#include "../common/checks.h"

#include <torch/library.h>

namespace fusedtrain {
namespace frugal {
namespace {

int parse_free_update(const std::string& name) {
  if (name == "signsgd") return kSignSGD;
  if (name == "sgd") return kSGD;
  if (name == "none") return kNone;
  FT_CHECK_VALUE(false, "free_update must be one of 'signsgd', 'sgd', 'none', got '", name, "'");
  return -1;  // not reached
}

// Messages name the entry, e.g. "exp_avgs[3]"; they are built only when a check fails.

// A state or work tensor of tensor i: same dtype and device as the param, contiguous, `numel`
// elements (the moments of a projection hold only the selected part).
void check_companion(const at::Tensor& t, const at::Tensor& param, int64_t numel, const char* list,
                     size_t i) {
  FT_CHECK_VALUE(t.defined(), list, "[", i, "] must be a defined tensor");
  FT_CHECK_TYPE(t.scalar_type() == param.scalar_type(), list, "[", i, "] must have the dtype of params[", i,
                "] (", param.scalar_type(), "), got ", t.scalar_type());
  FT_CHECK_VALUE(t.device() == param.device(), list, "[", i, "] is on ", t.device(), " but params[", i,
                 "] is on ", param.device());
  FT_CHECK_VALUE(t.is_contiguous(), list, "[", i, "] must be contiguous");
  FT_CHECK_VALUE(t.numel() == numel, list, "[", i, "] must hold ", numel, " elements, got shape ", t.sizes());
}

void check_indices(const at::Tensor& idx, const at::Tensor& param, int64_t limit, size_t i) {
  FT_CHECK_VALUE(idx.defined(), "indices[", i, "] must be a defined tensor");
  FT_CHECK_TYPE(idx.scalar_type() == at::kInt, "indices[", i, "] must be int32, got ", idx.scalar_type());
  FT_CHECK_VALUE(idx.dim() == 1 && idx.is_contiguous(), "indices[", i,
                 "] must be a contiguous 1-D tensor, got shape ", idx.sizes());
  FT_CHECK_VALUE(idx.device() == param.device(), "indices[", i, "] is on ", idx.device(), " but params[", i,
                 "] is on ", param.device());
  FT_CHECK_VALUE(idx.numel() <= limit, "indices[", i, "] selects ", idx.numel(), " of only ", limit,
                 " columns/rows");
  // Values are not checked: every backend reads the list as a set (frugal_math.h), the same way.
}

// Checks every argument (names the bad one) and returns them gathered.
StepArgs make_step_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList indices,
                        at::TensorList residual_bases, at::TensorList dense_updates,
                        at::IntArrayRef kinds, at::IntArrayRef steps, double lr, double beta1,
                        double beta2, double eps, double weight_decay, const std::string& free_update,
                        double free_lr_scale) {
  const size_t count = params.size();
  const std::pair<const char*, size_t> lengths[] = {
      {"grads", grads.size()}, {"exp_avgs", exp_avgs.size()}, {"exp_avg_sqs", exp_avg_sqs.size()},
      {"indices", indices.size()}, {"residual_bases", residual_bases.size()},
      {"dense_updates", dense_updates.size()}, {"kinds", kinds.size()}, {"steps", steps.size()}};
  for (const auto& [name, size] : lengths)
    FT_CHECK_VALUE(size == count, name, " must have one entry per param (", count, "), got ", size);
  check_finite(lr, "lr");
  check_finite(eps, "eps");
  check_finite(weight_decay, "weight_decay");
  check_finite(free_lr_scale, "free_lr_scale");
  FT_CHECK_VALUE(lr >= 0, "lr must be >= 0, got ", lr);
  FT_CHECK_VALUE(beta1 >= 0 && beta1 < 1, "beta1 must be in [0, 1), got ", beta1);
  FT_CHECK_VALUE(beta2 >= 0 && beta2 < 1, "beta2 must be in [0, 1), got ", beta2);
  FT_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  FT_CHECK_VALUE(weight_decay >= 0, "weight_decay must be >= 0, got ", weight_decay);
  FT_CHECK_VALUE(free_lr_scale >= 0, "free_lr_scale must be >= 0, got ", free_lr_scale);

  StepArgs a;
  a.free_update = parse_free_update(free_update);
  a.lr = lr; a.beta1 = beta1; a.beta2 = beta2; a.eps = eps; a.weight_decay = weight_decay;
  a.free_lr_scale = free_lr_scale;
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    FT_CHECK_VALUE(p.defined(), "params[", i, "] must be a defined tensor");
    const auto dt = p.scalar_type();
    FT_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, "params[", i,
                  "] must be float32, float64, bfloat16 or float16, got ", dt);
    FT_CHECK_TYPE(dt == params[0].scalar_type(), "params[", i, "] is ", dt, " but params[0] is ",
                  params[0].scalar_type(), " (one call per dtype)");
    FT_CHECK_VALUE(p.device() == params[0].device(), "params[", i, "] is on ", p.device(),
                   " but params[0] is on ", params[0].device());
    FT_CHECK_VALUE(p.is_contiguous(), "params[", i, "] must be contiguous");
    const at::Tensor& g = grads[i];
    FT_CHECK_VALUE(g.defined(), "grads[", i, "] must be a defined tensor");
    FT_CHECK_VALUE(g.layout() == at::kStrided, "grads[", i, "] is sparse: FRUGAL needs dense gradients");
    FT_CHECK_VALUE(g.sizes() == p.sizes(), "grads[", i, "] must have the shape of params[", i, "] ", p.sizes(),
                   ", got ", g.sizes());
    check_companion(g, p, p.numel(), "grads", i);

    const int64_t kind = kinds[i];
    FT_CHECK_VALUE(kind >= 0 && kind < kKindCount, "kinds[", i, "] must be in [0, ", int(kKindCount),
                   "), got ", kind);
    const bool adam = kind == kDense || kind == kColumns || kind == kRows;
    FT_CHECK_VALUE(!adam || steps[i] >= 1, "steps[", i, "] must be >= 1 (Adam steps taken, this one included), got ",
                   steps[i]);
    const int64_t rows = matrix_rows(p), cols = matrix_cols(p);
    const int64_t k = indices[i].defined() ? indices[i].numel() : 0;
    int64_t state_numel = 0;
    if (kind == kDense) state_numel = p.numel();
    if (kind == kColumns || kind == kRows) {
      check_indices(indices[i], p, kind == kColumns ? cols : rows, i);
      state_numel = kind == kColumns ? rows * k : k * cols;
    }
    if (adam) {
      check_companion(exp_avgs[i], p, state_numel, "exp_avgs", i);
      check_companion(exp_avg_sqs[i], p, state_numel, "exp_avg_sqs", i);
    }
    if (kind == kResidual) {
      check_companion(residual_bases[i], p, p.numel(), "residual_bases", i);
      check_companion(dense_updates[i], p, p.numel(), "dense_updates", i);
    }
    a.params.push_back(p);
    a.grads.push_back(g);
    a.exp_avgs.push_back(adam ? exp_avgs[i] : at::Tensor());
    a.exp_avg_sqs.push_back(adam ? exp_avg_sqs[i] : at::Tensor());
    a.indices.push_back(kind == kColumns || kind == kRows ? indices[i] : at::Tensor());
    a.residual_bases.push_back(kind == kResidual ? residual_bases[i] : at::Tensor());
    a.dense_updates.push_back(kind == kResidual ? dense_updates[i] : at::Tensor());
    a.kinds.push_back(kind);
    a.steps.push_back(steps[i]);
  }
  return a;
}

// The registered op (schema signature).
void frugal_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList indices, at::TensorList residual_bases,
                    at::TensorList dense_updates, at::IntArrayRef kinds, at::IntArrayRef steps, double lr,
                    double beta1, double beta2, double eps, double weight_decay, c10::string_view free_update,
                    double free_lr_scale) {
  const Kernels* kernels = params.empty() ? nullptr : &backend<Kernels>(params[0]);
  const StepArgs a = make_step_args(params, grads, exp_avgs, exp_avg_sqs, indices, residual_bases,
                                    dense_updates, kinds, steps, lr, beta1, beta2, eps, weight_decay,
                                    std::string(free_update), free_lr_scale);
  if (a.params.empty()) return;
  const DeviceScope scope(a.params[0]);
  kernels->step(a);
}

}  // namespace

void Kernels::impl_ops(torch::Library& m) { m.impl("frugal_step_", &frugal_step_op); }

}  // namespace frugal
}  // namespace fusedtrain

TORCH_LIBRARY_FRAGMENT(fusedtrain, m) {
  m.def(
      "frugal_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor[] indices, Tensor[] residual_bases, Tensor[] dense_updates, int[] kinds, int[] steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, str free_update, "
      "float free_lr_scale) -> ()");
}
