// CPU kernels of the spherical losses: rows in parallel, two passes per row while it is in cache
// (statistics, then the gradient), so the logits are read from memory once and the gradient written
// once. The row loops use explicit SIMD vectors with several accumulators in flight; an AVX2 build
// of them is chosen at run time where the CPU has it.
#include "spherical.h"

#include "../common/backend.h"
#include "../common/cpu/memory.h"
#include "../common/cpu/simd.h"
#include "../common/dispatch.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace fusedtrain {
namespace spherical {
namespace {

using cpu::vec_t;
using cpu::vec_width;

// s = Σ(o − K), q = Σ(o − K)² over one row, four independent vector accumulators in flight. Scaled
// (the rare second pass of a huge row, spherical_math.h): s = Σ(o/S − K/S), q = Σ(o/S − K/S)² with
// inv = 1/S and shift = K/S.
template <bool kScaled, typename scalar_t, typename acc>
FT_ALWAYS_INLINE void shifted_sums(const scalar_t* row, int64_t D, acc inv, acc shift, acc& s_out, acc& q_out) {
  using V = vec_t<acc>;
  constexpr int W = vec_width<acc>;
  V s0 = {}, s1 = {}, q0 = {}, q1 = {};
  const V vshift = V{} + shift, vinv = V{} + inv;
  auto load = [&](int64_t k) {
    const V x = cpu::load_vec<acc>(row + k);
    if constexpr (kScaled) return x * vinv - vshift;
    else return x - vshift;
  };
  int64_t k = 0;
  for (; k + 2 * W <= D; k += 2 * W) {
    const V x0 = load(k);
    const V x1 = load(k + W);
    s0 += x0;
    s1 += x1;
    q0 += x0 * x0;
    q1 += x1 * x1;
  }
  acc s = cpu::horizontal_sum<acc>(s0 + s1), q = cpu::horizontal_sum<acc>(q0 + q1);
  for (; k < D; ++k) {
    const acc x = kScaled ? static_cast<acc>(row[k]) * inv - shift : static_cast<acc>(row[k]) - shift;
    s += x;
    q += x * x;
  }
  s_out = s;
  q_out = q;
}

// max(|K|, max_k |o_k|) of one row (NaN when the row holds a NaN): the scale of its statistics.
template <typename scalar_t, typename acc>
FT_ALWAYS_INLINE acc row_max_abs(const scalar_t* row, int64_t D, acc shift) {
  acc m = std::fabs(shift);
  bool nan = std::isnan(m);
  for (int64_t k = 0; k < D; ++k) {
    const acc x = std::fabs(static_cast<acc>(row[k]));
    m = x > m ? x : m;
    nan |= std::isnan(x);
  }
  return nan ? std::numeric_limits<acc>::quiet_NaN() : m;
}

// The row's statistics s, q (in units of S: see spherical_math.h) with inv = 1/S and log S: one
// pass, and a second scaled one only for a row whose q is beyond scaled_stats_bound (its logits
// are in cache by then; a row with a non-finite logit keeps its unscaled, non-finite sums).
template <typename scalar_t, typename acc>
FT_ALWAYS_INLINE void row_statistics(const scalar_t* row, int64_t D, int kind, acc shift, acc& s, acc& q,
                                     acc& inv, acc& log_scale) {
  inv = acc(1);
  log_scale = acc(0);
  shifted_sums<false>(row, D, acc(1), shift, s, q);
  if (!wants_scaled_stats(kind, q)) return;
  const acc m = row_max_abs(row, D, shift);
  if (!std::isfinite(m)) return;
  power_of_two_scale(m, inv, log_scale);
  shifted_sums<true>(row, D, inv, shift * inv, s, q);
}

// out_k = α + β·(o_k − K), then the target column gets γ on top. β·(o − K) rather than
// (α − βK) + β·o: with a large common offset the latter cancels catastrophically. Scaled rows
// (inv = 1/S != 1): β is β·S, shift is K/S and the term is β·(o_k/S − K/S).
template <typename scalar_t, typename acc>
FT_ALWAYS_INLINE void write_row_gradient(const scalar_t* row, scalar_t* out, int64_t D, int64_t c,
                                         acc alpha, acc beta, acc gamma, acc inv, acc shift) {
  using V = vec_t<acc>;
  constexpr int W = vec_width<acc>;
  const V va = V{} + alpha, vb = V{} + beta, vshift = V{} + shift, vinv = V{} + inv;
  int64_t k = 0;
  if (inv == acc(1)) {
    for (; k + W <= D; k += W) cpu::store_vec<acc>(out + k, va + vb * (cpu::load_vec<acc>(row + k) - vshift));
  } else {
    for (; k + W <= D; k += W)
      cpu::store_vec<acc>(out + k, va + vb * (cpu::load_vec<acc>(row + k) * vinv - vshift));
  }
  for (; k < D; ++k) out[k] = static_cast<scalar_t>(alpha + beta * (static_cast<acc>(row[k]) * inv - shift));
  out[c] = static_cast<scalar_t>(alpha + beta * (static_cast<acc>(row[c]) * inv - shift) + gamma);
}

template <typename scalar_t>
FT_ALWAYS_INLINE void fill_row(scalar_t* out, int64_t D, acc_t<scalar_t> value) {
  const scalar_t v = static_cast<scalar_t>(value);
  for (int64_t k = 0; k < D; ++k) out[k] = v;
}

template <typename scalar_t>
FT_ALWAYS_INLINE void forward_range(const RowPointers<scalar_t>& R, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  const acc Dacc = static_cast<acc>(R.D);
  const acc weight = R.weight ? *R.weight : acc(1);
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* row = R.logits + n * R.stride;
    const int64_t c = R.target[n];
    acc* cf = R.coef + n * kCoefCount;
    scalar_t* grow = R.grad ? R.grad + n * R.D : nullptr;
    if (c == R.ignore_index || !target_is_valid(c, R.D, R.ignore_index)) {
      // Ignored rows contribute nothing; out-of-range rows are NaN and flagged.
      const bool ignored = c == R.ignore_index;
      const acc fill = ignored ? acc(0) : std::numeric_limits<acc>::quiet_NaN();
      if (!ignored) __atomic_store_n(R.bad, 1, __ATOMIC_RELAXED);
      R.row_loss[n] = fill;
      for (int j = 0; j < kCoefCount; ++j) cf[j] = fill;
      if (grow) fill_row(grow, R.D, fill);
      continue;
    }
    const acc oc = static_cast<acc>(row[c]);
    const bool shifted = shifts_by_target(R.params.kind);
    const acc shift = shifted ? oc : acc(0);
    acc s, q, inv, log_scale;
    row_statistics(row, R.D, R.params.kind, shift, s, q, inv, log_scale);
    const RowCoefficients<acc> r = row_coefficients<acc>(s, q, oc - shift, Dacc, R.params, inv, log_scale);
    R.row_loss[n] = r.loss;
    cf[kCoefAlpha] = weight * r.alpha;
    cf[kCoefBeta] = weight * r.beta;
    cf[kCoefGamma] = weight * r.gamma;
    cf[kCoefScale] = encode_scale(inv, shifted);
    if (grow)
      write_row_gradient(row, grow, R.D, c, cf[kCoefAlpha], cf[kCoefBeta], cf[kCoefGamma], inv, shift * inv);
  }
}

template <typename scalar_t>
FT_ALWAYS_INLINE void backward_range(const RowPointers<scalar_t>& R, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t c = R.target[n];
    scalar_t* grow = R.grad + n * R.D;
    if (c == R.ignore_index) {
      fill_row(grow, R.D, acc(0));
    } else if (!target_is_valid(c, R.D, R.ignore_index)) {  // the forward flagged it; stays NaN
      fill_row(grow, R.D, std::numeric_limits<acc>::quiet_NaN());
    } else {
      const acc* cf = R.coef + n * kCoefCount;
      const acc g = R.upstream[n * R.up_stride];
      const scalar_t* row = R.logits + n * R.stride;
      const acc inv = decoded_inv_scale(cf[kCoefScale]);
      const acc shift = decoded_shift(cf[kCoefScale], static_cast<acc>(row[c]));
      write_row_gradient(row, grow, R.D, c, g * cf[kCoefAlpha], g * cf[kCoefBeta], g * cf[kCoefGamma], inv,
                         shift * inv);
    }
  }
}

template <typename scalar_t>
void rows_base(const RowPointers<scalar_t>& R, bool fwd, int64_t begin, int64_t end) {
  if (fwd) forward_range(R, begin, end);
  else backward_range(R, begin, end);
}

#if FT_HAVE_AVX2_PATH
template <typename scalar_t>
FT_TARGET_AVX2 void rows_avx2(const RowPointers<scalar_t>& R, bool fwd, int64_t begin, int64_t end) {
  if (fwd) forward_range(R, begin, end);
  else backward_range(R, begin, end);
}
#endif

template <typename scalar_t>
void run_rows(const RowLaunch& L) {
  const RowPointers<scalar_t> R = row_pointers<scalar_t>(L);
  const bool fwd = R.upstream == nullptr;
  if (R.grad) cpu::advise_huge_pages(R.grad, L.grad.numel() * sizeof(scalar_t));
  const int64_t grain = std::max<int64_t>(1, 16384 / R.D);
  const bool avx2 = cpu::cpu_has_avx2();
  at::parallel_for(0, R.N, grain, [&](int64_t begin, int64_t end) {
#if FT_HAVE_AVX2_PATH
    if (avx2) return rows_avx2(R, fwd, begin, end);
#endif
    rows_base(R, fwd, begin, end);
  });
}

void row_kernel_cpu(const RowLaunch& L) {
  FUSEDTRAIN_DISPATCH_FLOATING(L.logits.scalar_type(), "spherical_loss_cpu",
                               [&] { run_rows<scalar_t>(L); });
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

}  // namespace

constexpr Kernels kCpuKernels{row_kernel_cpu, scale_kernel_cpu};

}  // namespace spherical
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CPU, fusedtrain::spherical::kCpuKernels)
