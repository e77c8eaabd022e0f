// AVX2 row loops of the Multi-Similarity loss for float32 tiles (the hot path on CPU): 8 columns a
// step, labels compared as int64 pairs of 4 lanes, one exp per column from a Cephes-style
// polynomial, the log-sum-exp taken about the row's known maximum (the thresholds give it), so no
// per-column max or branch. Columns that need special handling (the anchor's own column, the
// dropped self slot of a cross-batch memory) are left to the caller's scalar code.
#pragma once

#include "mining_math.h"
#include "../common/cpu_utils.h"

#include <cstdint>
#include <cstring>
#include <limits>

namespace fusedtrain {
namespace mining {
namespace simd {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));

FT_ALWAYS_INLINE v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof(v)); return v; }
FT_ALWAYS_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
FT_ALWAYS_INLINE v8f splat(float x) { return v8f{} + x; }

// -1 lanes where ref[j..j+8) == label (int64 compares, narrowed to 8 x int32 masks).
FT_ALWAYS_INLINE v8i label_mask(const int64_t* ref, int64_t label) {
  v4l a, b;
  std::memcpy(&a, ref, sizeof(a));
  std::memcpy(&b, ref + 4, sizeof(b));
  const v4l l = v4l{} + label;
  typedef int32_t v4i __attribute__((vector_size(16)));
  const v4i ma = __builtin_convertvector(a == l, v4i), mb = __builtin_convertvector(b == l, v4i);
  return __builtin_shufflevector(ma, mb, 0, 1, 2, 3, 4, 5, 6, 7);
}

FT_ALWAYS_INLINE v8f select(v8i mask, v8f a, v8f b) { return mask ? a : b; }

// exp(x) for x <= ~88 (the callers' exponents are <= 0 up to rounding): Cephes expf's range
// reduction and polynomial, ~1 ulp; below -87.3 it returns ~1e-38 instead of 0 (the callers add
// it to a sum that holds a term >= exp(-|c|)... of order one, or mask the lane).
FT_ALWAYS_INLINE v8f exp8(v8f x) {
  const v8f hi = splat(88.3762626647949f), lo = splat(-87.3365478515625f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const v8f fx = x * 1.44269504088896341f + 0.5f;
  v8i n = __builtin_convertvector(fx, v8i);
  v8f nf = __builtin_convertvector(n, v8f);
  n = nf > fx ? n - 1 : n;  // floor
  nf = __builtin_convertvector(n, v8f);
  const v8f r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  v8f p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  const v8i bits = (n + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

FT_ALWAYS_INLINE float hsum(v8f v) {
  float s = 0;
  for (int k = 0; k < 8; ++k) s += v[k];
  return s;
}
FT_ALWAYS_INLINE float hmin(v8f v) {
  float s = v[0];
  for (int k = 1; k < 8; ++k) s = v[k] < s ? v[k] : s;
  return s;
}
FT_ALWAYS_INLINE float hmax(v8f v) {
  float s = v[0];
  for (int k = 1; k < 8; ++k) s = v[k] > s ? v[k] : s;
  return s;
}

// min S over positives, max S over negatives of columns [begin, end) (end - begin a multiple of 8).
FT_ALWAYS_INLINE void thresholds8(const float* s, const int64_t* ref, int64_t label, int64_t begin,
                                  int64_t end, float& min_pos, float& max_neg) {
  const v8f inf = splat(std::numeric_limits<float>::infinity());
  v8f lo = inf, hi = -inf;
  for (int64_t j = begin; j < end; j += 8) {
    const v8f v = load8(s + j);
    const v8i pos = label_mask(ref + j, label);
    lo = select(pos & (v < lo), v, lo);
    hi = select(~pos & (v > hi), v, hi);
  }
  min_pos = hmin(lo) < min_pos ? hmin(lo) : min_pos;
  max_neg = hmax(hi) > max_neg ? hmax(hi) : max_neg;
}

// The mined masks of 8 columns (MS rule, or every pair when !mine).
struct Mined {
  v8i pos, neg;
};
FT_ALWAYS_INLINE Mined mined8(v8f v, v8i is_pos, bool mine, float eps, float min_pos, float max_neg) {
  if (!mine) return {is_pos, ~is_pos};
  return {is_pos & ((v - eps) < max_neg), ~is_pos & ((v + eps) > min_pos)};
}

// Σ exp(x − c) and counts over the mined columns of [begin, end), x⁺ = −α(S − λ), x⁻ = β(S − λ).
struct Sums {
  float pos = 0, neg = 0, n_pos = 0, n_neg = 0;
};
FT_ALWAYS_INLINE void exp_sums8(const float* s, const int64_t* ref, int64_t label, int64_t begin,
                                int64_t end, bool mine, float eps, float min_pos, float max_neg,
                                float alpha, float beta, float base, float c_pos, float c_neg, Sums& out) {
  v8f sp = {}, sn = {}, np = {}, nn = {};
  const v8f one = splat(1.0f), zero = {};
  for (int64_t j = begin; j < end; j += 8) {
    const v8f v = load8(s + j);
    const v8i is_pos = label_mask(ref + j, label);
    const Mined m = mined8(v, is_pos, mine, eps, min_pos, max_neg);
    const v8f d = v - base;
    const v8f x = select(is_pos, -alpha * d - c_pos, beta * d - c_neg);
    const v8f e = exp8(x);
    sp += select(m.pos, e, zero);
    sn += select(m.neg, e, zero);
    np += select(m.pos, one, zero);
    nn += select(m.neg, one, zero);
  }
  out.pos += hsum(sp);
  out.neg += hsum(sn);
  out.n_pos += hsum(np);
  out.n_neg += hsum(nn);
}

// dL/dS over [begin, end), written over the similarities.
FT_ALWAYS_INLINE void grad8(float* s, const int64_t* ref, int64_t label, int64_t begin, int64_t end,
                            bool mine, float eps, float min_pos, float max_neg, float alpha, float beta,
                            float base, float lse_pos, float lse_neg, float w) {
  const v8f zero = {};
  for (int64_t j = begin; j < end; j += 8) {
    const v8f v = load8(s + j);
    const v8i is_pos = label_mask(ref + j, label);
    const Mined m = mined8(v, is_pos, mine, eps, min_pos, max_neg);
    const v8f d = v - base;
    const v8f x = select(is_pos, -alpha * d - lse_pos, beta * d - lse_neg);
    const v8f g = exp8(x) * select(is_pos, splat(-w), splat(w));
    store8(s + j, select(m.pos | m.neg, g, zero));
  }
}

}  // namespace simd
}  // namespace mining
}  // namespace fusedtrain
