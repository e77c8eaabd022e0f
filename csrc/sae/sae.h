// SAE routing and sparse decode ops: the device-independent halves (argument checks, allocation,
// CSR assembly) and the interface each backend's kernels implement.
#pragma once

#include "sae_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace torch {
class Library;
}

namespace fusedtrain {
namespace sae {

// Per-feature cutoffs (see sae_math.h) over a (B, F) matrix with unit-stride rows. `value`
// (accumulate type) and `index` (int64) hold F entries, or one shared by every feature.
// `flat`: the tie index is b·F + f (mutual choice), else the token b.
struct Cutoffs {
  at::Tensor pre;
  at::Tensor value;
  at::Tensor index;
  bool flat = false;
};

// What each backend supplies. Outputs are allocated by the caller with their final shapes.
struct Kernels {
  // Row top-k by ranks_before: values (B, k) in pre's dtype, indices (B, k) int64, best first.
  void (*topk)(const at::Tensor& pre, int64_t k, const at::Tensor& values, const at::Tensor& indices);
  // Per feature, its r-th best positive token (value, token): value (F,) and index (F,), the rank
  // r = m + 1 (the first token feature choice rejects; sae_math.h). At least r positive tokens: the
  // r-th best. Fewer than r (exactly r - 1 included): (0, -1). r == 0: (+inf, -1).
  void (*column_cutoff)(const at::Tensor& pre, int64_t r, const at::Tensor& value, const at::Tensor& index);
  // The r-th best positive entry of the whole matrix (r = budget + 1), the same rules: value (1,),
  // flat index (1,).
  void (*global_cutoff)(const at::Tensor& pre, int64_t r, const at::Tensor& value,
                        const at::Tensor& index);
  // Kept entries per row -> counts (B,) int64; then their features (ascending) and values.
  void (*count_kept)(const Cutoffs& c, const at::Tensor& counts);
  void (*fill_kept)(const Cutoffs& c, const at::Tensor& row_ptr, const at::Tensor& feature,
                    const at::Tensor& value);
  // Index values (sae.cpp checks shapes, dtypes and devices; values are never trusted): row_ptr
  // and col_ptr reach the kernels non-decreasing within [0, nnz] (read_offsets: clamped, then
  // their running maximum; a valid one unchanged), so row b is entries [row_ptr[b], row_ptr[b+1])
  // and no two rows overlap. An entry whose feature (token, perm) is outside its table contributes
  // nothing; an entry outside every row gets 0 from sampled_dot. Every write index is bounded by
  // construction, so no input can make a kernel touch memory outside its tensors.
  //
  // out[b] = bias + Σ_{j in row b} coef_j · table[col_j]   (bias may be undefined)
  void (*gather_rows)(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef,
                      const at::Tensor& table, const at::Tensor& bias, const at::Tensor& out);
  // out_j = grad[b_j] · table[col_j]   (dot products at the stored entries only)
  void (*sampled_dot)(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& grad,
                      const at::Tensor& table, const at::Tensor& out);
  // out[f] = Σ_{p in col_ptr[f]..} coef[perm_p] · src[token_p], coef_sum[f] = Σ coef[perm_p]:
  // per-feature aggregation in a fixed order (deterministic, no float atomics). A position p whose
  // perm_p is outside [0, nnz) or token_p outside [0, B) is skipped in both sums.
  void (*segment_sum)(const at::Tensor& col_ptr, const at::Tensor& perm, const at::Tensor& token,
                      const at::Tensor& coef, const at::Tensor& src, const at::Tensor& out,
                      const at::Tensor& coef_sum);
  // The CSC form of a CSR (col_ptr (num_cols + 1,), perm (nnz,), token (nnz,)): each feature's
  // entries in entry order (= token order). An entry is dropped when it lies in no row or its
  // feature is outside [0, num_cols): dropped entries follow col_ptr[num_cols], in entry order,
  // with token -1 (before row 0) or B (after row B - 1) where they lie in no row.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*csc)(const at::Tensor& row_ptr, const at::Tensor& col,
                                                        int64_t num_cols);
  static void impl_ops(torch::Library& m);  // sae.cpp
};

using Csr4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor> topk_select(const at::Tensor& pre, int64_t k, const Kernels& K);
Csr4 route(const at::Tensor& pre, const std::string& routing, int64_t k,
           const c10::optional<at::Tensor>& theta, const Kernels& K);
Csr4 encode(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& b_dec,
            const std::string& routing, int64_t k, const c10::optional<at::Tensor>& theta, const Kernels& K);
at::Tensor gather_rows(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef,
                       const at::Tensor& table, const c10::optional<at::Tensor>& bias, const Kernels& K);
at::Tensor sampled_dot(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& grad,
                       const at::Tensor& table, const Kernels& K);
// Kernels::csc from torch ops (a stable sort by feature, no host sync): the CUDA backend's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> csc_torch(const at::Tensor& row_ptr, const at::Tensor& col,
                                                         int64_t num_cols);
std::tuple<at::Tensor, at::Tensor, at::Tensor> csc(const at::Tensor& row_ptr, const at::Tensor& col,
                                                   int64_t num_cols, const Kernels& K);
std::tuple<at::Tensor, at::Tensor> segment_sum(const at::Tensor& col_ptr, const at::Tensor& perm,
                                               const at::Tensor& token, const at::Tensor& coef,
                                               const at::Tensor& src, const Kernels& K);

}  // namespace sae
}  // namespace fusedtrain
