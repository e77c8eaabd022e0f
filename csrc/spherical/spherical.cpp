// Schemas of the spherical-loss ops and their device-independent halves. The CPU and CUDA files
// supply only row kernels; everything a user can get wrong is checked here, once, for both.
#include "spherical.h"

#include "../common/backend.h"
#include "../common/checks.h"
#include "../common/dispatch.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace fusedtrain {
namespace spherical {
namespace {

int parse_kind(const std::string& kind) {
  if (kind == "z") return kZ;
  if (kind == "spherical") return kSpherical;
  if (kind == "taylor") return kTaylor;
  if (kind == "mse") return kMse;
  FT_CHECK_VALUE(false, "kind must be one of 'z', 'spherical', 'taylor', 'mse', got '", kind, "'");
  return -1;  // not reached
}

}  // namespace

// Shared with the fused linear op (linear_spherical.cpp): declared in spherical.h.
int parse_reduction(const std::string& reduction) {
  if (reduction == "mean") return kMean;
  if (reduction == "sum") return kSum;
  if (reduction == "none") return kNone;
  FT_CHECK_VALUE(false, "reduction must be one of 'mean', 'sum', 'none', got '", reduction, "'");
  return -1;  // not reached
}

Params make_params(const std::string& kind, double a, double b, double eps, double var_eps) {
  Params p{parse_kind(kind), a, b, eps, var_eps};
  check_finite(a, "a");
  check_finite(b, "b");
  check_finite(eps, "eps");
  check_finite(var_eps, "var_eps");
  if (p.kind == kZ) {
    FT_CHECK_VALUE(a > 0, "a must be > 0 for the Z-loss, got ", a);
    FT_CHECK_VALUE(var_eps >= 0, "var_eps must be >= 0, got ", var_eps);
  }
  if (p.kind == kSpherical) FT_CHECK_VALUE(eps > 0, "eps must be > 0, got ", eps);
  return p;
}

namespace {

void check_inputs(const at::Tensor& logits, const at::Tensor& target) {
  check_defined(logits, "logits");
  check_defined(target, "target");
  check_floating(logits, "logits");
  check_dtype(target, at::kLong, "target");
  check_dim(logits, 2, "logits");
  FT_CHECK_VALUE(logits.size(1) >= 1, "logits must have at least one class (D >= 1), got shape ",
                    logits.sizes());
  FT_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0), "target must have shape (",
                    logits.size(0), ",) for logits of shape ", logits.sizes(), ", got ", target.sizes());
  check_same_device(target, logits, "target", "logits");
}

}  // namespace

[[noreturn]] C10_NOINLINE void throw_bad_target(int64_t D, int64_t ignore_index) {
  FT_CHECK_VALUE(false, "target holds class indices outside [0, ", D, ") that are not ignore_index (",
                 ignore_index, ")");
  __builtin_unreachable();
}

at::Tensor mean_count(const at::Tensor& target, int64_t ignore_index, int reduction, at::ScalarType acc) {
  return reduction == kMean ? target.ne(ignore_index).sum().to(acc) : at::Tensor();
}

at::Tensor reduce_loss(const at::Tensor& row_loss, int reduction, const at::Tensor& count, at::ScalarType dtype) {
  if (reduction == kNone) return row_loss.to(dtype);
  at::Tensor loss = row_loss.sum();
  if (reduction == kMean) loss = loss.div(count);
  return loss.to(dtype);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& logits_in, const at::Tensor& target_in, const std::string& kind, double a,
    double b, double eps, double var_eps, int64_t ignore_index, const std::string& reduction,
    bool compute_grad, bool check_target) {
  check_inputs(logits_in, target_in);
  const Params params = make_params(kind, a, b, eps, var_eps);
  const int red = parse_reduction(reduction);
  // With reduction 'none' the gradient depends on the per-row upstream gradient, known only in
  // backward: the forward cannot write it.
  FT_CHECK_VALUE(!(compute_grad && red == kNone),
                 "compute_grad=True needs reduction 'mean' or 'sum', got reduction='none'");
  const int64_t N = logits_in.size(0);
  const auto acc = accumulate_type(logits_in.scalar_type());
  const auto acc_opts = logits_in.options().dtype(acc);

  RowLaunch launch;
  launch.logits = rows_unit_stride(logits_in);
  launch.target = target_in.contiguous();
  launch.ignore_index = ignore_index;
  launch.params = params;
  launch.row_loss = at::empty({N}, acc_opts);
  launch.coef = at::empty({N, kCoefCount}, acc_opts);
  launch.grad = compute_grad ? at::empty(logits_in.sizes(), logits_in.options()) : at::Tensor();
  launch.bad_target = at::zeros({1}, logits_in.options().dtype(at::kInt));
  const at::Tensor count = mean_count(target_in, ignore_index, red, acc);
  if (red == kMean) launch.weight = count.reciprocal();  // the kernel scales coef and grad by 1/count
  if (N > 0) backend<Kernels>(logits_in).rows(launch);
  // One int read back: on CUDA this waits for the kernel. check_target=False skips it.
  if (check_target && N > 0 && launch.bad_target.item<int>() != 0)
    throw_bad_target(logits_in.size(1), ignore_index);
  // The loss stays in the accumulate type: the Python layer returns it in the logits' dtype, or
  // as float32 under autocast, without a round trip through bf16 (fusedtrain/_core/autocast.py).
  const at::Tensor loss = reduce_loss(launch.row_loss, red, count, acc);
  at::Tensor grad = compute_grad ? launch.grad : at::empty({0}, logits_in.options());
  return {loss, grad, launch.coef};
}

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits_in, const at::Tensor& target,
                    const at::Tensor& coef, int64_t ignore_index) {
  check_inputs(logits_in, target);
  const int64_t N = logits_in.size(0);
  const auto acc = accumulate_type(logits_in.scalar_type());
  FT_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == N && coef.size(1) == kCoefCount &&
                        coef.scalar_type() == acc,
                    "coef must be the (N, 4) coefficients saved by spherical_loss, got ", coef.sizes(),
                    " ", coef.scalar_type());
  FT_CHECK_VALUE(grad_loss.numel() == 1 || (grad_loss.dim() == 1 && grad_loss.size(0) == N),
                    "grad_loss must be a scalar or have shape (", N, ",), got ", grad_loss.sizes());
  check_same_device(grad_loss, logits_in, "grad_loss", "logits");
  check_same_device(coef, logits_in, "coef", "logits");
  RowLaunch launch;
  launch.logits = rows_unit_stride(logits_in);
  launch.target = target.contiguous();
  launch.ignore_index = ignore_index;
  launch.coef = coef.contiguous();
  launch.upstream = grad_loss.to(acc).contiguous();
  launch.grad = at::empty(logits_in.sizes(), logits_in.options());
  if (N > 0) backend<Kernels>(logits_in).rows(launch);
  return launch.grad;
}

void scale_grad(at::Tensor& grad, const at::Tensor& grad_loss) {
  check_floating(grad, "grad");
  check_floating(grad_loss, "grad_loss");
  FT_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must hold one element, got shape ",
                    grad_loss.sizes());
  check_same_device(grad_loss, grad, "grad_loss", "grad");
  FT_CHECK_VALUE(grad.is_contiguous(), "grad must be contiguous");
  if (grad.numel() > 0)
    backend<Kernels>(grad).scale(grad, grad_loss.to(accumulate_type(grad.scalar_type())).reshape({}));
}

// The registered ops (schema signatures).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spherical_loss_op(
    const at::Tensor& logits, const at::Tensor& target, c10::string_view kind, double a, double b,
    double eps, double var_eps, int64_t ignore_index, c10::string_view reduction, bool compute_grad,
    bool check_target) {
  const DeviceScope scope(logits);
  return forward(logits, target, std::string(kind), a, b, eps, var_eps, ignore_index,
                 std::string(reduction), compute_grad, check_target);
}

at::Tensor spherical_loss_backward_op(const at::Tensor& grad_loss, const at::Tensor& logits,
                                      const at::Tensor& target, const at::Tensor& coef,
                                      int64_t ignore_index) {
  const DeviceScope scope(logits);
  return backward(grad_loss, logits, target, coef, ignore_index);
}

void scale_grad_op(at::Tensor& grad, const at::Tensor& grad_loss) {
  const DeviceScope scope(grad);
  scale_grad(grad, grad_loss);
}

}  // namespace

void Kernels::impl_ops(torch::Library& m) {
  m.impl("spherical_loss", &spherical_loss_op);
  m.impl("_spherical_loss_backward", &spherical_loss_backward_op);
  m.impl("_scale_grad_", &scale_grad_op);
}

}  // namespace spherical
}  // namespace fusedtrain

TORCH_LIBRARY_FRAGMENT(fusedtrain, m) {
  m.def(
      "spherical_loss(Tensor logits, Tensor target, str kind, float a, float b, float eps, "
      "float var_eps, int ignore_index, str reduction, bool compute_grad, bool check_target) "
      "-> (Tensor loss, Tensor grad_logits, Tensor coef)");
  m.def(
      "_spherical_loss_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor coef, "
      "int ignore_index) -> Tensor");
  m.def("_scale_grad_(Tensor(a!) grad, Tensor grad_loss) -> ()");
}
