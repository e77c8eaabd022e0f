// The kept entries of a routing into the CSR, and the CSC of a CSR, on the CPU (sae_cpu.h).
#include "sae_cpu.h"

#include "../common/checks.h"
#include "../common/cpu/isa.h"
#include "../common/cpu/simd.h"
#include "../common/dispatch.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

namespace fusedtrain {
namespace sae {
namespace {

using cpu::any_lane;
using cpu::lane_bits;

// Bit j set iff entry j of the 2·vec_width entries at p is >= t[j] (NaN never is).
template <typename acc, typename scalar_t>
FT_ALWAYS_INLINE uint32_t at_least_bits(const scalar_t* p, const acc* t) {
  constexpr int W = cpu::vec_width<acc>;
  const auto m0 = cpu::load_vec_by_bits<acc>(p) >= cpu::load_vec<acc>(t);
  const auto m1 = cpu::load_vec_by_bits<acc>(p + W) >= cpu::load_vec<acc>(t + W);
  if (!any_lane(m0 | m1)) return 0;  // the common case: nothing to visit
  return lane_bits(m0) | (lane_bits(m1) << W);
}

// The cutoff predicate `kept` (sae_math.h), rearranged for speed: with tp = max(T, 0),
// kept(v) = v > tp, or v == tp > 0 with a tie index <= L. Chunks of 2 vectors are tested with
// vector comparisons; only the entries at or above their tp are visited (bit mask).
template <typename scalar_t>
struct KeptScan {
  using acc = acc_t<scalar_t>;
  const scalar_t* p;
  int64_t F, stride;
  std::vector<acc> tp;   // F entries (broadcast when the cutoff is shared)
  std::vector<int64_t> L;
  bool flat;

  explicit KeptScan(const Cutoffs& c)
      : p(c.pre.const_data_ptr<scalar_t>()), F(c.pre.size(1)), stride(c.pre.stride(0)), tp(F), L(F),
        flat(c.flat) {
    const acc* T = c.value.const_data_ptr<acc>();
    const int64_t* Li = c.index.const_data_ptr<int64_t>();
    const bool shared = c.value.numel() == 1;
    for (int64_t f = 0; f < F; ++f) {
      tp[f] = std::max(T[shared ? 0 : f], acc(0));
      L[f] = Li[shared ? 0 : f];
    }
  }

  FT_ALWAYS_INLINE bool kept_at(int64_t b, int64_t f, acc v) const {
    return kept(v, tp[f], flat ? b * F + f : b, L[f]);
  }

  // Calls fn(f, value) for every kept entry of row b, in feature order.
  template <typename Fn>
  FT_ALWAYS_INLINE void row(int64_t b, Fn&& fn) const {
    const scalar_t* r = p + b * stride;
    const acc* t = tp.data();
    constexpr int64_t G = 2 * cpu::vec_width<acc>;
    int64_t f = 0;
    for (; f + G <= F; f += G) {
      // Only entries >= their tp can be kept; they come out as a bit mask, in feature order.
      for (uint32_t bits = at_least_bits<acc>(r + f, t + f); bits != 0; bits &= bits - 1) {
        const int64_t c = f + __builtin_ctz(bits);
        if (kept_at(b, c, static_cast<acc>(r[c]))) fn(c, r[c]);
      }
    }
    for (; f < F; ++f) {
      const acc v = static_cast<acc>(r[f]);
      if (kept_at(b, f, v)) fn(f, r[f]);
    }
  }
};

template <typename scalar_t>
FT_ALWAYS_INLINE void count_rows(const KeptScan<scalar_t>& scan, int64_t* out, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    int64_t n = 0;
    scan.row(b, [&](int64_t, scalar_t) { ++n; });
    out[b] = n;
  }
}

template <typename scalar_t>
FT_ALWAYS_INLINE void fill_rows(const KeptScan<scalar_t>& scan, const int64_t* rp, int64_t* feat, scalar_t* val,
                                int64_t nnz, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    int64_t pos = rp[b];
    scan.row(b, [&](int64_t f, scalar_t v) {
      if (pos < nnz) {  // the count pass sized the output; never write past it
        feat[pos] = f;
        val[pos] = v;
      }
      ++pos;
    });
  }
}

template <typename scalar_t>
void count_rows_base(const KeptScan<scalar_t>& scan, int64_t* out, int64_t begin, int64_t end) {
  count_rows(scan, out, begin, end);
}
template <typename scalar_t>
void fill_rows_base(const KeptScan<scalar_t>& scan, const int64_t* rp, int64_t* feat, scalar_t* val, int64_t nnz,
                    int64_t begin, int64_t end) {
  fill_rows(scan, rp, feat, val, nnz, begin, end);
}
#if FT_HAVE_AVX2_PATH
template <typename scalar_t>
FT_TARGET_AVX2 void count_rows_avx2(const KeptScan<scalar_t>& scan, int64_t* out, int64_t begin, int64_t end) {
  count_rows(scan, out, begin, end);
}
template <typename scalar_t>
FT_TARGET_AVX2 void fill_rows_avx2(const KeptScan<scalar_t>& scan, const int64_t* rp, int64_t* feat, scalar_t* val,
                                   int64_t nnz, int64_t begin, int64_t end) {
  fill_rows(scan, rp, feat, val, nnz, begin, end);
}
#endif

}  // namespace

void count_kept_cpu(const Cutoffs& c, const at::Tensor& counts) {
  int64_t* out = counts.data_ptr<int64_t>();
  const bool avx2 = cpu::cpu_has_avx2();
  FUSEDTRAIN_DISPATCH_FLOATING(c.pre.scalar_type(), "sae_count_kept_cpu", [&] {
    const KeptScan<scalar_t> scan(c);
    at::parallel_for(0, c.pre.size(0), 1, [&](int64_t begin, int64_t end) {
#if FT_HAVE_AVX2_PATH
      if (avx2) return count_rows_avx2(scan, out, begin, end);
#endif
      count_rows_base(scan, out, begin, end);
    });
  });
}

void fill_kept_cpu(const Cutoffs& c, const at::Tensor& row_ptr, const at::Tensor& feature, const at::Tensor& value) {
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  int64_t* feat = feature.data_ptr<int64_t>();
  const int64_t nnz = feature.numel();
  const bool avx2 = cpu::cpu_has_avx2();
  FUSEDTRAIN_DISPATCH_FLOATING(c.pre.scalar_type(), "sae_fill_kept_cpu", [&] {
    scalar_t* val = value.data_ptr<scalar_t>();
    const KeptScan<scalar_t> scan(c);
    at::parallel_for(0, c.pre.size(0), 1, [&](int64_t begin, int64_t end) {
#if FT_HAVE_AVX2_PATH
      if (avx2) return fill_rows_avx2(scan, rp, feat, val, nnz, begin, end);
#endif
      fill_rows_base(scan, rp, feat, val, nnz, begin, end);
    });
  });
}

// CSC of a CSR by counting sort: entries of each feature in token order (deterministic). row_ptr is
// non-decreasing within [0, nnz] (sae.cpp's read_offsets); the result is sae.h's, entry for entry
// the one of the torch-op version (sae.cpp's csc_torch): dropped entries (outside every row, or a
// feature outside [0, num_cols)) follow col_ptr[num_cols] in entry order. Every entry is counted
// once and placed once, so each write lies in [0, nnz).
std::tuple<at::Tensor, at::Tensor, at::Tensor> csc_cpu(const at::Tensor& row_ptr, const at::Tensor& col,
                                                       int64_t num_cols) {
  const int64_t B = row_ptr.size(0) - 1, nnz = col.size(0);
  auto col_ptr = at::empty({num_cols + 1}, col.options());
  auto perm = at::empty({nnz}, col.options());
  auto token = at::empty({nnz}, col.options());
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const int64_t* cl = col.const_data_ptr<int64_t>();
  int64_t* cp = col_ptr.data_ptr<int64_t>();
  int64_t* pm = perm.data_ptr<int64_t>();
  int64_t* tk = token.data_ptr<int64_t>();
  // Each entry's row: -1 before row 0, B after row B - 1 (rp is non-decreasing within [0, nnz]).
  std::vector<int64_t> row_of(static_cast<size_t>(nnz));
  std::fill(row_of.begin(), row_of.begin() + rp[0], int64_t(-1));
  for (int64_t b = 0; b < B; ++b) std::fill(row_of.begin() + rp[b], row_of.begin() + rp[b + 1], b);
  std::fill(row_of.begin() + rp[B], row_of.end(), B);
  auto key = [&](int64_t j) {
    const int64_t b = row_of[j], f = cl[j];
    return b >= 0 && b < B && f >= 0 && f < num_cols ? f : num_cols;
  };
  std::vector<int64_t> next(static_cast<size_t>(num_cols) + 2, 0);  // counts, then next free slot
  for (int64_t j = 0; j < nnz; ++j) ++next[key(j) + 1];
  for (int64_t f = 0; f <= num_cols; ++f) next[f + 1] += next[f];
  std::copy(next.begin(), next.begin() + num_cols + 1, cp);
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t pos = next[key(j)]++;
    pm[pos] = j;
    tk[pos] = row_of[j];
  }
  return {col_ptr, perm, token};
}

}  // namespace sae
}  // namespace fusedtrain
