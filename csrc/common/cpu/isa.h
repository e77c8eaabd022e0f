// The one instruction-set chooser of the CPU kernels: functions marked FT_TARGET_AVX2 are compiled
// for AVX2+FMA, FT_TARGET_AVX2_NO_FMA for AVX2 alone; the FT_ALWAYS_INLINE bodies they call are
// inlined into them and so compiled for that target too. Callers pick such a function only when
// cpu_has_avx2() says the CPU has it, and keep a generic build of the same body for other CPUs.
#pragma once

#if defined(__GNUC__)
#define FT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FT_ALWAYS_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FT_HAVE_AVX2_PATH 1
#define FT_TARGET_AVX2 __attribute__((target("avx2,fma")))
// Without FMA: GCC contracts a·b − c into an FMA wherever the target has one (its default for C++
// is -ffp-contract=fast), which rounds differently from a separate multiply and add. For loops that
// must reproduce torch's unfused arithmetic to the last bit.
#define FT_TARGET_AVX2_NO_FMA __attribute__((target("avx2")))
#else
#define FT_HAVE_AVX2_PATH 0
#define FT_TARGET_AVX2
#define FT_TARGET_AVX2_NO_FMA
#endif

namespace fusedtrain {
namespace cpu {

inline bool cpu_has_avx2() {
#if FT_HAVE_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fusedtrain
