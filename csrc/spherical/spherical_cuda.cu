// CUDA kernels of the spherical losses.
//
// One kernel serves forward and backward. A row belongs to one warp (short rows, 8 rows a block) or
// one block (long rows). Forward: every thread reads its share of the row with 16-byte loads,
// several in flight, accumulating s = Σ(o − K) and q = Σ(o − K)² in fp32 (fp64 for fp64); one
// reduction gives the loss and the coefficients (α, β, γ) of ∂L/∂o = α + β·(o − K) + γ·e_c. When the
// gradient is wanted (reduction mean/sum) the same block then writes it, reading the row again from
// the copy it kept in shared memory (as much as fits) or from L2, so DRAM sees the logits read once
// and the gradient written once. Backward (reduction none, or a second backward) writes the
// gradient from the saved coefficients times the upstream gradient.
#include "spherical.h"

#include "../common/backend.h"

#include "../common/checks.h"
#include "../common/cuda/launch.cuh"
#include "../common/cuda/reduce.cuh"
#include "../common/cuda/vector_io.cuh"
#include "../common/dispatch.h"


#include <algorithm>
#include <cstdlib>
#include <cstdio>
#include <limits>

namespace fusedtrain {
namespace spherical {
namespace {

template <typename scalar_t>
struct RowArgs : RowPointers<scalar_t> {
  int cache_iters = 0;  // 16-byte vectors per thread kept in shared memory between the passes
};

constexpr int kUnroll = 4;  // independent 16-byte loads in flight per thread

// The maximum of x over the kGroup lanes of one row (NaN wins), returned to every lane of the
// group. `scratch` holds kGroup / 32 values for a block-wide group; the block-wide form is bracketed
// by barriers (every thread of the block calls it), so scratch is free before and after.
template <int kGroup, int kRowsPerBlock, typename T>
__device__ __forceinline__ T group_allreduce_max(T x, T* scratch) {
  const auto op = [](T a, T b) { return (a > b || a != a) ? a : b; };
  constexpr int kWidth = kGroup < 32 ? kGroup : 32;
  const unsigned lane = threadIdx.x & 31;
  const unsigned mask = kWidth == 32 ? 0xffffffffu : ((1u << kWidth) - 1u) << (lane & ~(kWidth - 1u));
#pragma unroll
  for (int o = kWidth / 2; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(mask, x, o));
  if constexpr (kRowsPerBlock == 1 && kGroup > 32) {
    constexpr int kBlockWarps = kGroup / 32;
    __syncthreads();
    if (lane == 0) scratch[threadIdx.x >> 5] = x;
    __syncthreads();
    x = scratch[0];
#pragma unroll
    for (int w = 1; w < kBlockWarps; ++w) x = op(x, scratch[w]);
    __syncthreads();
  }
  return x;
}

template <typename scalar_t, int kGroup, int kRowsPerBlock>
__global__ void __launch_bounds__(kGroup * kRowsPerBlock)
    spherical_rows_kernel(const RowArgs<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  using V = cuda::Vec16<scalar_t>;
  constexpr int kVec = V::kSize;
  constexpr int kWarps = kGroup >= 32 ? kGroup / 32 : 1;
  __shared__ acc scratch[2 * kWarps];
  extern __shared__ __align__(16) unsigned char cache_raw[];
  V* cache = reinterpret_cast<V*>(cache_raw);

  static_assert(kRowsPerBlock == 1 || kGroup <= 32, "several rows a block only for sub-block groups");
  const int lane = kRowsPerBlock == 1 ? threadIdx.x : (threadIdx.x % kGroup);
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock +
                    (kRowsPerBlock == 1 ? 0 : (threadIdx.x / kGroup));
  if (n >= a.N) return;  // whole groups leave together: a row's threads all share n, and group
                         // reductions shuffle within their group only
  const int64_t D = a.D;
  const bool backward = a.upstream != nullptr;
  const scalar_t* row = a.logits + n * a.stride;
  scalar_t* grow = a.grad ? a.grad + n * D : nullptr;
  const int64_t c = a.target[n];

  if (c == a.ignore_index || !target_is_valid(c, D, a.ignore_index)) {
    // Ignored rows contribute nothing; out-of-range rows are NaN and flagged.
    const bool ignored = c == a.ignore_index;
    const acc fill = ignored ? acc(0) : std::numeric_limits<acc>::quiet_NaN();
    if (lane == 0 && !backward) {
      a.row_loss[n] = fill;
      for (int j = 0; j < kCoefCount; ++j) a.coef[n * kCoefCount + j] = fill;
      if (!ignored) *a.bad = 1;
    }
    if (grow) {
      const scalar_t v = static_cast<scalar_t>(fill);
      for (int64_t k = lane; k < D; k += kGroup) grow[k] = v;
    }
    return;
  }

  const int head = static_cast<int>(D < kVec ? D : cuda::elements_to_alignment(row));
  const int64_t nvec = (D - head) / kVec;
  const int64_t tail = head + nvec * kVec;
  const V* vrow = reinterpret_cast<const V*>(row + head);
  acc alpha, beta, gamma, shift, inv;

  if (!backward) {
    const acc oc = static_cast<acc>(row[c]);
    shift = shifts_by_target(a.params.kind) ? oc : acc(0);
    acc s = 0, q = 0;
    auto add = [&](acc o) {
      const acc y = o - shift;
      s += y;
      q += y * y;
    };
    for (int64_t k = lane; k < head; k += kGroup) add(static_cast<acc>(row[k]));
    for (int64_t k = tail + lane; k < D; k += kGroup) add(static_cast<acc>(row[k]));
    const int cache_iters = grow ? a.cache_iters : 0;
    int it = 0;
    int64_t j = lane;
    for (; j + (kUnroll - 1) * kGroup < nvec; j += kUnroll * kGroup, it += kUnroll) {
      V x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) x[u] = vrow[j + u * kGroup];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (it + u < cache_iters) cache[(it + u) * kGroup + lane] = x[u];
#pragma unroll
        for (int e = 0; e < kVec; ++e) add(static_cast<acc>(x[u].v[e]));
      }
    }
    for (; j < nvec; j += kGroup, ++it) {
      const V x = vrow[j];
      if (it < cache_iters) cache[it * kGroup + lane] = x;
#pragma unroll
      for (int e = 0; e < kVec; ++e) add(static_cast<acc>(x.v[e]));
    }
    auto reduce_sums = [&] {
      if constexpr (kRowsPerBlock == 1) {
        cuda::block_allreduce_sum2<kGroup>(s, q, scratch);
      } else {
        s = cuda::group_sum<kGroup>(s);
        q = cuda::group_sum<kGroup>(q);
      }
    };
    reduce_sums();
    // A row whose q is beyond scaled_stats_bound (uniform over the row's lanes) is summed again in
    // units of S = 2^e ≈ max|o|, max(|K|, |o_k|) (spherical_math.h), from L2: rare, off the hot path.
    // A row with a non-finite logit keeps its non-finite sums.
    acc log_scale = acc(0);
    inv = acc(1);
    if (wants_scaled_stats(a.params.kind, q)) {
      acc m = fabs(shift);
      for (int64_t k = lane; k < D; k += kGroup) {
        const acc x = fabs(static_cast<acc>(row[k]));
        m = (x > m || x != x) ? x : m;
      }
      m = group_allreduce_max<kGroup, kRowsPerBlock>(m, scratch);
      if (isfinite(m)) {
        power_of_two_scale(m, inv, log_scale);
        const acc shift_scaled = shift * inv;
        s = 0;
        q = 0;
        for (int64_t k = lane; k < D; k += kGroup) {
          const acc y = static_cast<acc>(row[k]) * inv - shift_scaled;
          s += y;
          q += y * y;
        }
        reduce_sums();
      }
    }
    const RowCoefficients<acc> r =
        row_coefficients<acc>(s, q, oc - shift, static_cast<acc>(D), a.params, inv, log_scale);
    const acc w = a.weight ? *a.weight : acc(1);
    alpha = w * r.alpha;
    beta = w * r.beta;
    gamma = w * r.gamma;
    if (lane == 0) {
      a.row_loss[n] = r.loss;
      acc* cf = a.coef + n * kCoefCount;
      cf[kCoefAlpha] = alpha;
      cf[kCoefBeta] = beta;
      cf[kCoefGamma] = gamma;
      cf[kCoefScale] = encode_scale(inv, shifts_by_target(a.params.kind));
    }
    if (!grow) return;
  } else {
    const acc* cf = a.coef + n * kCoefCount;
    const acc g = a.upstream[n * a.up_stride];
    alpha = g * cf[kCoefAlpha];
    beta = g * cf[kCoefBeta];
    gamma = g * cf[kCoefGamma];
    inv = decoded_inv_scale(cf[kCoefScale]);
    shift = decoded_shift(cf[kCoefScale], static_cast<acc>(row[c]));
  }

  // Pass 2: grad_k = α + β·(o_k/S − K/S) + γ·[k = c] (S = 1 but for huge rows; β is β·S). β·(o − K),
  // not (α − βK) + β·o, which cancels catastrophically under a large common offset.
  const acc shift_scaled = shift * inv;
  auto value = [&](acc o, int64_t k) {
    return alpha + beta * (o * inv - shift_scaled) + (k == c ? gamma : acc(0));
  };
  if (cuda::elements_to_alignment(grow) != head) {  // rows of logits and grad aligned differently
    for (int64_t k = lane; k < D; k += kGroup)
      grow[k] = static_cast<scalar_t>(value(static_cast<acc>(row[k]), k));
    return;
  }
  for (int64_t k = lane; k < head; k += kGroup)
    grow[k] = static_cast<scalar_t>(value(static_cast<acc>(row[k]), k));
  for (int64_t k = tail + lane; k < D; k += kGroup)
    grow[k] = static_cast<scalar_t>(value(static_cast<acc>(row[k]), k));
  V* vgrad = reinterpret_cast<V*>(grow + head);
  auto write_vec = [&](const V& x, int64_t j) {
    const int64_t k0 = head + j * kVec;
    V out;
#pragma unroll
    for (int e = 0; e < kVec; ++e) out.v[e] = static_cast<scalar_t>(value(static_cast<acc>(x.v[e]), k0 + e));
    vgrad[j] = out;
  };
  // The part of the row that was not kept on chip first, while it is most likely still in L2.
  const int cache_iters = backward ? 0 : a.cache_iters;
  const int64_t first_uncached = lane + static_cast<int64_t>(cache_iters) * kGroup;
  for (int64_t j = first_uncached; j < nvec; j += kGroup) write_vec(vrow[j], j);
  for (int it = 0; it < cache_iters; ++it) {
    const int64_t j = lane + static_cast<int64_t>(it) * kGroup;
    if (j >= nvec) break;
    write_vec(cache[it * kGroup + lane], j);
  }
}

// Launch shape. Rows of at most 128 bytes go one to 8 lanes, up to 4 KiB one to a warp; longer rows
// one to a block, which keeps as
// much of its row in shared memory as `cache_budget` allows when it also writes the gradient.
// FUSEDTRAIN_SPHERICAL_TUNE="threads,cache_kib" overrides both (for tuning runs).
struct Shape {
  int threads;        // threads per row: 8 or 32 (several rows a block) or a whole block
  int64_t cache_bytes;
};

Shape choose_shape(int64_t D, int elem_bytes, bool fused_grad, int device) {
  const int64_t row_bytes = D * elem_bytes;
  Shape shape{row_bytes <= 128 ? 8 : 32, 0};
  if (row_bytes <= 4096) return shape;
  shape.threads = row_bytes <= 32768 ? 256 : row_bytes <= 131072 ? 512 : 1024;
  int64_t budget = std::max(0, cuda::max_shared_memory_per_block(device) - 2048);
  static const Shape tuned = [] {  // read once per process
    Shape t{0, 0};
    int threads = 0, kib = 0;
    const char* tune = std::getenv("FUSEDTRAIN_SPHERICAL_TUNE");
    if (tune && std::sscanf(tune, "%d,%d", &threads, &kib) == 2 &&
        (threads == 256 || threads == 512 || threads == 1024) && kib >= 0) {
      t = Shape{threads, int64_t(kib) * 1024};
    }
    return t;
  }();
  if (tuned.threads) {
    shape.threads = tuned.threads;
    budget = std::min(budget, tuned.cache_bytes);
  }
  if (!fused_grad) return shape;
  const int64_t vec_per_thread = (row_bytes / 16 + shape.threads - 1) / shape.threads;
  const int64_t iters = std::min<int64_t>(vec_per_thread, budget / (16 * shape.threads));
  shape.cache_bytes = iters * 16 * shape.threads;
  return shape;
}

template <typename scalar_t, int kGroup, int kRowsPerBlock>
void launch_kernel(RowArgs<scalar_t> a, int64_t cache_bytes, cudaStream_t stream) {
  auto kernel = spherical_rows_kernel<scalar_t, kGroup, kRowsPerBlock>;
  if (cache_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(cache_bytes)));
  }
  a.cache_iters = static_cast<int>(cache_bytes / (16 * kGroup));
  const int64_t blocks = (a.N + kRowsPerBlock - 1) / kRowsPerBlock;
  FT_CHECK(blocks <= std::numeric_limits<int>::max(), "logits has too many rows (", a.N, ")");
  kernel<<<static_cast<unsigned>(blocks), kGroup * kRowsPerBlock, cache_bytes, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void run_rows(const RowLaunch& L) {
  using acc = acc_t<scalar_t>;
  RowArgs<scalar_t> a;
  static_cast<RowPointers<scalar_t>&>(a) = row_pointers<scalar_t>(L);
  const bool backward = a.upstream != nullptr;
  const int device = L.logits.get_device();
  const Shape shape = choose_shape(a.D, sizeof(scalar_t), !backward && a.grad, device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  switch (shape.threads) {
    case 8: return launch_kernel<scalar_t, 8, 32>(a, 0, stream);
    case 32: return launch_kernel<scalar_t, 32, 8>(a, 0, stream);
    case 256: return launch_kernel<scalar_t, 256, 1>(a, shape.cache_bytes, stream);
    case 512: return launch_kernel<scalar_t, 512, 1>(a, shape.cache_bytes, stream);
    default: return launch_kernel<scalar_t, 1024, 1>(a, shape.cache_bytes, stream);
  }
}

void row_kernel_cuda(const RowLaunch& L) {
  FUSEDTRAIN_DISPATCH_FLOATING(L.logits.scalar_type(), "spherical_loss_cuda",
                               [&] { run_rows<scalar_t>(L); });
}

// grad *= factor, skipped on the device (no host sync) when factor == 1, the common loss.backward().
template <typename scalar_t>
__global__ void scale_kernel(scalar_t* __restrict__ grad, int64_t numel,
                             const acc_t<scalar_t>* __restrict__ factor) {
  using acc = acc_t<scalar_t>;
  using V = cuda::Vec16<scalar_t>;
  const acc f = *factor;
  if (f == acc(1)) return;
  const int64_t head = numel < V::kSize ? numel : cuda::elements_to_alignment(grad);
  const int64_t nvec = (numel - head) / V::kSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  V* vgrad = reinterpret_cast<V*>(grad + head);
  for (int64_t j = tid; j < nvec; j += stride) {
    V x = vgrad[j];
#pragma unroll
    for (int e = 0; e < V::kSize; ++e) x.v[e] = static_cast<scalar_t>(f * static_cast<acc>(x.v[e]));
    vgrad[j] = x;
  }
  for (int64_t k = tid; k < head; k += stride) grad[k] = static_cast<scalar_t>(f * static_cast<acc>(grad[k]));
  for (int64_t k = head + nvec * V::kSize + tid; k < numel; k += stride)
    grad[k] = static_cast<scalar_t>(f * static_cast<acc>(grad[k]));
}

void scale_kernel_cuda(at::Tensor& grad, const at::Tensor& factor) {
  const int device = grad.get_device();
  const int64_t vectors = grad.numel() * grad.element_size() / 16 + 1;
  const int64_t blocks = std::min<int64_t>((vectors + 255) / 256, 8 * cuda::multiprocessor_count(device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  FUSEDTRAIN_DISPATCH_FLOATING(grad.scalar_type(), "spherical_scale_grad_cuda", [&] {
    scale_kernel<scalar_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        grad.data_ptr<scalar_t>(), grad.numel(), factor.data_ptr<acc_t<scalar_t>>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

constexpr Kernels kCudaKernels{row_kernel_cuda, scale_kernel_cuda};

}  // namespace spherical
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CUDA, fusedtrain::spherical::kCudaKernels)
