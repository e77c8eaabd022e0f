// CUDA helpers shared by the families' kernels: 16-byte vector access, warp/block reductions,
// device attributes, launch checks.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fusedtrain {
namespace cuda {

// A 16-byte vector of scalar_t: the unit of every hot-path load and store.
template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Elements before `p` reaches 16-byte alignment (p itself is scalar_t aligned).
template <typename scalar_t>
__device__ __forceinline__ int elements_to_alignment(const scalar_t* p) {
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(p) & 15);
  return misalign == 0 ? 0 : (16 - misalign) / static_cast<int>(sizeof(scalar_t));
}

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

// Sum of two values over all threads of the block, returned to every thread. `scratch` holds
// 2 * (blockDim / 32) values. Ends with a barrier so scratch may be reused right after.
template <int kThreads, typename T>
__device__ __forceinline__ void block_allreduce_sum2(T& a, T& b, T* scratch) {
  constexpr int kWarps = kThreads / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (kWarps == 1) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    scratch[warp] = a;
    scratch[kWarps + warp] = b;
  }
  __syncthreads();
  a = lane < kWarps ? scratch[lane] : T(0);
  b = lane < kWarps ? scratch[kWarps + lane] : T(0);
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();
}

inline int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

inline int multiprocessor_count(int device) {
  return device_attribute(cudaDevAttrMultiProcessorCount, device);
}

inline int max_shared_memory_per_block(int device) {
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

}  // namespace cuda
}  // namespace fusedtrain
