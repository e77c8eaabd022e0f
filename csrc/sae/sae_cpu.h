// CPU kernels of the SAE ops (sae.h's Kernels), one file per job: sae_select_cpu.cpp (row top-k,
// column cutoff), sae_mutual_cpu.cpp (mutual choice's global cutoff), sae_csr_cpu.cpp (kept entries
// into the CSR, CSC), sae_products_cpu.cpp (decode and the backward products); sae_cpu.cpp
// registers them as the CPU backend.
//
// Routing reads the pre-activations row by row (column blocks for feature choice) and keeps only a
// small candidate buffer per row or column: a running threshold rejects almost every entry after
// the first few, so nothing is sorted but the survivors.
// Mutual choice is a radix select: one histogram pass over the top 16 bits, one pass collecting
// the entries of the cutoff bucket, then a selection among those few.
// Decode and the backward products touch the kept entries only, accumulating in fp32 (fp64 for
#pragma once

#include "sae.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace fusedtrain {
namespace sae {

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

void topk_cpu(const at::Tensor& pre, int64_t k, const at::Tensor& values, const at::Tensor& indices);
void column_cutoff_cpu(const at::Tensor& pre, int64_t m, const at::Tensor& value, const at::Tensor& index);
void global_cutoff_cpu(const at::Tensor& pre, int64_t budget, const at::Tensor& value, const at::Tensor& index);
void count_kept_cpu(const Cutoffs& c, const at::Tensor& counts);
void fill_kept_cpu(const Cutoffs& c, const at::Tensor& row_ptr, const at::Tensor& feature, const at::Tensor& value);
std::tuple<at::Tensor, at::Tensor, at::Tensor> csc_cpu(const at::Tensor& row_ptr, const at::Tensor& col,
                                                       int64_t num_cols);
void gather_rows_cpu(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef,
                     const at::Tensor& table, const at::Tensor& bias, const at::Tensor& out);
void sampled_dot_cpu(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& grad,
                     const at::Tensor& table, const at::Tensor& out);
void segment_sum_cpu(const at::Tensor& col_ptr, const at::Tensor& perm, const at::Tensor& token,
                     const at::Tensor& coef, const at::Tensor& src, const at::Tensor& out,
                     const at::Tensor& coef_sum);

}  // namespace sae
}  // namespace fusedtrain
