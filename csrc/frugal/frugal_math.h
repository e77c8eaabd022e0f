// Per-coordinate math of the FRUGAL step (spec/frugal.md), shared by the CPU and CUDA kernels
// (__host__ __device__) so the CPU tests exercise the formulas the GPU runs.
#pragma once

#include "../common/math.h"

#include <cstdint>

// Always inlined: the CPU loops must vectorize over these, and a call per element would not (GCC
// does not always inline them on its own).
#if defined(__CUDACC__)
#define FT_FRUGAL_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FT_FRUGAL_INLINE inline __attribute__((always_inline))
#else
#define FT_FRUGAL_INLINE inline
#endif

namespace fusedtrain {
namespace frugal {

// How one tensor of a step is updated. The projection itself (which coordinates, which basis) is
// chosen in Python; the kernels only apply it.
// `indices` of kColumns / kRows is read as a SET, on every device, whatever its values: entry j is
// active iff its value lies in [0, limit) (the columns or rows there are) and no earlier entry has
// the same value. The selected columns (rows) are the values of the active entries: each gets
// AdamW once, with the moments of its active entry's slot j; every other column (row) gets the
// state-free update. The moment slots of inactive entries (out of range, repeated) are left as they
// are. A sorted list of unique in-range indices, what FRUGAL passes, is every entry active; other
// lists are neither an error nor a race (CPU: made canonical on the host; CUDA: a slower path on
// the device, no host sync).
FT_FRUGAL_INLINE bool strictly_increasing_in_range(const int32_t* idx, int64_t k, int64_t limit) {
  for (int64_t j = 0; j < k; ++j)
    if (idx[j] < 0 || idx[j] >= limit || (j > 0 && idx[j] <= idx[j - 1])) return false;
  return true;
}

enum Kind : int {
  kDense = 0,     // AdamW on every coordinate (non-projectable tensors, active blocks, density 1)
  kColumns = 1,   // AdamW on the columns listed in `indices` (int32, a set: above), signSGD/SGD elsewhere
  kRows = 2,      // the same for rows
  kFree = 3,      // state-free update only (inactive blocks, density 0)
  kResidual = 4,  // svd/random: w -= lr·dense_update + lr·free_lr_scale·free(g − residual_base)
  kKindCount = 5,
};

enum FreeUpdate : int { kSignSGD = 0, kSGD = 1, kNone = 2 };

// Host-computed constants of one tensor's update (bias corrections depend on its own step count).
template <typename acc>
struct Scalars {
  acc decay;         // 1 − lr·weight_decay
  acc lr;            // scale of a precomputed dense update (kResidual)
  acc step_size;     // lr / (1 − β1^t)
  acc bc2_sqrt;      // sqrt(1 − β2^t)
  acc free_scale;    // lr · free_lr_scale
  acc one_minus_b1;  // torch.lerp's weight
  acc beta2;
  acc one_minus_b2;
  acc eps;
  int free_update;
};

// The state-free direction: sign(g) (signSGD), g (SGD) or nothing. sign(NaN) is NaN, as torch.sign:
// a NaN gradient must reach the weight, not be skipped as a zero.
template <typename acc>
FT_FRUGAL_INLINE acc free_direction(acc g, int mode) {
  // Branch-free (a compare and a select), so CPU loops over it vectorize.
  if (mode == kSignSGD) {
    const acc sign = static_cast<acc>(g > acc(0)) - static_cast<acc>(g < acc(0));
    return g == g ? sign : g;
  }
  return mode == kSGD ? g : acc(0);
}

// w·decay rounded on its own, as torch's `p.mul_(1 − lr·wd)` does before the update is added:
// nvcc would otherwise fuse it with the subtraction into one FMA (the CPU build enables no FMA
// for these loops), and density 0 / 1 could not reproduce signSGD / AdamW to the last bit.
template <typename acc>
FT_FRUGAL_INLINE acc decayed(acc w, acc decay) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc) == sizeof(float)) return __fmul_rn(w, decay);
  else return __dmul_rn(w, decay);
#else
  return w * decay;
#endif
}

template <typename acc>
FT_FRUGAL_INLINE acc free_coordinate(acc w, acc g, const Scalars<acc>& s) {
  return decayed(w, s.decay) - s.free_scale * free_direction(g, s.free_update);
}

// AdamW on one coordinate in torch.optim.AdamW's order of operations (lerp for the first moment,
// sqrt(v)/sqrt(bc2) + eps for the denominator), so density 1 reproduces it to rounding.
template <typename acc>
FT_FRUGAL_INLINE acc adam_coordinate(acc w, acc g, acc& m, acc& v, const Scalars<acc>& s) {
  using std::sqrt;
  // torch.lerp(m, g, w) takes m + w·(g − m) for w < 0.5, else g − (g − m)·(1 − w).
  m = s.one_minus_b1 < acc(0.5) ? m + s.one_minus_b1 * (g - m)
                                : g - (g - m) * (acc(1) - s.one_minus_b1);
  v = v * s.beta2 + s.one_minus_b2 * g * g;
  const acc denom = sqrt(v) / s.bc2_sqrt + s.eps;
  return decayed(w, s.decay) - s.step_size * (m / denom);
}

// svd/random: the Adam direction in the subspace is already mapped back (`update`); what is left
// of the gradient outside the subspace is g − base.
template <typename acc>
FT_FRUGAL_INLINE acc residual_coordinate(acc w, acc g, acc base, acc update, const Scalars<acc>& s) {
  return decayed(w, s.decay) - s.lr * update - s.free_scale * free_direction(g - base, s.free_update);
}

}  // namespace frugal
}  // namespace fusedtrain
