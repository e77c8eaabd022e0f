// CPU helpers shared by the families' C++ kernels: explicit SIMD vectors (GCC/Clang vector
// extensions, which stay in registers where a plain "lanes" array may be spilled), per-ISA entry
// points chosen at run time, and transparent huge pages for large fresh outputs.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fusedtrain {
namespace cpu {

#if defined(__GNUC__)
#define FT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FT_ALWAYS_INLINE inline
#endif

// Functions marked FT_TARGET_AVX2 are compiled for AVX2+FMA; the FT_ALWAYS_INLINE bodies they call
// are inlined into them and so compiled for AVX2 too. Callers pick them only when the CPU has AVX2.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FT_HAVE_AVX2_PATH 1
#define FT_TARGET_AVX2 __attribute__((target("avx2,fma")))
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
#define FT_HAVE_AVX2_PATH 0
#define FT_TARGET_AVX2
inline bool cpu_has_avx2() { return false; }
#endif

// 32-byte vector of the accumulate type: one ymm register on AVX2, two xmm on SSE2.
template <typename acc> struct Vec32;
template <> struct Vec32<float> { typedef float type __attribute__((vector_size(32))); };
template <> struct Vec32<double> { typedef double type __attribute__((vector_size(32))); };

template <typename acc>
using vec_t = typename Vec32<acc>::type;
template <typename acc>
constexpr int vec_width = 32 / sizeof(acc);

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

template <typename acc>
FT_ALWAYS_INLINE acc horizontal_sum(vec_t<acc> v) {
  acc total = 0;
  for (int j = 0; j < vec_width<acc>; ++j) total += v[j];
  return total;
}

// Ask for transparent huge pages on a large buffer nothing has touched yet: first-touch page faults
// otherwise cost more than the kernel that writes it (seen: 512 MiB in 4 KiB pages took longer
// to fault in than to fill). Advice only; ignored where unsupported.
inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace fusedtrain
