// CPU kernel of the fused FRUGAL step: one at::parallel_for over every tensor of the call, cut into
// chunks of whole rows, so small and large tensors share the threads evenly. Each element is read
// and written once (p, g) and the moments only for the selected coordinates. A column projection
// updates a row while it is in L1: the selected weights and gradients are gathered into a
// contiguous buffer, the state-free update runs over the whole row, AdamW over the buffer (both
// vectorized), and the buffer is scattered back.
#include "frugal.h"

#include "../common/backend.h"
#include "../common/cpu/simd.h"
#include "../common/dispatch.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if FT_HAVE_AVX2_PATH
#include <immintrin.h>
#endif

namespace fusedtrain {
namespace frugal {
namespace {

// Elements per parallel chunk: large enough to amortize the scheduling, small enough to balance.
constexpr int64_t kChunkElements = 1 << 15;

// The loops below are written for the auto-vectorizer: the free-update mode is a template
// parameter (no per-element switch) and the sign is branch-free. AdamW's sqrt is the exception:
// with errno semantics GCC will not vectorize it, so the AVX2 build spells it with intrinsics, in
// a function of its own (an AVX2 body cannot be inlined into the generic loops).
#if FT_HAVE_AVX2_PATH
FT_TARGET_AVX2_NO_FMA FT_ALWAYS_INLINE cpu::vec_t<float> vector_sqrt(cpu::vec_t<float> x) {
  return reinterpret_cast<cpu::vec_t<float>>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x)));
}
FT_TARGET_AVX2_NO_FMA FT_ALWAYS_INLINE cpu::vec_t<double> vector_sqrt(cpu::vec_t<double> x) {
  return reinterpret_cast<cpu::vec_t<double>>(_mm256_sqrt_pd(reinterpret_cast<__m256d>(x)));
}

// AdamW on the whole vectors of `count` contiguous coordinates; returns how many it did.
template <typename acc>
FT_TARGET_AVX2_NO_FMA __attribute__((noinline)) int64_t adam_vectors_avx2(acc* w, const acc* g, acc* m, acc* v,
                                                                   int64_t count, const Scalars<acc>& s) {
  using V = cpu::vec_t<acc>;
  constexpr int kW = cpu::vec_width<acc>;
  const V b1 = V{} + s.one_minus_b1, b2 = V{} + s.beta2, b2c = V{} + s.one_minus_b2;
  const V bc2 = V{} + s.bc2_sqrt, eps = V{} + s.eps, decay = V{} + s.decay, step = V{} + s.step_size;
  const V b1c = V{} + (acc(1) - s.one_minus_b1);
  const bool low_weight = s.one_minus_b1 < acc(0.5);  // torch.lerp's two forms (adam_coordinate)
  int64_t e = 0;
  for (; e + kW <= count; e += kW) {
    const V gv = cpu::load_vec<acc>(g + e);
    V mv = cpu::load_vec<acc>(m + e), vv = cpu::load_vec<acc>(v + e);
    mv = low_weight ? mv + b1 * (gv - mv) : gv - (gv - mv) * b1c;
    vv = vv * b2 + b2c * gv * gv;
    const V denom = vector_sqrt(vv) / bc2 + eps;
    cpu::store_vec<acc>(w + e, cpu::load_vec<acc>(w + e) * decay - step * (mv / denom));
    cpu::store_vec<acc>(m + e, mv);
    cpu::store_vec<acc>(v + e, vv);
  }
  return e;
}
#endif

template <int kMode, typename scalar_t>
FT_ALWAYS_INLINE void free_span(scalar_t* w, const scalar_t* g, int64_t count,
                                const Scalars<acc_t<scalar_t>>& s) {
  using acc = acc_t<scalar_t>;
  Scalars<acc> fixed = s;
  fixed.free_update = kMode;  // a constant the compiler folds
  for (int64_t e = 0; e < count; ++e)
    w[e] = static_cast<scalar_t>(free_coordinate<acc>(static_cast<acc>(w[e]), static_cast<acc>(g[e]), fixed));
}

// AdamW over `count` coordinates: w and g may be the tensor's own (scalar_t) or gathered (acc).
template <bool kVector, typename W, typename G, typename scalar_t>
FT_ALWAYS_INLINE void adam_span(W* w, const G* g, scalar_t* m, scalar_t* v, int64_t count,
                                const Scalars<acc_t<scalar_t>>& s) {
  using acc = acc_t<scalar_t>;
  int64_t e = 0;
#if FT_HAVE_AVX2_PATH
  if constexpr (kVector && std::is_same_v<W, acc> && std::is_same_v<G, acc> && std::is_same_v<scalar_t, acc>)
    e = adam_vectors_avx2<acc>(w, g, m, v, count, s);
#endif
  for (; e < count; ++e) {
    acc mm = static_cast<acc>(m[e]), vv = static_cast<acc>(v[e]);
    w[e] = static_cast<W>(adam_coordinate<acc>(static_cast<acc>(w[e]), static_cast<acc>(g[e]), mm, vv, s));
    m[e] = static_cast<scalar_t>(mm);
    v[e] = static_cast<scalar_t>(vv);
  }
}

// Rows [r0, r1) of one tensor. `saved` holds at least 2k accumulate-type values (column kind).
template <bool kVector, int kMode, typename scalar_t>
FT_ALWAYS_INLINE void update_rows_mode(const TensorPtrs<scalar_t>& T, int64_t r0, int64_t r1,
                                       acc_t<scalar_t>* saved) {
  using acc = acc_t<scalar_t>;
  const int64_t n = T.cols;
  switch (T.kind) {
    case kDense:
      adam_span<kVector>(T.w + r0 * n, T.g + r0 * n, T.m + r0 * n, T.v + r0 * n, (r1 - r0) * n, T.s);
      break;
    case kFree:
      free_span<kMode>(T.w + r0 * n, T.g + r0 * n, (r1 - r0) * n, T.s);
      break;
    case kResidual: {
      Scalars<acc> fixed = T.s;
      fixed.free_update = kMode;
      for (int64_t e = r0 * n; e < r1 * n; ++e)
        T.w[e] = static_cast<scalar_t>(residual_coordinate<acc>(
            static_cast<acc>(T.w[e]), static_cast<acc>(T.g[e]), static_cast<acc>(T.base[e]),
            static_cast<acc>(T.update[e]), fixed));
      break;
    }
    case kRows: {
      // Selected rows are sorted: walk them alongside.
      int64_t j = std::lower_bound(T.idx, T.idx + T.k, static_cast<int32_t>(r0)) - T.idx;
      for (int64_t r = r0; r < r1; ++r) {
        if (j < T.k && T.idx[j] == r) {
          const int64_t slot = T.slot ? T.slot[j] : j;
          adam_span<kVector>(T.w + r * n, T.g + r * n, T.m + slot * n, T.v + slot * n, n, T.s);
          ++j;
        } else {
          free_span<kMode>(T.w + r * n, T.g + r * n, n, T.s);
        }
      }
      break;
    }
    case kColumns: {
      // Gather the selected weights and gradients (the row is in L1), run the free update over
      // the whole row, then AdamW on the gathered values (contiguous: vectorized) and scatter.
      acc* w_sel = saved;
      acc* g_sel = saved + T.k;
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* w = T.w + r * n;
        const scalar_t* g = T.g + r * n;
        for (int64_t j = 0; j < T.k; ++j) {
          w_sel[j] = static_cast<acc>(w[T.idx[j]]);
          g_sel[j] = static_cast<acc>(g[T.idx[j]]);
        }
        free_span<kMode>(w, g, n, T.s);
        if (!T.slot) {
          adam_span<kVector>(w_sel, g_sel, T.m + r * T.k, T.v + r * T.k, T.k, T.s);
        } else {  // a list made canonical: the moments sit at the active entries' slots
          scalar_t* m = T.m + r * T.state_k;
          scalar_t* v = T.v + r * T.state_k;
          for (int64_t j = 0; j < T.k; ++j) {
            const int64_t q = T.slot[j];
            acc mm = static_cast<acc>(m[q]), vv = static_cast<acc>(v[q]);
            w_sel[j] = adam_coordinate<acc>(w_sel[j], g_sel[j], mm, vv, T.s);
            m[q] = static_cast<scalar_t>(mm);
            v[q] = static_cast<scalar_t>(vv);
          }
        }
        for (int64_t j = 0; j < T.k; ++j) w[T.idx[j]] = static_cast<scalar_t>(w_sel[j]);
      }
      break;
    }
  }
}

template <bool kVector, typename scalar_t>
FT_ALWAYS_INLINE void update_rows(const TensorPtrs<scalar_t>& T, int64_t r0, int64_t r1,
                                  acc_t<scalar_t>* saved) {
  switch (T.s.free_update) {
    case kSignSGD: return update_rows_mode<kVector, kSignSGD>(T, r0, r1, saved);
    case kSGD: return update_rows_mode<kVector, kSGD>(T, r0, r1, saved);
    default: return update_rows_mode<kVector, kNone>(T, r0, r1, saved);
  }
}

template <typename scalar_t>
void update_rows_base(const TensorPtrs<scalar_t>& T, int64_t r0, int64_t r1, acc_t<scalar_t>* saved) {
  update_rows<false>(T, r0, r1, saved);
}

#if FT_HAVE_AVX2_PATH
template <typename scalar_t>
FT_TARGET_AVX2_NO_FMA void update_rows_avx2(const TensorPtrs<scalar_t>& T, int64_t r0, int64_t r1,
                                     acc_t<scalar_t>* saved) {
  update_rows<true>(T, r0, r1, saved);
}
#endif

template <typename scalar_t>
void step_cpu_typed(const StepArgs& a) {
  using acc = acc_t<scalar_t>;
  std::vector<TensorPtrs<scalar_t>> tensors;
  // Index lists that are not strictly increasing within range, made canonical (frugal_math.h):
  // the active entries' values, ascending, and their slots. Kept alive through the loop.
  std::vector<std::vector<int32_t>> canonical_idx;
  std::vector<std::vector<int64_t>> canonical_slot;
  canonical_idx.reserve(a.params.size());
  canonical_slot.reserve(a.params.size());
  std::vector<int64_t> first_chunk{0};  // chunk c belongs to tensor i with first_chunk[i] <= c
  std::vector<int64_t> rows_per_chunk;
  int64_t max_k = 0;
  for (size_t i = 0; i < a.params.size(); ++i) {
    if (a.params[i].numel() == 0) continue;
    TensorPtrs<scalar_t> T = tensor_ptrs<scalar_t>(a, i);
    if (T.kind == kColumns || T.kind == kRows) {
      const int64_t limit = T.kind == kColumns ? T.cols : T.rows;
      if (!strictly_increasing_in_range(T.idx, T.k, limit)) {
        std::vector<std::pair<int32_t, int64_t>> active;  // (value, first slot)
        for (int64_t j = 0; j < T.k; ++j)
          if (T.idx[j] >= 0 && T.idx[j] < limit) active.push_back({T.idx[j], j});
        std::stable_sort(active.begin(), active.end(),
                         [](const auto& x, const auto& y) { return x.first < y.first; });
        std::vector<int32_t> values;
        std::vector<int64_t> slots;
        for (const auto& [c, j] : active) {
          if (!values.empty() && values.back() == c) continue;  // a repeat: the first entry wins
          values.push_back(c);
          slots.push_back(j);
        }
        canonical_idx.push_back(std::move(values));
        canonical_slot.push_back(std::move(slots));
        T.idx = canonical_idx.back().data();
        T.slot = canonical_slot.back().data();
        T.k = static_cast<int64_t>(canonical_idx.back().size());
      }
    }
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
    std::vector<acc> saved(static_cast<size_t>(2 * max_k));
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

void step_cpu(const StepArgs& a) {
  FUSEDTRAIN_DISPATCH_FLOATING(a.params[0].scalar_type(), "frugal_step_cpu", [&] { step_cpu_typed<scalar_t>(a); });
}

}  // namespace

constexpr Kernels kCpuKernels{step_cpu};

}  // namespace frugal
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CPU, fusedtrain::frugal::kCpuKernels)
