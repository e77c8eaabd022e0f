// CPU kernel of the fused FRUGAL step: one at::parallel_for over every tensor of the call, cut into
// chunks of whole rows, so small and large tensors share the threads evenly. Each element is read
// and written once (p, g) and the moments only for the selected coordinates. A column projection
// updates a row in two passes while the row is in L1: the state-free update of the whole row
// (a vectorizable loop), then AdamW on the selected columns from the weights saved before it.
#include "frugal.h"
#include "../common/cpu_utils.h"
#include "../common/dispatch.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fusedtrain {
namespace frugal {
namespace {

// Elements per parallel chunk: large enough to amortize the scheduling, small enough to balance.
constexpr int64_t kChunkElements = 1 << 15;

template <typename scalar_t>
struct TensorPtrs {
  using acc = acc_t<scalar_t>;
  scalar_t* w = nullptr;
  const scalar_t* g = nullptr;
  scalar_t* m = nullptr;
  scalar_t* v = nullptr;
  const int32_t* idx = nullptr;
  const scalar_t* base = nullptr;
  const scalar_t* update = nullptr;
  int64_t rows = 0, cols = 0, k = 0;
  int kind = kFree;
  Scalars<acc> s{};
};

template <typename T>
T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

template <typename scalar_t>
FT_ALWAYS_INLINE void free_span(scalar_t* w, const scalar_t* g, int64_t count,
                                const Scalars<acc_t<scalar_t>>& s) {
  using acc = acc_t<scalar_t>;
  for (int64_t e = 0; e < count; ++e)
    w[e] = static_cast<scalar_t>(free_coordinate<acc>(static_cast<acc>(w[e]), static_cast<acc>(g[e]), s));
}

template <typename scalar_t>
FT_ALWAYS_INLINE void adam_span(scalar_t* w, const scalar_t* g, scalar_t* m, scalar_t* v, int64_t count,
                                const Scalars<acc_t<scalar_t>>& s) {
  using acc = acc_t<scalar_t>;
  for (int64_t e = 0; e < count; ++e) {
    acc mm = static_cast<acc>(m[e]), vv = static_cast<acc>(v[e]);
    w[e] = static_cast<scalar_t>(adam_coordinate<acc>(static_cast<acc>(w[e]), static_cast<acc>(g[e]), mm, vv, s));
    m[e] = static_cast<scalar_t>(mm);
    v[e] = static_cast<scalar_t>(vv);
  }
}

// Rows [r0, r1) of one tensor. `saved` holds at least k accumulate-type values (column kind).
template <typename scalar_t>
FT_ALWAYS_INLINE void update_rows(const TensorPtrs<scalar_t>& T, int64_t r0, int64_t r1,
                                  acc_t<scalar_t>* saved) {
  using acc = acc_t<scalar_t>;
  const int64_t n = T.cols;
  switch (T.kind) {
    case kDense:
      adam_span(T.w + r0 * n, T.g + r0 * n, T.m + r0 * n, T.v + r0 * n, (r1 - r0) * n, T.s);
      break;
    case kFree:
      free_span(T.w + r0 * n, T.g + r0 * n, (r1 - r0) * n, T.s);
      break;
    case kResidual:
      for (int64_t e = r0 * n; e < r1 * n; ++e)
        T.w[e] = static_cast<scalar_t>(residual_coordinate<acc>(
            static_cast<acc>(T.w[e]), static_cast<acc>(T.g[e]), static_cast<acc>(T.base[e]),
            static_cast<acc>(T.update[e]), T.s));
      break;
    case kRows: {
      // Selected rows are sorted: walk them alongside.
      int64_t j = std::lower_bound(T.idx, T.idx + T.k, static_cast<int32_t>(r0)) - T.idx;
      for (int64_t r = r0; r < r1; ++r) {
        if (j < T.k && T.idx[j] == r) {
          adam_span(T.w + r * n, T.g + r * n, T.m + j * n, T.v + j * n, n, T.s);
          ++j;
        } else {
          free_span(T.w + r * n, T.g + r * n, n, T.s);
        }
      }
      break;
    }
    case kColumns:
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* w = T.w + r * n;
        const scalar_t* g = T.g + r * n;
        scalar_t* m = T.m + r * T.k;
        scalar_t* v = T.v + r * T.k;
        for (int64_t j = 0; j < T.k; ++j) saved[j] = static_cast<acc>(w[T.idx[j]]);
        free_span(w, g, n, T.s);
        for (int64_t j = 0; j < T.k; ++j) {
          const int64_t c = T.idx[j];
          acc mm = static_cast<acc>(m[j]), vv = static_cast<acc>(v[j]);
          w[c] = static_cast<scalar_t>(adam_coordinate<acc>(saved[j], static_cast<acc>(g[c]), mm, vv, T.s));
          m[j] = static_cast<scalar_t>(mm);
          v[j] = static_cast<scalar_t>(vv);
        }
      }
      break;
  }
}

template <typename scalar_t>
void update_rows_base(const TensorPtrs<scalar_t>& T, int64_t r0, int64_t r1, acc_t<scalar_t>* saved) {
  update_rows(T, r0, r1, saved);
}

#if FT_HAVE_AVX2_PATH
template <typename scalar_t>
FT_TARGET_AVX2 void update_rows_avx2(const TensorPtrs<scalar_t>& T, int64_t r0, int64_t r1,
                                     acc_t<scalar_t>* saved) {
  update_rows(T, r0, r1, saved);
}
#endif

template <typename scalar_t>
void step_cpu_typed(const StepArgs& a) {
  using acc = acc_t<scalar_t>;
  std::vector<TensorPtrs<scalar_t>> tensors;
  std::vector<int64_t> first_chunk{0};  // chunk c belongs to tensor i with first_chunk[i] <= c
  std::vector<int64_t> rows_per_chunk;
  int64_t max_k = 0;
  for (size_t i = 0; i < a.params.size(); ++i) {
    if (a.params[i].numel() == 0) continue;
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
    T.kind = static_cast<int>(a.kinds[i]);
    T.s = scalars_for<acc>(a, i);
    if (T.kind == kColumns) max_k = std::max(max_k, T.k);
    const int64_t per = std::max<int64_t>(1, kChunkElements / T.cols);
    rows_per_chunk.push_back(per);
    first_chunk.push_back(first_chunk.back() + (T.rows + per - 1) / per);
    tensors.push_back(T);
  }
  const int64_t chunks = first_chunk.back();
  if (chunks == 0) return;
  const bool avx2 = cpu::cpu_has_avx2();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> saved(static_cast<size_t>(max_k));
    size_t i = std::upper_bound(first_chunk.begin(), first_chunk.end(), begin) - first_chunk.begin() - 1;
    for (int64_t c = begin; c < end; ++c) {
      while (c >= first_chunk[i + 1]) ++i;
      const TensorPtrs<scalar_t>& T = tensors[i];
      const int64_t r0 = (c - first_chunk[i]) * rows_per_chunk[i];
      const int64_t r1 = std::min(T.rows, r0 + rows_per_chunk[i]);
#if FT_HAVE_AVX2_PATH
      if (avx2) { update_rows_avx2(T, r0, r1, saved.data()); continue; }
#endif
      update_rows_base(T, r0, r1, saved.data());
    }
  });
}

void frugal_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList indices, at::TensorList residual_bases,
                     at::TensorList dense_updates, at::IntArrayRef kinds, at::IntArrayRef steps, double lr,
                     double beta1, double beta2, double eps, double weight_decay,
                     c10::string_view free_update, double free_lr_scale) {
  const StepArgs a = make_step_args(params, grads, exp_avgs, exp_avg_sqs, indices, residual_bases,
                                    dense_updates, kinds, steps, lr, beta1, beta2, eps, weight_decay,
                                    std::string(free_update), free_lr_scale, /*validate_index_values=*/true);
  if (a.params.empty()) return;
  FUSEDTRAIN_DISPATCH_FLOATING(a.params[0].scalar_type(), "frugal_step_cpu",
                               [&] { step_cpu_typed<scalar_t>(a); });
}

}  // namespace
}  // namespace frugal
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  m.impl("frugal_step_", &fusedtrain::frugal::frugal_step_cpu);
}
