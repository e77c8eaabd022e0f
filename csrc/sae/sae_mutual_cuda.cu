// Mutual choice on CUDA: the r-th best positive entry of the whole matrix (r = budget + 1, sae.h)
// (sae_cuda.cuh).
#include "sae_cuda.cuh"

#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <limits>

namespace fusedtrain {
namespace sae {
namespace {

// Global select (mutual choice). state: [prefix, need, all_kept] as 64-bit words.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) global_hist_kernel(
    const scalar_t* __restrict__ pre, int64_t B, int64_t F, int64_t stride, const uint64_t* __restrict__ state,
    int shift, uint64_t mask, unsigned long long* __restrict__ hist) {
  using acc = acc_t<scalar_t>;
  using Key = key_t<scalar_t>;
  __shared__ unsigned int local[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) local[i] = 0;
  __syncthreads();
  const Key prefix = static_cast<Key>(state[0]);
  const bool done = state[2] != 0;
  if (!done) {
    for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
      const scalar_t* r = pre + b * stride;
      for (int64_t f = threadIdx.x; f < F; f += kThreads) {
        const acc v = static_cast<acc>(r[f]);
        if (!(v > acc(0))) continue;
        const Key key = ordered_key(r[f]);
        if ((key & static_cast<Key>(mask)) == prefix) atomicAdd(&local[(key >> shift) & 255], 1u);
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += kThreads)
    if (local[i]) atomicAdd(&hist[i], static_cast<unsigned long long>(local[i]));
}

template <typename scalar_t>
__global__ void global_pick_kernel(uint64_t* __restrict__ state, unsigned long long* __restrict__ hist, int shift,
                                   bool first, acc_t<scalar_t>* __restrict__ cut_v, int64_t* __restrict__ cut_i) {
  using acc = acc_t<scalar_t>;
  using Key = key_t<scalar_t>;
  if (state[2] == 0) {
    const uint64_t need = state[1];
    uint64_t above = 0, total = 0;
    for (int i = 0; i < 256; ++i) total += hist[i];
    if (first && total < need) {  // fewer than r positive entries: no r-th best, (0, -1)
      state[2] = 1;
      cut_v[0] = acc(0);
      cut_i[0] = -1;
    } else {
      int bin = 255;
      for (; bin > 0; --bin) {
        if (above + hist[bin] >= need) break;
        above += hist[bin];
      }
      state[0] = static_cast<uint64_t>(static_cast<Key>(state[0]) | (Key(bin) << shift));
      state[1] = need - above;
    }
  }
  for (int i = 0; i < 256; ++i) hist[i] = 0;
}

// Ties (entries equal to the cutoff) per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) global_tie_count_kernel(
    const scalar_t* __restrict__ pre, int64_t F, int64_t stride, const uint64_t* __restrict__ state,
    int64_t* __restrict__ ties) {
  using acc = acc_t<scalar_t>;
  using Key = key_t<scalar_t>;
  __shared__ int64_t scratch[kWarps];
  const int64_t row = blockIdx.x;
  const Key prefix = static_cast<Key>(state[0]);
  const bool done = state[2] != 0;
  int64_t n = 0;
  if (!done) {
    const scalar_t* r = pre + row * stride;
    for (int64_t f = threadIdx.x; f < F; f += kThreads) {
      const acc v = static_cast<acc>(r[f]);
      n += v > acc(0) && ordered_key(r[f]) == prefix;
    }
  }
  const int64_t total = block_sum(n, scratch);
  if (threadIdx.x == 0) ties[row] = total;
}

// The row holding the need-th tie (flat order) finds it with an ordered scan.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) global_tie_locate_kernel(
    const scalar_t* __restrict__ pre, int64_t F, int64_t stride, const uint64_t* __restrict__ state,
    const int64_t* __restrict__ ties, const int64_t* __restrict__ ties_inclusive, acc_t<scalar_t>* __restrict__ cut_v,
    int64_t* __restrict__ cut_i) {
  using acc = acc_t<scalar_t>;
  using Key = key_t<scalar_t>;
  __shared__ int scan_scratch[kWarps + 1];
  const int64_t row = blockIdx.x;
  if (state[2] != 0) return;
  const int64_t need = static_cast<int64_t>(state[1]);
  const int64_t before = ties_inclusive[row] - ties[row];
  if (!(before < need && need <= ties_inclusive[row])) return;  // uniform over the block
  const Key prefix = static_cast<Key>(state[0]);
  const scalar_t* r = pre + row * stride;
  int64_t seen = before;
  for (int64_t base = 0; base < F; base += kThreads) {
    const int64_t f = base + threadIdx.x;
    bool tie = false;
    if (f < F) {
      const acc v = static_cast<acc>(r[f]);
      tie = v > acc(0) && ordered_key(r[f]) == prefix;
    }
    int tile;
    const int64_t rank = seen + block_exclusive_count(tie, scan_scratch, tile);
    seen += tile;
    if (tie && rank == need - 1) {
      cut_v[0] = key_value<scalar_t>(prefix);
      cut_i[0] = row * F + f;
    }
  }
}

}  // namespace

void global_cutoff_cuda(const at::Tensor& pre, int64_t r, const at::Tensor& value, const at::Tensor& index) {
  value.fill_(std::numeric_limits<double>::infinity());
  index.fill_(-1);
  if (r == 0) return;
  const int64_t B = pre.size(0), F = pre.size(1);
  check_grid(B, "the number of rows");
  const int device = pre.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  auto state = at::zeros({3}, pre.options().dtype(at::kLong));
  state[1].fill_(r);
  auto hist = at::zeros({256}, pre.options().dtype(at::kLong));
  auto ties = at::empty({B}, pre.options().dtype(at::kLong));
  const int64_t blocks = std::min<int64_t>(B, 4 * cuda::multiprocessor_count(device));
  FUSEDTRAIN_DISPATCH_FLOATING(pre.scalar_type(), "sae_global_cutoff_cuda", [&] {
    using acc = acc_t<scalar_t>;
    using Key = key_t<scalar_t>;
    constexpr int kBits = sizeof(Key) * 8;
    auto* st = reinterpret_cast<uint64_t*>(state.data_ptr<int64_t>());
    auto* h = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
    uint64_t mask = 0;
    for (int shift = kBits - 8; shift >= 0; shift -= 8) {
      global_hist_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          pre.const_data_ptr<scalar_t>(), B, F, pre.stride(0), st, shift, mask, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      global_pick_kernel<scalar_t><<<1, 1, 0, stream>>>(st, h, shift, shift == kBits - 8, value.data_ptr<acc>(),
                                                  index.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mask |= uint64_t(255) << shift;
    }
    global_tie_count_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        pre.const_data_ptr<scalar_t>(), F, pre.stride(0), st, ties.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor inclusive = at::cumsum(ties, 0);
    global_tie_locate_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        pre.const_data_ptr<scalar_t>(), F, pre.stride(0), st, ties.const_data_ptr<int64_t>(),
        inclusive.const_data_ptr<int64_t>(), value.data_ptr<acc>(), index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace sae
}  // namespace fusedtrain
