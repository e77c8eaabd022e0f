// CPU kernels of the SAE ops. Routing reads the pre-activations row by row (column blocks for
// feature choice) and keeps only a small candidate buffer per row or column: a running threshold
// rejects almost every entry after the first few, so nothing is sorted but the survivors.
// Mutual choice is a radix select: one histogram pass over the top 16 bits, one pass collecting
// the entries of the cutoff bucket, then a selection among those few.
// Decode and the backward products touch the kept entries only, accumulating in fp32 (fp64 for
// fp64), and aggregate per feature in a fixed order (deterministic).
#include "sae.h"

#include "../common/backend.h"
#include "../common/checks.h"
#include "../common/cpu/memory.h"
#include "../common/cpu/simd.h"
#include "../common/dispatch.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <functional>
#include <cstring>
#include <type_traits>
#include <limits>
#include <mutex>
#include <vector>

namespace fusedtrain {
namespace sae {
namespace {

// The `k` best (key, index) pairs of a stream pushed in increasing index order. Entries at or
// below the current k-th best key are rejected: an equal key with a larger index ranks lower.
template <typename acc>
struct TopSelector {
  struct Entry {
    acc key;
    int64_t index;
  };
  static bool better(const Entry& a, const Entry& b) { return ranks_before(a.key, a.index, b.key, b.index); }
  // `better` as a function object: std algorithms inline it, where a function pointer would be
  // called per comparison in the shrinks.
  struct Better {
    bool operator()(const Entry& a, const Entry& b) const { return better(a, b); }
  };

  std::vector<Entry> buf;
  int64_t k = 0;
  acc threshold = -std::numeric_limits<acc>::infinity();
  bool truncated = false;  // whether entries were dropped (so the buffer no longer holds them all)

  void reset(int64_t k_) {
    k = k_;
    truncated = false;
    buf.clear();
    buf.reserve(std::min<int64_t>(2 * k_ + 1, 4096));  // grows on demand: 256 selectors a block
    threshold = -std::numeric_limits<acc>::infinity();
  }
  bool wants(acc key) const { return key > threshold || static_cast<int64_t>(buf.size()) < k; }
  void push(acc key, int64_t index) {
    buf.push_back({key, index});
    if (static_cast<int64_t>(buf.size()) >= 2 * k) shrink();
  }
  void shrink() {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), Better());
    buf.resize(k);
    truncated = true;
    threshold = buf[k - 1].key;  // nth_element put the k-th best there, the better ones before it
  }
  // The k best, best first (fewer when fewer were pushed).
  void finish_sorted() {
    if (static_cast<int64_t>(buf.size()) > k) shrink();
    std::sort(buf.begin(), buf.end(), Better());
  }
};

// `kScanVecs` 32-byte vectors of keys are tested against the running threshold at once: for
// random rows almost every block holds nothing above it after the first few hundred entries, so
// the scan costs a few vector compares per 32 fp32 entries and only the lanes of a passing block
// that beat the threshold go through the exact (scalar) insert path. The same blocks give the
// block maxima of select_row_by_block_max below.
constexpr int kScanVecs = 4;

using cpu::any_lane;
using cpu::broadcast;
using cpu::lane_bits;

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

void topk_cpu(const at::Tensor& pre, int64_t k, const at::Tensor& values, const at::Tensor& indices) {
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_topk_cpu", [&] { topk_cpu_impl<scalar_t>(pre, k, values, indices); });
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
      if (!s.truncated && static_cast<int64_t>(s.buf.size()) <= m) {  // every positive entry is kept
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

void column_cutoff_cpu(const at::Tensor& pre, int64_t m, const at::Tensor& value, const at::Tensor& index) {
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_column_cutoff_cpu",
                               [&] { column_cutoff_impl<scalar_t>(pre, m, value, index); });
}

// Bit j set iff entry j of the vec_width entries at p is > 0 with radix_bucket == bucket: the
// top 16 bits of the acc value, compared as integers (vector form of the scalar test below).
template <typename acc, typename scalar_t>
FT_ALWAYS_INLINE uint32_t in_bucket_bits(const scalar_t* p, uint32_t bucket) {
  using U = std::conditional_t<sizeof(acc) == 4, uint32_t, uint64_t>;
  typedef U uvec __attribute__((vector_size(32)));
  const cpu::vec_t<acc> v = cpu::load_vec_by_bits<acc>(p);
  uvec u;
  std::memcpy(&u, &v, sizeof(u));
  const auto in = ((u >> (8 * sizeof(acc) - 16)) == static_cast<U>(bucket)) & (v > broadcast(acc(0)));
  return lane_bits(in);
}

// Mutual choice: radix select over the positive entries.
template <typename scalar_t>
void global_cutoff_impl(const at::Tensor& pre, int64_t budget, const at::Tensor& cut_value,
                        const at::Tensor& cut_index) {
  using acc = acc_t<scalar_t>;
  const int64_t B = pre.size(0), F = pre.size(1), stride = pre.stride(0);
  const scalar_t* p = pre.const_data_ptr<scalar_t>();
  acc* out_v = cut_value.data_ptr<acc>();
  int64_t* out_i = cut_index.data_ptr<int64_t>();
  out_v[0] = std::numeric_limits<acc>::infinity();
  out_i[0] = -1;
  if (budget == 0) return;
  // Pass 1: per-thread histograms of the top 16 bits of the positive entries.
  const int threads = at::get_num_threads();
  std::vector<int64_t> hist(static_cast<size_t>(threads) * kRadixBuckets, 0);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(F, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    int64_t* h = hist.data() + static_cast<size_t>(at::get_thread_num()) * kRadixBuckets;
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = p + b * stride;
      for (int64_t f = 0; f < F; ++f) {
        // Branch-free: the sign of N(0, 1)-like data is a coin flip no predictor learns.
        const acc v = static_cast<acc>(row[f]);
        h[radix_bucket(v) & (kRadixBuckets - 1)] += static_cast<int64_t>(v > acc(0));
      }
    }
  });
  for (int t = 1; t < threads; ++t)
    for (int i = 0; i < kRadixBuckets; ++i) hist[i] += hist[static_cast<size_t>(t) * kRadixBuckets + i];
  int64_t above = 0;
  int bucket = kRadixBuckets - 1;
  for (; bucket >= 0; --bucket) {
    if (above + hist[bucket] >= budget) break;
    above += hist[bucket];
  }
  if (bucket < 0) {  // fewer positive entries than the budget: keep them all
    out_v[0] = acc(0);
    return;
  }
  const int64_t need = budget - above;  // taken from the cutoff bucket, best first
  // Pass 2: the entries of the cutoff bucket, then an exact selection among them.
  using Entry = typename TopSelector<acc>::Entry;
  std::vector<Entry> candidates;
  std::mutex lock;
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<Entry> local;
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* row = p + b * stride;
      constexpr int64_t W = cpu::vec_width<acc>;
      int64_t f = 0;
      for (; f + W <= F; f += W) {
        for (uint32_t bits = in_bucket_bits<acc>(row + f, static_cast<uint32_t>(bucket)); bits != 0;
             bits &= bits - 1) {
          const int64_t j = f + __builtin_ctz(bits);
          local.push_back({static_cast<acc>(row[j]), b * F + j});
        }
      }
      for (; f < F; ++f) {
        const acc v = static_cast<acc>(row[f]);
        if ((v > acc(0)) & (static_cast<int>(radix_bucket(v)) == bucket)) local.push_back({v, b * F + f});
      }
    }
    std::lock_guard<std::mutex> guard(lock);
    candidates.insert(candidates.end(), local.begin(), local.end());
  });
  FT_CHECK(static_cast<int64_t>(candidates.size()) >= need, "mutual choice: radix select lost entries");
  std::nth_element(candidates.begin(), candidates.begin() + (need - 1), candidates.end(),
                   typename TopSelector<acc>::Better());
  out_v[0] = candidates[need - 1].key;
  out_i[0] = candidates[need - 1].index;
}

void global_cutoff_cpu(const at::Tensor& pre, int64_t budget, const at::Tensor& value, const at::Tensor& index) {
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_global_cutoff_cpu",
                               [&] { global_cutoff_impl<scalar_t>(pre, budget, value, index); });
}

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

// CSC of a CSR by counting sort: entries of each feature in token order (deterministic).
std::tuple<at::Tensor, at::Tensor, at::Tensor> csc_cpu(const at::Tensor& row_ptr_in, const at::Tensor& col_in,
                                                       int64_t num_cols) {
  FT_CHECK_VALUE(row_ptr_in.dim() == 1 && row_ptr_in.size(0) >= 1 && row_ptr_in.scalar_type() == at::kLong &&
                     col_in.dim() == 1 && col_in.scalar_type() == at::kLong,
                 "row_ptr and feature must be 1-D int64 tensors");
  FT_CHECK_VALUE(num_cols >= 0, "num_cols must be >= 0, got ", num_cols);
  auto row_ptr = row_ptr_in.contiguous();
  auto col = col_in.contiguous();
  const int64_t B = row_ptr.size(0) - 1, nnz = col.size(0);
  auto col_ptr = at::zeros({num_cols + 1}, col.options());
  auto perm = at::empty({nnz}, col.options());
  auto token = at::empty({nnz}, col.options());
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const int64_t* cl = col.const_data_ptr<int64_t>();
  int64_t* cp = col_ptr.data_ptr<int64_t>();
  int64_t* pm = perm.data_ptr<int64_t>();
  int64_t* tk = token.data_ptr<int64_t>();
  for (int64_t j = 0; j < nnz; ++j) {
    FT_CHECK_VALUE(cl[j] >= 0 && cl[j] < num_cols, "feature holds indices outside [0, ", num_cols, ")");
    ++cp[cl[j] + 1];
  }
  for (int64_t f = 0; f < num_cols; ++f) cp[f + 1] += cp[f];
  std::vector<int64_t> next(cp, cp + std::max<int64_t>(num_cols, 1));
  for (int64_t b = 0; b < B; ++b) {
    int64_t lo, hi;
    lo = std::min(std::max<int64_t>(rp[b], 0), nnz);
    hi = std::min(std::max<int64_t>(rp[b + 1], lo), nnz);
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t pos = next[cl[j]]++;
      pm[pos] = j;
      tk[pos] = b;
    }
  }
  FT_CHECK_VALUE(B >= 0 && rp[0] == 0 && rp[B] == nnz, "row_ptr must run from 0 to nnz = ", nnz);
  return {col_ptr, perm, token};
}

// Entries [lo, hi) of row b, clamped so a malformed row_ptr cannot index out of bounds.
FT_ALWAYS_INLINE void row_range(const int64_t* rp, int64_t b, int64_t nnz, int64_t& lo, int64_t& hi) {
  lo = std::min(std::max<int64_t>(rp[b], 0), nnz);
  hi = std::min(std::max<int64_t>(rp[b + 1], lo), nnz);
}

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
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(d);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t e = 0; e < d; ++e) sum[e] = bs ? static_cast<acc>(bs[e]) : acc(0);
      int64_t lo, hi;
      row_range(rp, b, nnz, lo, hi);
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

void gather_rows_cpu(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef,
                     const at::Tensor& table, const at::Tensor& bias, const at::Tensor& out) {
  FUSEDTRAIN_DISPATCH_FLOATING(table.scalar_type(), "sae_gather_rows_cpu",
                               [&] { gather_rows_impl<scalar_t>(row_ptr, col, coef, table, bias, out); });
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
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t lo, hi;
      row_range(rp, b, nnz, lo, hi);
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

void sampled_dot_cpu(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& grad,
                     const at::Tensor& table, const at::Tensor& out) {
  FUSEDTRAIN_DISPATCH_FLOATING(grad.scalar_type(), "sae_sampled_dot_cpu",
                               [&] { sampled_dot_impl<scalar_t>(row_ptr, col, grad, table, out); });
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
  at::parallel_for(0, F, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(d);
    for (int64_t f = begin; f < end; ++f) {
      std::fill(sum.begin(), sum.end(), acc(0));
      acc total = 0;
      int64_t lo, hi;
      row_range(cp, f, nnz, lo, hi);
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

void segment_sum_cpu(const at::Tensor& col_ptr, const at::Tensor& perm, const at::Tensor& token,
                     const at::Tensor& coef, const at::Tensor& src, const at::Tensor& out,
                     const at::Tensor& coef_sum) {
  FUSEDTRAIN_DISPATCH_FLOATING(src.scalar_type(), "sae_segment_sum_cpu", [&] {
    segment_sum_impl<scalar_t>(col_ptr, perm, token, coef, src, out, coef_sum);
  });
}

}  // namespace

constexpr Kernels kCpuKernels{
    topk_cpu, column_cutoff_cpu, global_cutoff_cpu, count_kept_cpu, fill_kept_cpu, gather_rows_cpu, sampled_dot_cpu, segment_sum_cpu, csc_cpu};

}  // namespace sae
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CPU, fusedtrain::sae::kCpuKernels)
