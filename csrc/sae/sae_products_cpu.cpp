// Decode and the backward products of the SAE on the CPU, accumulating in fp32 (fp64 for fp64),
// per feature in a fixed order (sae_cpu.h).
#include "sae_cpu.h"

#include "../common/cpu/parallel.h"
#include "../common/dispatch.h"

namespace fusedtrain {
namespace sae {
namespace {

template <typename scalar_t>
void gather_rows_impl(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef,
                      const at::Tensor& table, const at::Tensor& bias, const at::Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t B = out.size(0), d = out.size(1), R = table.size(0), nnz = col.numel();
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const int64_t* cl = col.const_data_ptr<int64_t>();
  const scalar_t* cf = coef.const_data_ptr<scalar_t>();
  const scalar_t* tb = table.const_data_ptr<scalar_t>();
  const scalar_t* bs = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o = out.data_ptr<scalar_t>();
  cpu::parallel_rows(B, d, [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(d);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t e = 0; e < d; ++e) sum[e] = bs ? static_cast<acc>(bs[e]) : acc(0);
      int64_t lo, hi;
      clamped_range(rp, b, nnz, lo, hi);
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t r = cl[j];
        if (r < 0 || r >= R) continue;  // validated in Python; never read out of bounds
        const acc a = static_cast<acc>(cf[j]);
        const scalar_t* t = tb + r * d;
        for (int64_t e = 0; e < d; ++e) sum[e] += a * static_cast<acc>(t[e]);
      }
      for (int64_t e = 0; e < d; ++e) o[b * d + e] = static_cast<scalar_t>(sum[e]);
    }
  });
}

template <typename scalar_t>
void sampled_dot_impl(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& grad,
                      const at::Tensor& table, const at::Tensor& out) {
  using acc = acc_t<scalar_t>;
  const int64_t B = grad.size(0), d = grad.size(1), R = table.size(0), nnz = col.numel();
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const int64_t* cl = col.const_data_ptr<int64_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* tb = table.const_data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  // Entries outside every row (malformed row_ptr) get 0 rather than stale memory.
  if (B == 0 || rp[0] != 0 || rp[B] != nnz) std::fill(o, o + nnz, scalar_t(0));
  cpu::parallel_rows(B, d, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t lo, hi;
      clamped_range(rp, b, nnz, lo, hi);
      const scalar_t* gr = g + b * d;
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t r = cl[j];
        acc s = 0;
        if (r >= 0 && r < R) {
          const scalar_t* t = tb + r * d;
          for (int64_t e = 0; e < d; ++e) s += static_cast<acc>(gr[e]) * static_cast<acc>(t[e]);
        }
        o[j] = static_cast<scalar_t>(s);
      }
    }
  });
}

template <typename scalar_t>
void segment_sum_impl(const at::Tensor& col_ptr, const at::Tensor& perm, const at::Tensor& token,
                      const at::Tensor& coef, const at::Tensor& src, const at::Tensor& out,
                      const at::Tensor& coef_sum) {
  using acc = acc_t<scalar_t>;
  const int64_t F = out.size(0), d = out.size(1), B = src.size(0), nnz = perm.numel();
  const int64_t* cp = col_ptr.const_data_ptr<int64_t>();
  const int64_t* pm = perm.const_data_ptr<int64_t>();
  const int64_t* tk = token.const_data_ptr<int64_t>();
  const scalar_t* cf = coef.const_data_ptr<scalar_t>();
  const scalar_t* s = src.const_data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  scalar_t* cs = coef_sum.data_ptr<scalar_t>();
  cpu::parallel_rows(F, d, [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(d);
    for (int64_t f = begin; f < end; ++f) {
      std::fill(sum.begin(), sum.end(), acc(0));
      acc total = 0;
      int64_t lo, hi;
      clamped_range(cp, f, nnz, lo, hi);
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t j = pm[p], b = tk[p];
        if (j < 0 || j >= nnz || b < 0 || b >= B) continue;
        const acc a = static_cast<acc>(cf[j]);
        total += a;
        const scalar_t* row = s + b * d;
        for (int64_t e = 0; e < d; ++e) sum[e] += a * static_cast<acc>(row[e]);
      }
      for (int64_t e = 0; e < d; ++e) o[f * d + e] = static_cast<scalar_t>(sum[e]);
      cs[f] = static_cast<scalar_t>(total);
    }
  });
}

}  // namespace

void gather_rows_cpu(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef,
                     const at::Tensor& table, const at::Tensor& bias, const at::Tensor& out) {
  FUSEDTRAIN_DISPATCH_FLOATING(table.scalar_type(), "sae_gather_rows_cpu",
                               [&] { gather_rows_impl<scalar_t>(row_ptr, col, coef, table, bias, out); });
}

void sampled_dot_cpu(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& grad,
                     const at::Tensor& table, const at::Tensor& out) {
  FUSEDTRAIN_DISPATCH_FLOATING(grad.scalar_type(), "sae_sampled_dot_cpu",
                               [&] { sampled_dot_impl<scalar_t>(row_ptr, col, grad, table, out); });
}

void segment_sum_cpu(const at::Tensor& col_ptr, const at::Tensor& perm, const at::Tensor& token,
                     const at::Tensor& coef, const at::Tensor& src, const at::Tensor& out,
                     const at::Tensor& coef_sum) {
  FUSEDTRAIN_DISPATCH_FLOATING(src.scalar_type(), "sae_segment_sum_cpu", [&] {
    segment_sum_impl<scalar_t>(col_ptr, perm, token, coef, src, out, coef_sum);
  });
}

}  // namespace sae
}  // namespace fusedtrain
