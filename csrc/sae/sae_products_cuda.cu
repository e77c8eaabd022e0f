// Decode and the backward products of the SAE on CUDA (sae_cuda.cuh).
#include "sae_cuda.cuh"

namespace fusedtrain {
namespace sae {
namespace {

// out[b] = bias + Σ_j coef_j · table[col_j]: one block a token, threads across d (coalesced rows).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(
    const int64_t* __restrict__ rp, const int64_t* __restrict__ col, const scalar_t* __restrict__ coef,
    const scalar_t* __restrict__ table, const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t d,
    int64_t R, int64_t nnz) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x;
  int64_t lo, hi;
  clamped_range(rp, b, nnz, lo, hi);
  for (int64_t e = threadIdx.x; e < d; e += kThreads) {
    acc s = bias ? static_cast<acc>(bias[e]) : acc(0);
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t r = col[j];
      if (r >= 0 && r < R) s += static_cast<acc>(coef[j]) * static_cast<acc>(table[r * d + e]);
    }
    out[b * d + e] = static_cast<scalar_t>(s);
  }
}

// out_j = grad[b] · table[col_j]: one block a token, one warp per stored entry.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sampled_dot_kernel(
    const int64_t* __restrict__ rp, const int64_t* __restrict__ col, const scalar_t* __restrict__ grad,
    const scalar_t* __restrict__ table, scalar_t* __restrict__ out, int64_t d, int64_t R, int64_t nnz) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t lo, hi;
  clamped_range(rp, b, nnz, lo, hi);
  const scalar_t* g = grad + b * d;
  for (int64_t j = lo + warp; j < hi; j += kWarps) {
    const int64_t r = col[j];
    acc s = 0;
    if (r >= 0 && r < R) {
      const scalar_t* t = table + r * d;
      for (int64_t e = lane; e < d; e += 32) s += static_cast<acc>(g[e]) * static_cast<acc>(t[e]);
    }
    s = cuda::warp_sum(s);
    if (lane == 0) out[j] = static_cast<scalar_t>(s);
  }
}

// out[f] = Σ_p coef[perm_p] · src[token_p] in CSC order: one block a feature, no atomics.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) segment_sum_kernel(
    const int64_t* __restrict__ cp, const int64_t* __restrict__ perm, const int64_t* __restrict__ token,
    const scalar_t* __restrict__ coef, const scalar_t* __restrict__ src, scalar_t* __restrict__ out,
    scalar_t* __restrict__ coef_sum, int64_t d, int64_t B, int64_t nnz) {
  using acc = acc_t<scalar_t>;
  const int64_t f = blockIdx.x;
  int64_t lo, hi;
  clamped_range(cp, f, nnz, lo, hi);
  for (int64_t e = threadIdx.x; e < d; e += kThreads) {
    acc s = 0;
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t j = perm[p], b = token[p];
      if (j >= 0 && j < nnz && b >= 0 && b < B) s += static_cast<acc>(coef[j]) * static_cast<acc>(src[b * d + e]);
    }
    out[f * d + e] = static_cast<scalar_t>(s);
  }
  if (threadIdx.x == 0) {
    acc total = 0;
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t j = perm[p], b = token[p];
      if (j >= 0 && j < nnz && b >= 0 && b < B) total += static_cast<acc>(coef[j]);  // the sum's entries
    }
    coef_sum[f] = static_cast<scalar_t>(total);
  }
}

}  // namespace

void gather_rows_cuda(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef,
                      const at::Tensor& table, const at::Tensor& bias, const at::Tensor& out) {
  const int64_t B = out.size(0);
  check_grid(B, "the number of rows");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device());
  FUSEDTRAIN_DISPATCH_FLOATING(table.scalar_type(), "sae_gather_rows_cuda", [&] {
    gather_rows_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        row_ptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), coef.const_data_ptr<scalar_t>(),
        table.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        out.data_ptr<scalar_t>(), out.size(1), table.size(0), col.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sampled_dot_cuda(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& grad,
                      const at::Tensor& table, const at::Tensor& out) {
  const int64_t B = grad.size(0);
  if (B == 0) {
    out.zero_();
    return;
  }
  check_grid(B, "the number of rows");
  out.zero_();  // entries outside every row (malformed row_ptr) read 0, never stale memory
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.get_device());
  FUSEDTRAIN_DISPATCH_FLOATING(grad.scalar_type(), "sae_sampled_dot_cuda", [&] {
    sampled_dot_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        row_ptr.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), grad.const_data_ptr<scalar_t>(),
        table.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), grad.size(1), table.size(0), col.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void segment_sum_cuda(const at::Tensor& col_ptr, const at::Tensor& perm, const at::Tensor& token,
                      const at::Tensor& coef, const at::Tensor& src, const at::Tensor& out,
                      const at::Tensor& coef_sum) {
  const int64_t F = out.size(0);
  check_grid(F, "the number of features");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device());
  FUSEDTRAIN_DISPATCH_FLOATING(src.scalar_type(), "sae_segment_sum_cuda", [&] {
    segment_sum_kernel<scalar_t><<<static_cast<unsigned>(F), kThreads, 0, stream>>>(
        col_ptr.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(), token.const_data_ptr<int64_t>(),
        coef.const_data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        coef_sum.data_ptr<scalar_t>(), out.size(1), src.size(0), perm.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace sae
}  // namespace fusedtrain
