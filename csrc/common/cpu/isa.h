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

#include <cstdlib>
#include <cstring>

namespace fusedtrain {
namespace cpu {

// Whether the environment asks for the generic (non-AVX2) paths: FUSEDTRAIN_CPU_CAPABILITY=default,
// or, when that is unset, ATen's own ATEN_CPU_CAPABILITY=default. Users' CPUs are not all AVX2
// machines: this lets the tests run the code those CPUs run, on this one.
inline bool generic_paths_requested() {
  const char* value = std::getenv("FUSEDTRAIN_CPU_CAPABILITY");
  if (value == nullptr || *value == '\0') value = std::getenv("ATEN_CPU_CAPABILITY");
  return value != nullptr && std::strcmp(value, "default") == 0;
}

// Read once, at the first kernel call.
inline bool cpu_has_avx2() {
#if FT_HAVE_AVX2_PATH
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && !generic_paths_requested();
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fusedtrain
