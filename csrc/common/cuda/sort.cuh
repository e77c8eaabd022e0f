// Sorting and selection building blocks: order-preserving integer keys of floating values (for
// radix selection and histograms) and a block-wide bitonic sort in shared memory.
#pragma once

#include "launch.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "../math.h"

namespace fusedtrain {
namespace cuda {

// Order-preserving unsigned keys, on the scalar type's own bits: 16-bit keys for bf16/fp16 (two
// 8-bit radix passes instead of four), 32 for fp32, 64 for fp64. NaN maps to -inf (as rank_key)
// and -0 to +0 (equal values, equal keys: ties then go by index, as on the CPU). A type's traits
// are its IEEE layout: an unsigned Key of its width and the bits of +inf (a NaN's magnitude bits
// exceed them; -inf is +inf with the sign bit).
template <typename Key_, Key_ kInf>
struct IeeeBits {
  using Key = Key_;
  static constexpr Key kSign = static_cast<Key>(Key(1) << (sizeof(Key) * 8 - 1));
  static constexpr Key kNegInf = static_cast<Key>(kInf | kSign);
  __device__ static bool is_nan(Key b) { return static_cast<Key>(b & static_cast<Key>(~kSign)) > kInf; }
};
template <typename scalar_t> struct KeyTraits;
template <> struct KeyTraits<float> : IeeeBits<uint32_t, 0x7F800000u> {};
template <> struct KeyTraits<double> : IeeeBits<uint64_t, 0x7FF0000000000000ull> {};
template <> struct KeyTraits<c10::BFloat16> : IeeeBits<uint16_t, 0x7F80u> {};
template <> struct KeyTraits<c10::Half> : IeeeBits<uint16_t, 0x7C00u> {};

template <typename scalar_t>
using key_t = typename KeyTraits<scalar_t>::Key;

template <typename scalar_t>
__device__ __forceinline__ key_t<scalar_t> ordered_key(scalar_t v) {
  using T = KeyTraits<scalar_t>;
  using Key = typename T::Key;
  constexpr Key sign = T::kSign;
  Key b;
  memcpy(&b, &v, sizeof(b));
  if (T::is_nan(b)) b = T::kNegInf;
  if (b == sign) b = 0;  // -0 -> +0
  return (b & sign) ? static_cast<Key>(~b) : static_cast<Key>(b | sign);
}

template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> key_value(key_t<scalar_t> key) {
  using T = KeyTraits<scalar_t>;
  using Key = typename T::Key;
  constexpr Key sign = T::kSign;
  const Key b = (key & sign) ? static_cast<Key>(key & static_cast<Key>(~sign)) : static_cast<Key>(~key);
  scalar_t v;
  memcpy(&v, &b, sizeof(v));
  return static_cast<acc_t<scalar_t>>(v);
}

// Bitonic sort of the first k (key, index) pairs in shared memory, best first (larger key, then
// smaller index), by the whole block. The arrays must hold the next power of two >= k: the padding
// (key 0, which is no value's key, and the largest index) sorts last.
template <typename Key, typename Index>
__device__ void sort_best_first(Key* key, Index* idx, int k) {
  int P = 1;
  while (P < k) P <<= 1;
  for (int i = k + threadIdx.x; i < P; i += kThreads) {
    key[i] = 0;
    idx[i] = std::numeric_limits<Index>::max();
  }
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int half = size >> 1; half > 0; half >>= 1) {
      for (int i = threadIdx.x; i < P; i += kThreads) {
        const int j = i ^ half;
        if (j <= i) continue;
        const bool i_first = key[i] > key[j] || (key[i] == key[j] && idx[i] < idx[j]);
        const bool best_first = (i & size) == 0;
        if (i_first != best_first) {
          const Key tk = key[i];
          key[i] = key[j];
          key[j] = tk;
          const Index ti = idx[i];
          idx[i] = idx[j];
          idx[j] = ti;
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace cuda
}  // namespace fusedtrain
