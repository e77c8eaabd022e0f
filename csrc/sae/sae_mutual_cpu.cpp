// Mutual choice on the CPU: the r-th best positive entry of the whole matrix (r = budget + 1, sae.h),
// by radix select (sae_cpu.h).
#include "sae_cpu.h"

#include "../common/checks.h"
#include "../common/cpu/isa.h"
#include "../common/cpu/simd.h"
#include "../common/dispatch.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <mutex>
#include <type_traits>

namespace fusedtrain {
namespace sae {
namespace {

using cpu::broadcast;
using cpu::lane_bits;

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
  if (bucket < 0) {  // fewer than r positive entries: no r-th best, (0, -1)
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

}  // namespace

void global_cutoff_cpu(const at::Tensor& pre, int64_t budget, const at::Tensor& value, const at::Tensor& index) {
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_global_cutoff_cpu",
                               [&] { global_cutoff_impl<scalar_t>(pre, budget, value, index); });
}

}  // namespace sae
}  // namespace fusedtrain
