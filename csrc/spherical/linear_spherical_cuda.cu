// CUDA kernels of the fused linear spherical loss: the per-row work around the dense products (which
// linear_spherical.cpp runs through cuBLAS). A warp owns a row: its lanes stride over the d features
// (coalesced), accumulate in acc_t and reduce with shuffles. The target-row scatter gives each class
// (a run of equal keys in the stably sorted targets) to one block, which sums its rows in sorted
// order and adds the sum to the class's gradient row: deterministic, no float atomics.
#include "linear_spherical.h"

#include "../common/backend.h"

#include "../common/cuda/reduce.cuh"
#include "../common/dispatch.h"

#include <c10/cuda/CUDAGuard.h>

#include <limits>

namespace fusedtrain {
namespace spherical {
namespace linear {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kScatterThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    forward_rows_kernel(const scalar_t* __restrict__ input, int64_t in_stride,
                        const scalar_t* __restrict__ weight, int64_t w_stride,
                        const scalar_t* __restrict__ bias, const int64_t* __restrict__ target,
                        const acc_t<scalar_t>* __restrict__ colsum, const acc_t<scalar_t>* __restrict__ proj,
                        int64_t dp, const acc_t<scalar_t>* __restrict__ scale_ptr, int64_t N, int64_t d,
                        int64_t D, int64_t ignore_index, Params params, acc_t<scalar_t>* __restrict__ row_loss,
                        acc_t<scalar_t>* __restrict__ coef, int* __restrict__ bad) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;  // whole warps leave together
  const int64_t c = target[n];
  acc* cf = coef + n * kCoefs;
  acc fill;
  if (skips_row(c, D, ignore_index, fill)) {
    if (lane == 0) {
      row_loss[n] = fill;
      for (int j = 0; j < kCoefs; ++j) cf[j] = fill;
      if (c != ignore_index) *bad = 1;
    }
    return;
  }
  const scalar_t* h = input + n * in_stride;
  const scalar_t* w = weight + c * w_stride;
  const acc* p = proj + n * dp;
  acc s = 0, qc = 0, oc = 0;
  for (int64_t k = lane; k < d; k += 32) {
    const acc hk = static_cast<acc>(h[k]);
    s += hk * colsum[k];
    qc += hk * p[k];
    oc += hk * static_cast<acc>(w[k]);
  }
  s = cuda::warp_sum(s);
  qc = cuda::warp_sum(qc);
  oc = cuda::warp_sum(oc);
  if (lane != 0) return;
  if (bias != nullptr) {  // the augmented coordinate h'_d = 1
    s += colsum[d];
    qc += p[d];
    oc += static_cast<acc>(bias[c]);
  }
  const acc scale = scale_ptr ? *scale_ptr : acc(1);
  const RowCoefficients<acc> r = centered_row_coefficients<acc>(s, qc, oc, static_cast<acc>(D), params);
  row_loss[n] = r.loss;
  cf[kAlpha] = scale * r.alpha;
  cf[kBeta] = scale * r.beta;
  cf[kGamma] = scale * r.gamma;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    input_grad_kernel(const scalar_t* __restrict__ weight, int64_t w_stride, const int64_t* __restrict__ target,
                      const acc_t<scalar_t>* __restrict__ colsum, const acc_t<scalar_t>* __restrict__ proj,
                      int64_t dp, const acc_t<scalar_t>* __restrict__ coef, int64_t N, int64_t d, int64_t D,
                      int64_t ignore_index, scalar_t* __restrict__ out) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;
  const int64_t c = target[n];
  scalar_t* g = out + n * d;
  acc fill;
  if (skips_row(c, D, ignore_index, fill)) {
    for (int64_t k = lane; k < d; k += 32) g[k] = static_cast<scalar_t>(fill);
    return;
  }
  const acc alpha = coef[n * kCoefs + kAlpha], beta = coef[n * kCoefs + kBeta],
            gamma = coef[n * kCoefs + kGamma];
  const scalar_t* w = weight + c * w_stride;
  const acc* p = proj + n * dp;
  for (int64_t k = lane; k < d; k += 32)
    g[k] = static_cast<scalar_t>(alpha * colsum[k] + beta * p[k] + gamma * static_cast<acc>(w[k]));
}

// One block per sorted position; only the first position of each class's run does the work.
template <typename scalar_t>
__global__ void __launch_bounds__(kScatterThreads)
    scatter_kernel(const scalar_t* __restrict__ input, int64_t in_stride, const acc_t<scalar_t>* __restrict__ coef,
                   const int64_t* __restrict__ key, const int64_t* __restrict__ order, int64_t N, int64_t d,
                   int64_t D, scalar_t* __restrict__ grad_weight, scalar_t* __restrict__ grad_bias) {
  using acc = acc_t<scalar_t>;
  const int64_t i = blockIdx.x;
  const int64_t c = key[i];
  if (c >= D || (i > 0 && key[i - 1] == c)) return;
  int64_t end = i + 1;
  while (end < N && key[end] == c) ++end;
  if (grad_weight != nullptr) {
    scalar_t* row = grad_weight + c * d;
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
      acc sum = 0;
      for (int64_t j = i; j < end; ++j) {
        const int64_t n = order[j];
        sum += coef[n * kCoefs + kGamma] * static_cast<acc>(input[n * in_stride + k]);
      }
      row[k] = static_cast<scalar_t>(static_cast<acc>(row[k]) + sum);
    }
  }
  if (grad_bias != nullptr && threadIdx.x == 0) {
    acc sum = 0;
    for (int64_t j = i; j < end; ++j) sum += coef[order[j] * kCoefs + kGamma];
    grad_bias[c] = static_cast<scalar_t>(static_cast<acc>(grad_bias[c]) + sum);
  }
}

unsigned row_blocks(int64_t N) { return static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock); }

void forward_cuda(const ForwardLaunch& L) {
  const c10::cuda::CUDAGuard guard(L.input.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = L.input.size(0);
  FUSEDTRAIN_DISPATCH_FLOATING(L.input.scalar_type(), "linear_spherical_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    forward_rows_kernel<scalar_t><<<row_blocks(N), kWarpsPerBlock * 32, 0, stream>>>(
        L.input.data_ptr<scalar_t>(), L.input.stride(0), L.weight.data_ptr<scalar_t>(), L.weight.stride(0),
        L.bias.defined() ? L.bias.data_ptr<scalar_t>() : nullptr, L.target.data_ptr<int64_t>(),
        L.colsum.data_ptr<acc>(), L.proj.data_ptr<acc>(), L.proj.size(1),
        L.scale.defined() ? L.scale.data_ptr<acc>() : nullptr, N, L.input.size(1), L.weight.size(0),
        L.ignore_index, L.params, L.row_loss.data_ptr<acc>(), L.coef.data_ptr<acc>(),
        L.bad_target.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void input_grad_cuda(const InputGradLaunch& L) {
  const c10::cuda::CUDAGuard guard(L.grad_input.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = L.grad_input.size(0);
  FUSEDTRAIN_DISPATCH_FLOATING(L.grad_input.scalar_type(), "linear_spherical_input_grad_cuda", [&] {
    using acc = acc_t<scalar_t>;
    input_grad_kernel<scalar_t><<<row_blocks(N), kWarpsPerBlock * 32, 0, stream>>>(
        L.weight.data_ptr<scalar_t>(), L.weight.stride(0), L.target.data_ptr<int64_t>(),
        L.colsum.data_ptr<acc>(), L.proj.data_ptr<acc>(), L.proj.size(1), L.coef.data_ptr<acc>(), N,
        L.grad_input.size(1), L.weight.size(0), L.ignore_index, L.grad_input.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void scatter_cuda(const ScatterLaunch& L) {
  const c10::cuda::CUDAGuard guard(L.input.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = L.input.size(0);
  const int64_t D = L.grad_weight.defined() ? L.grad_weight.size(0) : L.grad_bias.size(0);
  FUSEDTRAIN_DISPATCH_FLOATING(L.input.scalar_type(), "linear_spherical_scatter_cuda", [&] {
    using acc = acc_t<scalar_t>;
    scatter_kernel<scalar_t><<<static_cast<unsigned>(N), kScatterThreads, 0, stream>>>(
        L.input.data_ptr<scalar_t>(), L.input.stride(0), L.coef.data_ptr<acc>(),
        L.sorted_key.data_ptr<int64_t>(), L.order.data_ptr<int64_t>(), N, L.input.size(1), D,
        L.grad_weight.defined() ? L.grad_weight.data_ptr<scalar_t>() : nullptr,
        L.grad_bias.defined() ? L.grad_bias.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

constexpr Kernels kCudaKernels{forward_cuda, input_grad_cuda, scatter_cuda};

}  // namespace linear
}  // namespace spherical
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CUDA, fusedtrain::spherical::linear::kCudaKernels)
