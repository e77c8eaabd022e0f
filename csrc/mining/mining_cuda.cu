// CUDA tile kernels of the mining family. The driver (mining.cpp) computes each tile of S with
// cuBLAS (at::mm on a bounded chunk of rows); here one 256-thread block owns one row of the tile:
// block reductions give the row's thresholds, then a second sweep over the row (from L2 for tiles
// of a few MiB) gives the log-sum-exps, counts, indices or the gradient dL/dS written in place.
// Per-row statistics stay in registers and shared memory. Mined indices of one row are written at
// the row's offset in the order the threads claim slots (order within a row is not part of the
// contract).
#include "mining.h"

#include "../common/backend.h"

#include "../common/checks.h"
#include "../common/cuda/launch.cuh"
#include "../common/cuda/reduce.cuh"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

namespace fusedtrain {
namespace mining {
namespace {

using cuda::block_arg_best;
using cuda::block_reduce;
using cuda::kThreads;
using cuda::kWarps;
using cuda::MaxOp;
using cuda::MinOp;
using cuda::SumOp;

template <typename T>
__device__ __forceinline__ T inf() { return std::numeric_limits<T>::infinity(); }

template <typename T>
__device__ __forceinline__ Lse<T> block_reduce_lse(Lse<T> v, T* smem_max, T* smem_sum) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Lse<T> other;
    other.max = __shfl_xor_sync(0xffffffffu, v.max, o);
    other.sum = __shfl_xor_sync(0xffffffffu, v.sum, o);
    v.merge(other);
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    smem_max[threadIdx.x >> 5] = v.max;
    smem_sum[threadIdx.x >> 5] = v.sum;
  }
  __syncthreads();
  Lse<T> out;
  for (int w = 0; w < kWarps; ++w) {
    Lse<T> part;
    part.max = smem_max[w];
    part.sum = smem_sum[w];
    out.merge(part);
  }
  return out;
}

template <typename T>
struct RowView {
  T* s;
  int64_t label, self, drop, M;
  const int64_t* ref;
  __device__ RowView(const TilePointers<T>& t, int64_t r)
      : s(t.S + r * t.M), label(t.labels[t.row0 + r]), self(t.self_column(r)), drop(t.dropped_column(r)),
        M(t.M), ref(t.ref_labels) {}
};

template <typename T>
__device__ __forceinline__ void row_thresholds(const RowView<T>& row, T* smem, T& min_pos, T& max_neg) {
  T lo = inf<T>(), hi = -inf<T>();
  for (int64_t j = threadIdx.x; j < row.M; j += kThreads) {
    if (j == row.self) continue;
    const T v = row.s[j];
    if (row.ref[j] == row.label) lo = v < lo ? v : lo;
    else hi = v > hi ? v : hi;
  }
  min_pos = block_reduce(lo, MinOp{}, smem);
  max_neg = block_reduce(hi, MaxOp{}, smem);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) tile_kernel(const TilePointers<T> t) {
  __shared__ T smem_a[kWarps], smem_b[kWarps];
  __shared__ int64_t smem_j[kWarps];
  __shared__ unsigned long long slot_pos, slot_neg;
  const int64_t r = blockIdx.x;
  if (r >= t.rows) return;  // whole block leaves together
  const RowView<T> row(t, r);
  T* st = t.stats ? t.stats + r * kStatCount : nullptr;
  const int pass = t.pass;

  if (pass == kMsForward || pass == kMsBackward || pass == kMsForwardBackward) {
    const Selector<T> sel(t.params, kRuleMultiSimilarity, t.params.mine);
    const T alpha = T(t.params.alpha), beta = T(t.params.beta), base = T(t.params.base);
    T min_pos = inf<T>(), max_neg = -inf<T>(), lse_pos, lse_neg;
    if (pass == kMsBackward) {
      min_pos = st[kMinPos];
      max_neg = st[kMaxNeg];
      lse_pos = st[kLsePos];
      lse_neg = st[kLseNeg];
    } else {
      if (sel.needs_thresholds()) row_thresholds(row, smem_a, min_pos, max_neg);
      Lse<T> lp, ln;
      T np = 0, nn = 0;
      for (int64_t j = threadIdx.x; j < row.M; j += kThreads) {
        if (j == row.self) continue;
        const T v = row.s[j];
        if (row.ref[j] == row.label) {
          if (j != row.drop && sel.positive(v, max_neg)) { lp.add(ms_pos_exponent(v, alpha, base)); np += 1; }
        } else if (sel.negative(v, min_pos)) {
          ln.add(ms_neg_exponent(v, beta, base));
          nn += 1;
        }
      }
      // Every thread gets the reductions (and every read of the row is done: the reductions sync).
      lp = block_reduce_lse(lp, smem_a, smem_b);
      ln = block_reduce_lse(ln, smem_a, smem_b);
      np = block_reduce(np, SumOp{}, smem_a);
      nn = block_reduce(nn, SumOp{}, smem_a);
      lse_pos = lp.log1p_value();
      lse_neg = ln.log1p_value();
      if (threadIdx.x == 0) {
        st[kMinPos] = min_pos;
        st[kMaxNeg] = max_neg;
        st[kLsePos] = lse_pos;
        st[kLseNeg] = lse_neg;
        st[kNumPos] = np;
        st[kNumNeg] = nn;
      }
    }
    if (pass != kMsForward) {
      const T w = t.coef[0];
      for (int64_t j = threadIdx.x; j < row.M; j += kThreads) {
        const T v = row.s[j];
        T out = T(0);
        if (j != row.self) {
          if (row.ref[j] == row.label) {
            if (j != row.drop && sel.positive(v, max_neg)) out = ms_pos_grad(v, alpha, base, lse_pos, w);
          } else if (sel.negative(v, min_pos)) {
            out = ms_neg_grad(v, beta, base, lse_neg, w);
          }
        }
        row.s[j] = out;
      }
    }
  } else if (pass == kTcmForward || pass == kTcmBackward) {
    const T mp = T(t.params.margin_plus), mm = T(t.params.margin_minus);
    if (pass == kTcmForward) {
      T sp = 0, sn = 0, np = 0, nn = 0;
      for (int64_t j = threadIdx.x; j < row.M; j += kThreads) {
        if (j == row.self) continue;
        const T v = row.s[j];
        if (row.ref[j] == row.label) {
          if (tcm_pos_active(v, mp)) { sp += mp - v; np += 1; }
        } else if (tcm_neg_active(v, mm)) {
          sn += v - mm;
          nn += 1;
        }
      }
      sp = block_reduce(sp, SumOp{}, smem_a);
      sn = block_reduce(sn, SumOp{}, smem_a);
      np = block_reduce(np, SumOp{}, smem_a);
      nn = block_reduce(nn, SumOp{}, smem_a);
      if (threadIdx.x == 0) {
        st[kTcmSumPos] = sp;
        st[kTcmNumPos] = np;
        st[kTcmSumNeg] = sn;
        st[kTcmNumNeg] = nn;
        st[4] = st[5] = T(0);
      }
    } else {
      const T gp = t.coef[0], gn = t.coef[1];
      for (int64_t j = threadIdx.x; j < row.M; j += kThreads) {
        const T v = row.s[j];
        T out = T(0);
        if (j != row.self) {
          if (row.ref[j] == row.label) out = tcm_pos_active(v, mp) ? gp : T(0);
          else out = tcm_neg_active(v, mm) ? gn : T(0);
        }
        row.s[j] = out;
      }
    }
  } else if (pass == kMineCount || pass == kMineWrite) {
    const Selector<T> sel(t.params, t.params.rule, /*mine=*/true);
    const bool write = pass == kMineWrite;
    T min_pos = inf<T>(), max_neg = -inf<T>();
    if (sel.needs_thresholds()) {
      if (write) {
        min_pos = st[kMinPos];
        max_neg = st[kMaxNeg];
      } else {
        row_thresholds(row, smem_a, min_pos, max_neg);
      }
    }
    if (write && threadIdx.x == 0) {
      slot_pos = static_cast<unsigned long long>(t.counts[2 * r]);
      slot_neg = static_cast<unsigned long long>(t.counts[2 * r + 1]);
    }
    if (write) __syncthreads();
    const int64_t anchor = t.row0 + r;
    int64_t np = 0, nn = 0;
    for (int64_t j = threadIdx.x; j < row.M; j += kThreads) {
      if (j == row.self) continue;
      const T v = row.s[j];
      if (row.ref[j] == row.label) {
        if (sel.positive(v, max_neg)) {
          if (write) {
            const int64_t k = static_cast<int64_t>(atomicAdd(&slot_pos, 1ULL));
            t.a1[k] = anchor;
            t.p[k] = j;
          }
          ++np;
        }
      } else if (sel.negative(v, min_pos)) {
        if (write) {
          const int64_t k = static_cast<int64_t>(atomicAdd(&slot_neg, 1ULL));
          t.a2[k] = anchor;
          t.n[k] = j;
        }
        ++nn;
      }
    }
    if (!write) {
      np = block_reduce(np, SumOp{}, smem_j);
      nn = block_reduce(nn, SumOp{}, smem_j);
      if (threadIdx.x == 0) {
        st[kMinPos] = min_pos;
        st[kMaxNeg] = max_neg;
        t.counts[2 * r] = np;
        t.counts[2 * r + 1] = nn;
      }
    }
  } else if (pass == kBatchHard) {
    T bp = inf<T>(), bn = -inf<T>();
    int64_t jp = -1, jn = -1;
    for (int64_t j = threadIdx.x; j < row.M; j += kThreads) {
      if (j == row.self) continue;
      const T v = row.s[j];
      if (row.ref[j] == row.label) {
        if (harder_positive(v, j, bp, jp)) { bp = v; jp = j; }
      } else if (harder_negative(v, j, bn, jn)) {
        bn = v;
        jn = j;
      }
    }
    // A candidate with column -1 (none) never beats one with a column.
    auto better_pos = [](T v, int64_t j, T bv, int64_t bj) {
      return j >= 0 && (bj < 0 || v < bv || (v == bv && j < bj));
    };
    auto better_neg = [](T v, int64_t j, T bv, int64_t bj) {
      return j >= 0 && (bj < 0 || v > bv || (v == bv && j < bj));
    };
    jp = block_arg_best(bp, jp, better_pos, smem_a, smem_j);
    jn = block_arg_best(bn, jn, better_neg, smem_a, smem_j);
    if (threadIdx.x == 0) {
      t.hard[2 * r] = jp;
      t.hard[2 * r + 1] = jn;
    }
  }
}

void tile_kernel_cuda(const TileLaunch& L) {
  if (L.S.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(L.S.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(L.S.scalar_type(), "mining_tile_cuda", [&] {
    const TilePointers<scalar_t> t = tile_pointers<scalar_t>(L);
    tile_kernel<scalar_t><<<static_cast<unsigned>(t.rows), kThreads, 0, stream>>>(t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

constexpr Kernels kCudaKernels{tile_kernel_cuda};

}  // namespace mining
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CUDA, fusedtrain::mining::kCudaKernels)
