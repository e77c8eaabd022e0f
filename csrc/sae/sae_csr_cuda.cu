// The kept entries of a routing into the CSR on CUDA: count per row, then an ordered fill
// (sae_cuda.cuh).
#include "sae_cuda.cuh"

namespace fusedtrain {
namespace sae {
namespace {

template <typename scalar_t>
struct CutoffArgs {
  const scalar_t* pre;
  int64_t F, stride;
  const acc_t<scalar_t>* T;
  const int64_t* L;
  bool shared, flat;

  __device__ __forceinline__ bool at(int64_t b, int64_t f, acc_t<scalar_t> v) const {
    const int64_t j = shared ? 0 : f;
    return kept(v, T[j], flat ? b * F + f : b, L[j]);
  }
};

template <typename scalar_t>
CutoffArgs<scalar_t> cutoff_args(const Cutoffs& c) {
  return {c.pre.const_data_ptr<scalar_t>(), c.pre.size(1), c.pre.stride(0),
          c.value.const_data_ptr<acc_t<scalar_t>>(), c.index.const_data_ptr<int64_t>(),
          c.value.numel() == 1, c.flat};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) count_kept_kernel(const CutoffArgs<scalar_t> a, int64_t* __restrict__ counts) {
  __shared__ int64_t scratch[kWarps];
  const int64_t b = blockIdx.x;
  const scalar_t* r = a.pre + b * a.stride;
  int64_t n = 0;
  for (int64_t f = threadIdx.x; f < a.F; f += kThreads) n += a.at(b, f, static_cast<acc_t<scalar_t>>(r[f]));
  const int64_t total = block_sum(n, scratch);
  if (threadIdx.x == 0) counts[b] = total;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) fill_kept_kernel(const CutoffArgs<scalar_t> a, const int64_t* __restrict__ row_ptr,
                                                             int64_t* __restrict__ feature, scalar_t* __restrict__ value,
                                                             int64_t nnz) {
  __shared__ int scan_scratch[kWarps + 1];
  const int64_t b = blockIdx.x;
  const scalar_t* r = a.pre + b * a.stride;
  const int64_t start = row_ptr[b], room = row_ptr[b + 1] - start;
  if (start < 0) return;  // never: row_ptr is the prefix sum of the count pass
  int64_t written = 0;
  for (int64_t base = 0; base < a.F; base += kThreads) {
    const int64_t f = base + threadIdx.x;
    const bool keep = f < a.F && a.at(b, f, static_cast<acc_t<scalar_t>>(r[f]));
    int tile;
    const int64_t pos = written + block_exclusive_count(keep, scan_scratch, tile);
    written += tile;
    if (keep && pos < room && start + pos < nnz) {  // the count pass sized the row; never write past it
      feature[start + pos] = f;
      value[start + pos] = r[f];
    }
  }
}

}  // namespace

void count_kept_cuda(const Cutoffs& c, const at::Tensor& counts) {
  const int64_t B = c.pre.size(0);
  check_grid(B, "the number of rows");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.pre.get_device());
  FUSEDTRAIN_DISPATCH_FLOATING(c.pre.scalar_type(), "sae_count_kept_cuda", [&] {
    count_kept_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(cutoff_args<scalar_t>(c),
                                                                                  counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fill_kept_cuda(const Cutoffs& c, const at::Tensor& row_ptr, const at::Tensor& feature, const at::Tensor& value) {
  const int64_t B = c.pre.size(0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.pre.get_device());
  FUSEDTRAIN_DISPATCH_FLOATING(c.pre.scalar_type(), "sae_fill_kept_cuda", [&] {
    fill_kept_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        cutoff_args<scalar_t>(c), row_ptr.const_data_ptr<int64_t>(), feature.data_ptr<int64_t>(),
        value.data_ptr<scalar_t>(), feature.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace sae
}  // namespace fusedtrain
