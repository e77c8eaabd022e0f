// CPU kernels of the fused linear spherical loss: the O(N·d) per-row work around the dense products
// (which linear_spherical.cpp runs through at::mm). Rows in parallel; each row reads h_n, its
// projection p_n, the column sums and the target row W_{c_n} once, accumulating in acc_t.
#include "linear_spherical.h"

#include "../common/backend.h"
#include "../common/cpu/parallel.h"
#include "../common/dispatch.h"


#include <algorithm>
#include <limits>
#include <vector>

namespace fusedtrain {
namespace spherical {
namespace linear {
namespace {

template <typename scalar_t>
void forward_rows(const ForwardLaunch& L) {
  using acc = acc_t<scalar_t>;
  const scalar_t* input = L.input.data_ptr<scalar_t>();
  const scalar_t* weight = L.weight.data_ptr<scalar_t>();
  const scalar_t* bias = L.bias.defined() ? L.bias.data_ptr<scalar_t>() : nullptr;
  const int64_t* target = L.target.data_ptr<int64_t>();
  const acc* colsum = L.colsum.data_ptr<acc>();
  const acc* proj = L.proj.data_ptr<acc>();
  const acc scale = L.scale.defined() ? L.scale.item<acc>() : acc(1);
  acc* row_loss = L.row_loss.data_ptr<acc>();
  acc* coef = L.coef.data_ptr<acc>();
  int* bad = L.bad_target.data_ptr<int>();
  const int64_t N = L.input.size(0), d = L.input.size(1), D = L.weight.size(0);
  const int64_t dp = L.proj.size(1), in_stride = L.input.stride(0), w_stride = L.weight.stride(0);
  const Params params = L.params;
  const acc Dacc = static_cast<acc>(D);
  cpu::parallel_rows(N, d, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t c = target[n];
      acc* cf = coef + n * kCoefs;
      acc fill;
      if (skips_row(c, D, L.ignore_index, fill)) {
        if (c != L.ignore_index) __atomic_store_n(bad, 1, __ATOMIC_RELAXED);
        row_loss[n] = fill;
        for (int j = 0; j < kCoefs; ++j) cf[j] = fill;
        continue;
      }
      const scalar_t* h = input + n * in_stride;
      const scalar_t* w = weight + c * w_stride;
      const acc* p = proj + n * dp;
      acc s = 0, qc = 0, oc = 0;
      for (int64_t k = 0; k < d; ++k) {
        const acc hk = static_cast<acc>(h[k]);
        s += hk * colsum[k];
        qc += hk * p[k];
        oc += hk * static_cast<acc>(w[k]);
      }
      if (bias) {  // the augmented coordinate h'_d = 1
        s += colsum[d];
        qc += p[d];
        oc += static_cast<acc>(bias[c]);
      }
      const RowCoefficients<acc> r = centered_row_coefficients<acc>(s, qc, oc, Dacc, params);
      row_loss[n] = r.loss;
      cf[kAlpha] = scale * r.alpha;
      cf[kBeta] = scale * r.beta;
      cf[kGamma] = scale * r.gamma;
    }
  });
}

template <typename scalar_t>
void input_grad_rows(const InputGradLaunch& L) {
  using acc = acc_t<scalar_t>;
  const scalar_t* weight = L.weight.data_ptr<scalar_t>();
  const int64_t* target = L.target.data_ptr<int64_t>();
  const acc* colsum = L.colsum.data_ptr<acc>();
  const acc* proj = L.proj.data_ptr<acc>();
  const acc* coef = L.coef.data_ptr<acc>();
  scalar_t* out = L.grad_input.data_ptr<scalar_t>();
  const int64_t N = L.grad_input.size(0), d = L.grad_input.size(1), D = L.weight.size(0);
  const int64_t dp = L.proj.size(1), w_stride = L.weight.stride(0);
  cpu::parallel_rows(N, d, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t c = target[n];
      scalar_t* g = out + n * d;
      acc fill;
      if (skips_row(c, D, L.ignore_index, fill)) {
        std::fill(g, g + d, static_cast<scalar_t>(fill));
        continue;
      }
      const acc alpha = coef[n * kCoefs + kAlpha], beta = coef[n * kCoefs + kBeta],
                gamma = coef[n * kCoefs + kGamma];
      const scalar_t* w = weight + c * w_stride;
      const acc* p = proj + n * dp;
      for (int64_t k = 0; k < d; ++k)
        g[k] = static_cast<scalar_t>(alpha * colsum[k] + beta * p[k] + gamma * static_cast<acc>(w[k]));
    }
  });
}

template <typename scalar_t>
void scatter_rows(const ScatterLaunch& L) {
  using acc = acc_t<scalar_t>;
  const scalar_t* input = L.input.data_ptr<scalar_t>();
  const acc* coef = L.coef.data_ptr<acc>();
  const int64_t* key = L.sorted_key.data_ptr<int64_t>();
  const int64_t* order = L.order.data_ptr<int64_t>();
  scalar_t* gw = L.grad_weight.defined() ? L.grad_weight.data_ptr<scalar_t>() : nullptr;
  scalar_t* gb = L.grad_bias.defined() ? L.grad_bias.data_ptr<scalar_t>() : nullptr;
  const int64_t N = L.input.size(0), d = L.input.size(1), in_stride = L.input.stride(0);
  const int64_t D = gw ? L.grad_weight.size(0) : L.grad_bias.size(0);
  // A segment (one class) belongs to the thread whose range holds its first sorted position, so
  // each grad row is written by one thread, summing its rows in sorted (stable) order.
  cpu::parallel_rows(N, d, [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(gw ? d : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = key[i];
      if (c >= D || (i > 0 && key[i - 1] == c)) continue;
      std::fill(sum.begin(), sum.end(), acc(0));
      acc gamma_sum = 0;
      for (int64_t j = i; j < N && key[j] == c; ++j) {
        const int64_t n = order[j];
        const acc gamma = coef[n * kCoefs + kGamma];
        gamma_sum += gamma;
        if (gw) {
          const scalar_t* h = input + n * in_stride;
          for (int64_t k = 0; k < d; ++k) sum[k] += gamma * static_cast<acc>(h[k]);
        }
      }
      if (gw) {
        scalar_t* row = gw + c * d;
        for (int64_t k = 0; k < d; ++k) row[k] = static_cast<scalar_t>(static_cast<acc>(row[k]) + sum[k]);
      }
      if (gb) gb[c] = static_cast<scalar_t>(static_cast<acc>(gb[c]) + gamma_sum);
    }
  });
}

void forward_cpu(const ForwardLaunch& L) {
  FUSEDTRAIN_DISPATCH_FLOATING(L.input.scalar_type(), "linear_spherical_forward_cpu",
                               [&] { forward_rows<scalar_t>(L); });
}

void input_grad_cpu(const InputGradLaunch& L) {
  FUSEDTRAIN_DISPATCH_FLOATING(L.grad_input.scalar_type(), "linear_spherical_input_grad_cpu",
                               [&] { input_grad_rows<scalar_t>(L); });
}

void scatter_cpu(const ScatterLaunch& L) {
  FUSEDTRAIN_DISPATCH_FLOATING(L.input.scalar_type(), "linear_spherical_scatter_cpu",
                               [&] { scatter_rows<scalar_t>(L); });
}

}  // namespace

constexpr Kernels kCpuKernels{forward_cpu, input_grad_cpu, scatter_cpu};

}  // namespace linear
}  // namespace spherical
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CPU, fusedtrain::spherical::linear::kCpuKernels)
