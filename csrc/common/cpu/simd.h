// The one SIMD vocabulary of the CPU kernels: 32-byte vectors as GCC/Clang vector extensions (they
// stay in registers where a plain "lanes" array may be spilled; one ymm register on AVX2, two xmm
// on SSE2). Compiled for whatever target the calling function has (see isa.h).
#pragma once

#include "isa.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fusedtrain {
namespace cpu {

// 32-byte vector of the accumulate type, and the integer vector its comparisons yield.
template <typename acc> struct Vec32;
template <> struct Vec32<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t mask __attribute__((vector_size(32)));
};
template <> struct Vec32<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t mask __attribute__((vector_size(32)));
};

template <typename acc>
using vec_t = typename Vec32<acc>::type;
template <typename acc>
using mask_t = typename Vec32<acc>::mask;
template <typename acc>
constexpr int vec_width = 32 / sizeof(acc);

using f32x8 = vec_t<float>;
using i32x8 = mask_t<float>;
using i64x4 = mask_t<double>;

// Load/store `vec_width<acc>` consecutive elements of type scalar_t, converting to/from acc.
template <typename acc, typename scalar_t>
FT_ALWAYS_INLINE vec_t<acc> load_vec(const scalar_t* p) {
  vec_t<acc> v;
  if constexpr (sizeof(scalar_t) == sizeof(acc)) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int j = 0; j < vec_width<acc>; ++j) v[j] = static_cast<acc>(p[j]);
  }
  return v;
}

template <typename acc, typename scalar_t>
FT_ALWAYS_INLINE void store_vec(scalar_t* p, vec_t<acc> v) {
  if constexpr (sizeof(scalar_t) == sizeof(acc)) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int j = 0; j < vec_width<acc>; ++j) p[j] = static_cast<scalar_t>(v[j]);
  }
}

// As load_vec, but bf16 widens by a 16-bit shift of its bits (exact, NaN kept), which the compiler
// vectorizes where the element-wise conversion would not.
template <typename acc, typename scalar_t>
FT_ALWAYS_INLINE vec_t<acc> load_vec_by_bits(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    typedef uint16_t u16x8 __attribute__((vector_size(16)));
    typedef uint32_t u32x8 __attribute__((vector_size(32)));
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
    vec_t<float> v;
    std::memcpy(&v, &w, sizeof(v));
    return v;
  } else {
    return load_vec<acc>(p);
  }
}

// x in every lane as 0 + x (so -0 becomes +0): the form the arithmetic loops take.
template <typename acc>
FT_ALWAYS_INLINE vec_t<acc> splat(acc x) { return vec_t<acc>{} + x; }

// x in every lane bit for bit (-0 stays -0): the form the comparison loops take.
template <typename acc>
FT_ALWAYS_INLINE vec_t<acc> broadcast(acc x) {
  vec_t<acc> v;
  for (int j = 0; j < vec_width<acc>; ++j) v[j] = x;
  return v;
}

// Lane-wise mask ? a : b for a comparison mask.
template <typename M, typename V>
FT_ALWAYS_INLINE V select(M mask, V a, V b) { return mask ? a : b; }

// Sum of the lanes, first to last.
template <typename acc>
FT_ALWAYS_INLINE acc horizontal_sum(vec_t<acc> v) {
  acc total = 0;
  for (int j = 0; j < vec_width<acc>; ++j) total += v[j];
  return total;
}

template <typename acc>
FT_ALWAYS_INLINE acc horizontal_min(vec_t<acc> v) {
  acc s = v[0];
  for (int j = 1; j < vec_width<acc>; ++j) s = v[j] < s ? v[j] : s;
  return s;
}

template <typename acc>
FT_ALWAYS_INLINE acc horizontal_max(vec_t<acc> v) {
  acc s = v[0];
  for (int j = 1; j < vec_width<acc>; ++j) s = v[j] > s ? v[j] : s;
  return s;
}

// Whether any lane of a 32-byte comparison mask is set (one OR-reduce, no per-lane extraction).
template <typename M>
FT_ALWAYS_INLINE bool any_lane(const M& m) {
  uint64_t lanes[4];
  static_assert(sizeof(m) == sizeof(lanes), "32-byte mask");
  std::memcpy(lanes, &m, sizeof(lanes));
  return ((lanes[0] | lanes[1]) | (lanes[2] | lanes[3])) != 0;
}

// The lanes of a comparison mask as bits (lane j -> bit j).
template <typename M>
FT_ALWAYS_INLINE uint32_t lane_bits(const M& m) {
  constexpr int W = sizeof(m) / sizeof(m[0]);
  uint32_t bits = 0;
  for (int j = 0; j < W; ++j) bits |= static_cast<uint32_t>(m[j] & 1) << j;
  return bits;
}

}  // namespace cpu
}  // namespace fusedtrain
