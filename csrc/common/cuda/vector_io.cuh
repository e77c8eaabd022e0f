// 16-byte vector access: the unit of every hot-path load and store.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fusedtrain {
namespace cuda {

// A 16-byte vector of scalar_t.
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

}  // namespace cuda
}  // namespace fusedtrain
