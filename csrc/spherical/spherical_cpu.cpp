// CPU kernels of the spherical losses: rows in parallel, two passes per row while it is in cache
// (statistics, then the gradient), so the logits are read from memory once and the gradient written
// once. Loops keep kLanes independent accumulators so the compiler vectorizes them without
// reassociating a single running sum.
#include "spherical.h"
#include "../common/dispatch.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

namespace fusedtrain {
namespace spherical {
namespace {

constexpr int kLanes = 16;

template <typename scalar_t, typename acc>
inline void shifted_sums(const scalar_t* row, int64_t D, acc shift, acc& s_out, acc& q_out) {
  acc s[kLanes] = {}, q[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= D; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc x = static_cast<acc>(row[k + j]) - shift;
      s[j] += x;
      q[j] += x * x;
    }
  }
  for (int j = 0; k < D; ++k, ++j) {
    const acc x = static_cast<acc>(row[k]) - shift;
    s[j] += x;
    q[j] += x * x;
  }
  acc st = 0, qt = 0;
  for (int j = 0; j < kLanes; ++j) { st += s[j]; qt += q[j]; }
  s_out = st;
  q_out = qt;
}

// out_k = alpha + beta·(o_k − shift), then the target column gets gamma on top.
template <typename scalar_t, typename acc>
inline void write_row_gradient(const scalar_t* row, scalar_t* out, int64_t D, int64_t c, acc alpha,
                               acc beta, acc gamma, acc shift) {
  // β·(o − K), not (α − βK) + β·o: with a large common offset the latter cancels catastrophically.
  for (int64_t k = 0; k < D; ++k)
    out[k] = static_cast<scalar_t>(alpha + beta * (static_cast<acc>(row[k]) - shift));
  out[c] = static_cast<scalar_t>(alpha + beta * (static_cast<acc>(row[c]) - shift) + gamma);
}

template <typename scalar_t>
void forward_rows(const RowLaunch& L) {
  using acc = acc_t<scalar_t>;
  const int64_t N = L.logits.size(0), D = L.logits.size(1), stride = L.logits.stride(0);
  const scalar_t* logits = L.logits.data_ptr<scalar_t>();
  const int64_t* target = L.target.data_ptr<int64_t>();
  acc* row_loss = L.row_loss.data_ptr<acc>();
  acc* coef = L.coef.data_ptr<acc>();
  scalar_t* grad = L.grad.defined() ? L.grad.data_ptr<scalar_t>() : nullptr;
  const acc weight = L.weight.defined() ? L.weight.item<acc>() : acc(1);
  const Params p = L.params;
  const acc Dacc = static_cast<acc>(D);
  std::atomic<int> bad{0};
  const int64_t grain = std::max<int64_t>(1, 16384 / D);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = logits + n * stride;
      const int64_t c = target[n];
      acc* cf = coef + n * kCoefCount;
      scalar_t* grow = grad ? grad + n * D : nullptr;
      if (c == L.ignore_index || !target_is_valid(c, D, L.ignore_index)) {
        // Ignored rows contribute nothing; out-of-range rows are NaN and flagged.
        const bool ignored = c == L.ignore_index;
        const acc fill = ignored ? acc(0) : std::numeric_limits<acc>::quiet_NaN();
        if (!ignored) bad.store(1, std::memory_order_relaxed);
        row_loss[n] = fill;
        for (int j = 0; j < kCoefCount; ++j) cf[j] = fill;
        if (grow) std::fill(grow, grow + D, static_cast<scalar_t>(fill));
        continue;
      }
      const acc oc = static_cast<acc>(row[c]);
      const acc shift = shifts_by_target(p.kind) ? oc : acc(0);
      acc s, q;
      shifted_sums(row, D, shift, s, q);
      const RowCoefficients<acc> r = row_coefficients<acc>(s, q, oc - shift, Dacc, p);
      row_loss[n] = r.loss;
      cf[kCoefAlpha] = weight * r.alpha;
      cf[kCoefBeta] = weight * r.beta;
      cf[kCoefGamma] = weight * r.gamma;
      cf[kCoefShift] = shift;
      if (grow) write_row_gradient(row, grow, D, c, cf[kCoefAlpha], cf[kCoefBeta], cf[kCoefGamma], shift);
    }
  });
  if (bad.load()) L.bad_target.fill_(1);
}

template <typename scalar_t>
void backward_rows(const RowLaunch& L) {
  using acc = acc_t<scalar_t>;
  const int64_t N = L.logits.size(0), D = L.logits.size(1), stride = L.logits.stride(0);
  const scalar_t* logits = L.logits.data_ptr<scalar_t>();
  const int64_t* target = L.target.data_ptr<int64_t>();
  const acc* coef = L.coef.data_ptr<acc>();
  const acc* up = L.upstream.data_ptr<acc>();
  const int64_t up_stride = L.upstream.numel() == 1 ? 0 : 1;
  scalar_t* grad = L.grad.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / D);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t c = target[n];
      scalar_t* grow = grad + n * D;
      if (c == L.ignore_index) {
        std::fill(grow, grow + D, static_cast<scalar_t>(0));
        continue;
      }
      const acc* cf = coef + n * kCoefCount;
      const acc g = up[n * up_stride];
      if (!target_is_valid(c, D, L.ignore_index)) {  // forward flagged it; keep it NaN
        std::fill(grow, grow + D, static_cast<scalar_t>(std::numeric_limits<acc>::quiet_NaN()));
        continue;
      }
      write_row_gradient(logits + n * stride, grow, D, c, g * cf[kCoefAlpha], g * cf[kCoefBeta],
                         g * cf[kCoefGamma], cf[kCoefShift]);
    }
  });
}

void row_kernel_cpu(const RowLaunch& L) {
  FUSEDTRAIN_DISPATCH_FLOATING(L.logits.scalar_type(), "spherical_loss_cpu", [&] {
    if (L.upstream.defined()) backward_rows<scalar_t>(L);
    else forward_rows<scalar_t>(L);
  });
}

void scale_kernel_cpu(at::Tensor& grad, const at::Tensor& factor) {
  FUSEDTRAIN_DISPATCH_FLOATING(grad.scalar_type(), "spherical_scale_grad_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc f = factor.item<acc>();
    if (f == acc(1)) return;  // the common loss.backward(): nothing to do
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, grad.numel(), 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) g[i] = static_cast<scalar_t>(f * static_cast<acc>(g[i]));
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spherical_loss_cpu(
    const at::Tensor& logits, const at::Tensor& target, c10::string_view kind, double a, double b,
    double eps, double var_eps, int64_t ignore_index, c10::string_view reduction, bool compute_grad,
    bool check_target) {
  return forward(logits, target, std::string(kind), a, b, eps, var_eps, ignore_index,
                 std::string(reduction), compute_grad, check_target, row_kernel_cpu);
}

at::Tensor spherical_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                       const at::Tensor& target, const at::Tensor& coef,
                                       int64_t ignore_index) {
  return backward(grad_loss, logits, target, coef, ignore_index, row_kernel_cpu);
}

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& grad_loss) {
  scale_grad(grad, grad_loss, scale_kernel_cpu);
}

}  // namespace
}  // namespace spherical
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("spherical_loss", &fusedtrain::spherical::spherical_loss_cpu);
  m.impl("_spherical_loss_backward", &fusedtrain::spherical::spherical_loss_backward_cpu);
  m.impl("_scale_grad_", &fusedtrain::spherical::scale_grad_cpu);
}
