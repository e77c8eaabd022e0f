// Selection rules shared by the CPU and CUDA routing kernels (__host__ __device__), so the CPU tests
// cover the very predicates the GPU evaluates.
//
// Every routing keeps entries with pre > 0 ranked by (value descending, index ascending); the index
// is the feature for TopK, the token for feature choice, the flat position b·F + f for mutual
// choice. Feature choice, mutual choice and threshold routing all reduce to one per-feature cutoff
// (T_f, L_f), the FIRST REJECTED entry: entry (b, f) is kept iff pre > 0 and it ranks strictly
// before (T_f, L_f), i.e. pre > T_f, or pre == T_f and idx < L_f.
//   * feature choice with m (mutual choice with budget m): (T, L) is the (m+1)-th best positive
//     entry of the column (of the matrix) when there are more than m positive entries, else
//     (0, -1): every positive entry is kept. m = 0 therefore gives the best positive entry.
//   * threshold routing: (θ_f, -1), i.e. pre > θ_f.
// The routings return T as their cutoff: `pre > T` (threshold routing) reproduces the selection
// exactly, except kept entries tied in value with the first rejected one (docs/sae.md).
// T = 0 with L = -1 keeps every positive entry; L = -1 alone is `pre > T`; T = +inf keeps nothing.
#pragma once

#include "../common/math.h"

#include <cstdint>
#include <cstring>
#include <limits>

namespace fusedtrain {
namespace sae {

// NaN ranks below everything (as -inf) and is never selected: the order stays total.
template <typename acc>
FT_HOST_DEVICE inline acc rank_key(acc v) {
  return v != v ? -std::numeric_limits<acc>::infinity() : v;
}

// Whether (va, ia) ranks before (vb, ib): larger value first, then smaller index.
template <typename acc>
FT_HOST_DEVICE inline bool ranks_before(acc va, int64_t ia, acc vb, int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}

// The cutoff predicate above; `idx` is the token (feature choice) or flat index (mutual choice).
template <typename acc>
FT_HOST_DEVICE inline bool kept(acc v, acc cut_value, int64_t idx, int64_t cut_index) {
  return v > acc(0) && (v > cut_value || (v == cut_value && idx < cut_index));
}

// Radix bucket of a positive value: its top 16 bits, monotone in the value for positive floats.
FT_HOST_DEVICE inline uint32_t radix_bucket(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits >> 16;
}
FT_HOST_DEVICE inline uint32_t radix_bucket(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return static_cast<uint32_t>(bits >> 48);
}
constexpr int kRadixBuckets = 1 << 16;

// Entries [lo, hi) of row i of a CSR (column i of a CSC), clamped to [0, nnz] so a malformed
// row_ptr cannot index out of bounds.
FT_HOST_DEVICE inline void clamped_range(const int64_t* ptr, int64_t i, int64_t nnz, int64_t& lo, int64_t& hi) {
  const int64_t a = ptr[i], b = ptr[i + 1];
  lo = a < 0 ? 0 : (a > nnz ? nnz : a);
  hi = b < lo ? lo : (b > nnz ? nnz : b);
}

}  // namespace sae
}  // namespace fusedtrain
