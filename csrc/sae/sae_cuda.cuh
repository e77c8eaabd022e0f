// CUDA kernels of the SAE ops (sae.h's Kernels), one file per job: sae_select_cuda.cu (row top-k,
// column cutoff), sae_mutual_cuda.cu (mutual choice's global cutoff), sae_csr_cuda.cu (kept entries
// into the CSR), sae_products_cuda.cu (decode and the backward products); sae_cuda.cu registers
// them as the CUDA backend (the CSC is sae.cpp's torch-op version).
//
// Routing is selection on order-preserving integer keys of the values, never a sort of the row:
//   * column cutoff (feature choice, m <= kMaxColumnM): one block per 32 features, the same
//     read-once candidate buffers per feature, read from the row-major matrix;
//   * row select (one block a row): TopK's k best entries of each row, or feature choice's cutoff
//     of each feature for larger m (on the transposed pre-activations, positive entries only). The
//     read-once kernel streams the row once into a shared candidate buffer behind a running
//     threshold (radix select inside shared memory when the buffer fills); the multi-pass radix
//     select over the row (8 bits a pass) remains for ranks above kMaxTopK and rows of >= 2^31;
//   * global select (mutual choice): histogram passes over the whole matrix, with the running
//     prefix and rank kept on the device (no host sync between passes), then the tie at the cutoff
//     located by per-row tie counts and one ordered scan of the row that holds it.
// Ties are ranked by index with ordered block scans (ballot + popc), so results are deterministic
// and equal to the CPU kernels'. Kept-entry extraction is one block a row with the same scans.
//
// Reads of the B x F pre-activations per routing, bf16/fp16 (radix passes over the matrix: 2 in
// bf16/fp16, 4 in fp32, 8 in fp64):
//   * TopK: 1 (read-once row select; then k gathered values a row, and the CSR is built from the
//     (B, k) result without touching pre again).
//   * feature choice: 3: the read-once column cutoff straight from the row-major matrix (1), then
//     count + ordered fill of the kept entries (2). m >= B reads nothing for the cutoff. With
//     kMaxColumnM < m the cutoff takes a transposed copy (1 read, 1 write, a B x F temporary) and
//     the read-once row kernel over it (1 read); above kMaxTopK the multi-pass row select (count,
//     radix passes, ordered scan: 4 reads of the copy in bf16).
//   * mutual choice: 5: 2 global histogram passes, 1 tie count (the tie locate scans one row),
//     count + fill (2).
//   * threshold: 2 (count + fill).
// Decode and the backward products: one block a token (gather-accumulate, fp32 accumulation), one
#pragma once

#include "sae.h"

#include "../common/checks.h"
#include "../common/cuda/launch.cuh"
#include "../common/cuda/reduce.cuh"
#include "../common/cuda/sort.cuh"
#include "../common/dispatch.h"

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fusedtrain {
namespace sae {

using cuda::kThreads;
using cuda::kWarps;
using cuda::block_exclusive_count;
using cuda::block_exclusive_sum;
using cuda::block_sum;
using cuda::key_t;
using cuda::key_value;
using cuda::ordered_key;
using cuda::sort_best_first;

// A grid of `blocks` blocks is launchable (gridDim.x < 2^31).
inline void check_grid(int64_t blocks, const char* what) {
  FT_CHECK_VALUE(blocks < (int64_t(1) << 31), what, " must be < 2^31 on CUDA, got ", blocks);
}

void topk_cuda(const at::Tensor& pre, int64_t k, const at::Tensor& values, const at::Tensor& indices);
void column_cutoff_cuda(const at::Tensor& pre, int64_t m, const at::Tensor& value, const at::Tensor& index);
void global_cutoff_cuda(const at::Tensor& pre, int64_t budget, const at::Tensor& value, const at::Tensor& index);
void count_kept_cuda(const Cutoffs& c, const at::Tensor& counts);
void fill_kept_cuda(const Cutoffs& c, const at::Tensor& row_ptr, const at::Tensor& feature, const at::Tensor& value);
void gather_rows_cuda(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef,
                      const at::Tensor& table, const at::Tensor& bias, const at::Tensor& out);
void sampled_dot_cuda(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& grad,
                      const at::Tensor& table, const at::Tensor& out);
void segment_sum_cuda(const at::Tensor& col_ptr, const at::Tensor& perm, const at::Tensor& token,
                      const at::Tensor& coef, const at::Tensor& src, const at::Tensor& out,
                      const at::Tensor& coef_sum);

}  // namespace sae
}  // namespace fusedtrain
