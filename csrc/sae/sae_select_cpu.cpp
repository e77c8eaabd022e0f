// Row top-k (TopK) and per-feature cutoffs (feature choice) of the SAE routings on the CPU
// (sae_cpu.h).
#include "sae_cpu.h"

#include "../common/cpu/isa.h"
#include "../common/cpu/simd.h"
#include "../common/dispatch.h"

#include <ATen/Parallel.h>

#include <functional>

namespace fusedtrain {
namespace sae {
namespace {

using cpu::any_lane;
using cpu::broadcast;

// `kScanVecs` 32-byte vectors of keys are tested against the running threshold at once: for
// random rows almost every block holds nothing above it after the first few hundred entries, so
// the scan costs a few vector compares per 32 fp32 entries and only the lanes of a passing block
// that beat the threshold go through the exact (scalar) insert path. The same blocks give the
// block maxima of select_row_by_block_max below.
constexpr int kScanVecs = 4;

// Whether any of the kScanVecs·vec_width entries at p is > t (NaN never is, as in `wants`).
template <typename acc, typename scalar_t>
FT_ALWAYS_INLINE bool any_above(const scalar_t* p, acc t) {
  constexpr int W = cpu::vec_width<acc>;
  const cpu::vec_t<acc> tv = broadcast(t);
  auto m = cpu::load_vec_by_bits<acc>(p) > tv;
  for (int i = 1; i < kScanVecs; ++i) m |= cpu::load_vec_by_bits<acc>(p + i * W) > tv;
  return any_lane(m);
}

// Bit j set iff entry j of the kScanVecs·vec_width (<= 32) entries at p is > t (>= t when
// kInclusive). NaN never sets a bit.
template <bool kInclusive = false, typename acc, typename scalar_t>
FT_ALWAYS_INLINE uint32_t bits_above(const scalar_t* p, acc t) {
  constexpr int W = cpu::vec_width<acc>;
  const cpu::vec_t<acc> tv = broadcast(t);
  uint32_t bits = 0;
  for (int i = 0; i < kScanVecs; ++i) {
    const cpu::vec_t<acc> v = cpu::load_vec_by_bits<acc>(p + i * W);
    const auto m = kInclusive ? v >= tv : v > tv;
    for (int j = 0; j < W; ++j) bits |= static_cast<uint32_t>(m[j] & 1) << (i * W + j);
  }
  return bits;
}

// The largest of the kScanVecs·vec_width entries at p, NaN ignored (-inf when all are NaN).
template <typename acc, typename scalar_t>
FT_ALWAYS_INLINE acc block_max(const scalar_t* p) {
  constexpr int W = cpu::vec_width<acc>;
  cpu::vec_t<acc> mx = broadcast(-std::numeric_limits<acc>::infinity());
  for (int i = 0; i < kScanVecs; ++i) {
    const cpu::vec_t<acc> v = cpu::load_vec_by_bits<acc>(p + i * W);
    mx = v > mx ? v : mx;
  }
  acc r = mx[0];
  for (int j = 1; j < W; ++j) r = mx[j] > r ? mx[j] : r;
  return r;
}

// Bit j set iff entry j of the 2·vec_width entries at p is > t[j] (per-lane thresholds).
template <typename acc, typename scalar_t>
FT_ALWAYS_INLINE uint32_t above_bits(const scalar_t* p, const acc* t) {
  constexpr int W = cpu::vec_width<acc>;
  const auto m0 = cpu::load_vec_by_bits<acc>(p) > cpu::load_vec<acc>(t);
  const auto m1 = cpu::load_vec_by_bits<acc>(p + W) > cpu::load_vec<acc>(t + W);
  uint32_t bits = 0;
  for (int j = 0; j < W; ++j) bits |= static_cast<uint32_t>(m0[j] & 1) << j;
  for (int j = 0; j < W; ++j) bits |= static_cast<uint32_t>(m1[j] & 1) << (W + j);
  return bits;
}

// The k best entries of one row into `sel`, in increasing feature order so an equal key with a
// larger index never displaces a kept one. Blocks are skipped only once the buffer holds k
// entries: until then every entry is wanted.
template <typename scalar_t, typename acc>
FT_ALWAYS_INLINE void scan_row(const scalar_t* row, int64_t F, TopSelector<acc>& sel) {
  constexpr int64_t kBlock = kScanVecs * cpu::vec_width<acc>;
  int64_t f = 0;
  for (; f + kBlock <= F; f += kBlock) {
    if (static_cast<int64_t>(sel.buf.size()) >= sel.k) {
      if (!any_above<acc>(row + f, sel.threshold)) continue;
      // Visit only the lanes above the block's starting threshold, in index order; a push may
      // raise the threshold, so each is tested again (no NaN among them: NaN is never above).
      for (uint32_t bits = bits_above<false, acc>(row + f, sel.threshold); bits != 0; bits &= bits - 1) {
        const int64_t j = f + __builtin_ctz(bits);
        const acc v = static_cast<acc>(row[j]);
        if (sel.wants(v)) sel.push(v, j);
      }
      continue;
    }
    for (int64_t j = 0; j < kBlock; ++j) {
      const acc v = rank_key(static_cast<acc>(row[f + j]));
      if (sel.wants(v)) sel.push(v, f + j);
    }
  }
  for (; f < F; ++f) {
    const acc v = rank_key(static_cast<acc>(row[f]));
    if (sel.wants(v)) sel.push(v, f);
  }
}

// Below this k the streaming scan rarely leaves its vector test and one pass is cheaper.
constexpr int64_t kTwoPassMinK = 16;

// Two passes over a row (the second from cache): the block maxima are k distinct entries when
// there are at least k blocks, so their k-th largest t0 is a lower bound of the row's k-th best
// key and every entry of the top k is >= t0. Pass 2 collects the entries >= t0 (of the blocks
// whose maximum reaches it: about k of them on random data) and selects the k best exactly.
// Returns false, leaving the row to the streaming scan, when there are fewer than k blocks,
// t0 is -inf (NaN or -inf rows) or ties make the candidates many.
template <typename scalar_t, typename acc>
FT_ALWAYS_INLINE bool select_row_by_block_max(const scalar_t* row, int64_t F, int64_t k, std::vector<acc>& maxima,
                                              std::vector<acc>& scratch, TopSelector<acc>& sel) {
  constexpr int64_t kBlock = kScanVecs * cpu::vec_width<acc>;
  const int64_t nb = F / kBlock;
  if (k < kTwoPassMinK || nb < k) return false;
  maxima.resize(nb);
  for (int64_t i = 0; i < nb; ++i) maxima[i] = block_max<acc>(row + i * kBlock);
  scratch.assign(maxima.begin(), maxima.end());
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<acc>());
  const acc t0 = scratch[k - 1];
  if (!(t0 > -std::numeric_limits<acc>::infinity())) return false;
  sel.reset(k);
  auto& cand = sel.buf;
  const size_t cap = static_cast<size_t>(4 * k + 256);
  for (int64_t i = 0; i < nb; ++i) {
    if (!(maxima[i] >= t0)) continue;
    for (uint32_t bits = bits_above<true>(row + i * kBlock, t0); bits != 0; bits &= bits - 1) {
      const int64_t j = i * kBlock + __builtin_ctz(bits);
      cand.push_back({static_cast<acc>(row[j]), j});
    }
    if (cand.size() > cap) return false;
  }
  for (int64_t f = nb * kBlock; f < F; ++f) {
    const acc v = static_cast<acc>(row[f]);
    if (v >= t0) cand.push_back({v, f});
  }
  if (static_cast<int64_t>(cand.size()) < k) return false;  // cannot happen: the k maxima are in
  sel.finish_sorted();
  return true;
}

template <typename scalar_t>
FT_ALWAYS_INLINE void topk_rows(const scalar_t* p, int64_t F, int64_t stride, int64_t k, scalar_t* out_v,
                                int64_t* out_i, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  TopSelector<acc> sel;
  std::vector<acc> maxima, scratch;
  for (int64_t b = begin; b < end; ++b) {
    const scalar_t* row = p + b * stride;
    if (!select_row_by_block_max(row, F, k, maxima, scratch, sel)) {
      sel.reset(k);
      scan_row(row, F, sel);
      sel.finish_sorted();
    }
    for (int64_t j = 0; j < k; ++j) {
      const int64_t idx = sel.buf[j].index;
      out_i[b * k + j] = idx;
      out_v[b * k + j] = row[idx];
    }
  }
}

template <typename scalar_t>
void topk_rows_base(const scalar_t* p, int64_t F, int64_t stride, int64_t k, scalar_t* out_v, int64_t* out_i,
                    int64_t begin, int64_t end) {
  topk_rows(p, F, stride, k, out_v, out_i, begin, end);
}

#if FT_HAVE_AVX2_PATH
template <typename scalar_t>
FT_TARGET_AVX2 void topk_rows_avx2(const scalar_t* p, int64_t F, int64_t stride, int64_t k, scalar_t* out_v,
                                   int64_t* out_i, int64_t begin, int64_t end) {
  topk_rows(p, F, stride, k, out_v, out_i, begin, end);
}
#endif

template <typename scalar_t>
void topk_cpu_impl(const at::Tensor& pre, int64_t k, const at::Tensor& values, const at::Tensor& indices) {
  const int64_t B = pre.size(0), F = pre.size(1), stride = pre.stride(0);
  const scalar_t* p = pre.const_data_ptr<scalar_t>();
  scalar_t* out_v = values.data_ptr<scalar_t>();
  int64_t* out_i = indices.data_ptr<int64_t>();
  const bool avx2 = cpu::cpu_has_avx2();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
#if FT_HAVE_AVX2_PATH
    if (avx2) return topk_rows_avx2(p, F, stride, k, out_v, out_i, begin, end);
#endif
    topk_rows_base(p, F, stride, k, out_v, out_i, begin, end);
  });
}

constexpr int64_t kPrefetchRows = 4;

// Feature choice: blocks of kBlock adjacent features read row by row (whole cache lines), one
// selector per feature of the block.
template <typename scalar_t, int64_t kBlock>
FT_ALWAYS_INLINE void column_blocks(const scalar_t* p, int64_t B, int64_t F, int64_t stride, int64_t m,
                                    acc_t<scalar_t>* out_v, int64_t* out_i, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t G = 2 * cpu::vec_width<acc>;
  std::vector<TopSelector<acc>> sel(kBlock);
  acc thr[kBlock];
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t f0 = blk * kBlock, width = std::min(kBlock, F - f0);
    for (int64_t c = 0; c < width; ++c) {
      sel[c].reset(std::min(m, B));
      thr[c] = acc(0);  // only positive entries compete
    }
    auto visit = [&](int64_t c, acc v, int64_t b) {
      sel[c].push(v, b);
      thr[c] = std::max(sel[c].threshold, acc(0));
    };
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* row = p + b * stride + f0;
      // Rows are `stride` apart (a new page each), where the hardware prefetchers stop: the
      // block's slice of the row kPrefetchRows ahead is requested now, a cache line at a time.
      if (b + kPrefetchRows < B) {
        const char* ahead = reinterpret_cast<const char*>(row + kPrefetchRows * stride);
        for (int64_t byte = 0; byte < width * static_cast<int64_t>(sizeof(scalar_t)); byte += 64)
          __builtin_prefetch(ahead + byte, 0, 3);
      }
      int64_t c0 = 0;
      for (; c0 + G <= width; c0 += G) {
        for (uint32_t bits = above_bits<acc>(row + c0, thr + c0); bits != 0; bits &= bits - 1) {
          const int64_t c = c0 + __builtin_ctz(bits);
          visit(c, static_cast<acc>(row[c]), b);
        }
      }
      for (int64_t c = c0; c < width; ++c) {
        const acc v = static_cast<acc>(row[c]);
        if (v > thr[c]) visit(c, v, b);
      }
    }
    for (int64_t c = 0; c < width; ++c) {
      TopSelector<acc>& s = sel[c];
      if (!s.truncated && static_cast<int64_t>(s.buf.size()) < m) {  // fewer than m positive entries
        out_v[f0 + c] = acc(0);
        out_i[f0 + c] = -1;
        continue;
      }
      s.shrink();  // buf[m - 1] is now the m-th best: the cutoff
      out_v[f0 + c] = s.buf[m - 1].key;
      out_i[f0 + c] = s.buf[m - 1].index;
    }
  }
}

template <typename scalar_t, int64_t kBlock>
void column_blocks_base(const scalar_t* p, int64_t B, int64_t F, int64_t stride, int64_t m,
                        acc_t<scalar_t>* out_v, int64_t* out_i, int64_t begin, int64_t end) {
  column_blocks<scalar_t, kBlock>(p, B, F, stride, m, out_v, out_i, begin, end);
}

#if FT_HAVE_AVX2_PATH
template <typename scalar_t, int64_t kBlock>
FT_TARGET_AVX2 void column_blocks_avx2(const scalar_t* p, int64_t B, int64_t F, int64_t stride, int64_t m,
                                       acc_t<scalar_t>* out_v, int64_t* out_i, int64_t begin, int64_t end) {
  column_blocks<scalar_t, kBlock>(p, B, F, stride, m, out_v, out_i, begin, end);
}
#endif

template <typename scalar_t>
void column_cutoff_impl(const at::Tensor& pre, int64_t m, const at::Tensor& cut_value, const at::Tensor& cut_index) {
  using acc = acc_t<scalar_t>;
  const int64_t B = pre.size(0), F = pre.size(1), stride = pre.stride(0);
  const scalar_t* p = pre.const_data_ptr<scalar_t>();
  acc* out_v = cut_value.data_ptr<acc>();
  int64_t* out_i = cut_index.data_ptr<int64_t>();
  if (m == 0) {
    std::fill(out_v, out_v + F, std::numeric_limits<acc>::infinity());
    std::fill(out_i, out_i + F, int64_t(-1));
    return;
  }
  // 256 adjacent features a block: 1 KiB of each fp32 row, so rows stream through the
  // prefetchers instead of touching one cache line per 64 KiB. An entry passes a selector's
  // filter iff it beats max(its threshold, 0) (0 until the buffer first fills), kept here
  // in a flat array so the common case is one vector comparison per 8 entries; the lanes that pass
  // come out as a bit mask, so only they are visited (no unpredictable branch per entry).
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (F + kBlock - 1) / kBlock;
  const bool avx2 = cpu::cpu_has_avx2();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
#if FT_HAVE_AVX2_PATH
    if (avx2) return column_blocks_avx2<scalar_t, kBlock>(p, B, F, stride, m, out_v, out_i, begin, end);
#endif
    column_blocks_base<scalar_t, kBlock>(p, B, F, stride, m, out_v, out_i, begin, end);
  });
}

}  // namespace

void topk_cpu(const at::Tensor& pre, int64_t k, const at::Tensor& values, const at::Tensor& indices) {
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_topk_cpu", [&] { topk_cpu_impl<scalar_t>(pre, k, values, indices); });
}

void column_cutoff_cpu(const at::Tensor& pre, int64_t m, const at::Tensor& value, const at::Tensor& index) {
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_column_cutoff_cpu",
                               [&] { column_cutoff_impl<scalar_t>(pre, m, value, index); });
}

}  // namespace sae
}  // namespace fusedtrain
