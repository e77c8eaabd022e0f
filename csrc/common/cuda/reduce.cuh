// Warp and block reductions and block scans. The block-wide helpers are for blocks of kThreads
// (launch.cuh) unless they take the block size as a template argument; every thread of the block
// must call them.
#pragma once

#include "launch.cuh"

#include <cuda_runtime.h>

#include <cstdint>

namespace fusedtrain {
namespace cuda {

struct MinOp { template <typename T> __device__ T operator()(T a, T b) const { return b < a ? b : a; } };
struct MaxOp { template <typename T> __device__ T operator()(T a, T b) const { return b > a ? b : a; } };
struct SumOp { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over an aligned group of kWidth (a power of two <= 32) lanes of a warp. Only the group's
// lanes are in the shuffle mask, so groups of one warp may take different branches.
template <int kWidth, typename T>
__device__ __forceinline__ T group_sum(T x) {
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0, "group width");
  if constexpr (kWidth == 32) return warp_sum(x);
  const unsigned lane = threadIdx.x & 31;
  const unsigned mask = ((kWidth == 32 ? 0u : (1u << kWidth)) - 1u) << (lane & ~(kWidth - 1u));
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(mask, x, offset);
  return x;
}

// Sum of two values over all kBlock threads of the block, returned to every thread. `scratch`
// holds 2 * (kBlock / 32) values. Ends with a barrier so scratch may be reused right after.
template <int kBlock, typename T>
__device__ __forceinline__ void block_allreduce_sum2(T& a, T& b, T* scratch) {
  constexpr int kBlockWarps = kBlock / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (kBlockWarps == 1) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    scratch[warp] = a;
    scratch[kBlockWarps + warp] = b;
  }
  __syncthreads();
  a = lane < kBlockWarps ? scratch[lane] : T(0);
  b = lane < kBlockWarps ? scratch[kBlockWarps + lane] : T(0);
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();
}

// op over the block, the result returned to every thread: the warps' results combined in warp
// order. `smem` holds kWarps values and may be reused right after (the leading barrier protects
// the previous use).
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  v = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = op(v, smem[w]);
  return v;
}

// The column j of the block's best (v, j): `better(v, j, v2, j2)` decides.
template <typename T, typename Better>
__device__ __forceinline__ int64_t block_arg_best(T v, int64_t j, Better better, T* smem_v, int64_t* smem_j) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oj = __shfl_xor_sync(0xffffffffu, j, o);
    if (better(ov, oj, v, j)) { v = ov; j = oj; }
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    smem_v[threadIdx.x >> 5] = v;
    smem_j[threadIdx.x >> 5] = j;
  }
  __syncthreads();
  v = smem_v[0];
  j = smem_j[0];
  for (int w = 1; w < kWarps; ++w)
    if (better(smem_v[w], smem_j[w], v, j)) { v = smem_v[w]; j = smem_j[w]; }
  return j;
}

// Sum over the block, the warps' sums added in warp order. `scratch` holds kWarps values.
__device__ __forceinline__ int64_t block_sum(int64_t v, int64_t* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  int64_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Cross-warp half of a block-wide exclusive scan: given its warp's total (the same in every lane),
// returns the sum of the totals of the warps before it; `total` gets the block's sum. `scratch`
// holds kWarps + 1 ints.
__device__ __forceinline__ int block_warp_offset(int warp_total, int* scratch, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = warp_total;
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int c = scratch[w];
      scratch[w] = run;
      run += c;
    }
    scratch[kWarps] = run;
  }
  __syncthreads();
  const int offset = scratch[warp];
  total = scratch[kWarps];
  __syncthreads();  // scratch is reused by the next call
  return offset;
}

// Exclusive prefix count of `flag` over the block in thread order; `total` gets the block's sum.
// `scratch` holds kWarps + 1 ints.
__device__ __forceinline__ int block_exclusive_count(bool flag, int* scratch, int& total) {
  const int lane = threadIdx.x & 31;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  return block_warp_offset(__popc(ballot), scratch, total) + in_warp;
}

// Exclusive prefix sum of `v` over the block in thread order; `total` gets the block's sum.
// `scratch` holds kWarps + 1 ints.
__device__ __forceinline__ int block_exclusive_sum(int v, int* scratch, int& total) {
  const int lane = threadIdx.x & 31;
  int inclusive = v;
  for (int d = 1; d < 32; d <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += n;
  }
  const int warp_total = __shfl_sync(0xffffffffu, inclusive, 31);
  return block_warp_offset(warp_total, scratch, total) + inclusive - v;
}

}  // namespace cuda
}  // namespace fusedtrain
