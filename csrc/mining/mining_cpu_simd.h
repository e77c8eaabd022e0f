// AVX2 row loops of the Multi-Similarity loss for float32 tiles (the hot path on CPU): 8 columns a
// step, labels compared as int64 pairs of 4 lanes, one exp per column from a Cephes-style
// polynomial, the log-sum-exp taken about the row's known maximum (the thresholds give it), so no
// per-column max or branch. Columns that need special handling (the anchor's own column, the
// dropped self slot of a cross-batch memory) are left to the caller's scalar code.
#pragma once

#include "mining_math.h"
#include "../common/cpu/simd.h"

#include <cstdint>
#include <cstring>
#include <limits>

namespace fusedtrain {
namespace mining {
namespace simd {

using cpu::f32x8;
using cpu::i32x8;
using cpu::i64x4;
using cpu::load_vec;
using cpu::select;
using cpu::splat;
using cpu::store_vec;

// -1 lanes where ref[j..j+8) == label (int64 compares, narrowed to 8 x int32 masks).
FT_ALWAYS_INLINE i32x8 label_mask(const int64_t* ref, int64_t label) {
  i64x4 a, b;
  std::memcpy(&a, ref, sizeof(a));
  std::memcpy(&b, ref + 4, sizeof(b));
  const i64x4 l = i64x4{} + label;
  typedef int32_t v4i __attribute__((vector_size(16)));
  const v4i ma = __builtin_convertvector(a == l, v4i), mb = __builtin_convertvector(b == l, v4i);
  return __builtin_shufflevector(ma, mb, 0, 1, 2, 3, 4, 5, 6, 7);
}

// exp(x) for x <= ~88 (the callers' exponents are <= 0 up to rounding): Cephes expf's range
// reduction and polynomial, ~1 ulp; below -87.3 it returns ~1e-38 instead of 0 (the callers add
// it to a sum that holds a term >= exp(-|c|)... of order one, or mask the lane).
FT_ALWAYS_INLINE f32x8 exp8(f32x8 x) {
  const f32x8 hi = splat(88.3762626647949f), lo = splat(-87.3365478515625f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const f32x8 fx = x * 1.44269504088896341f + 0.5f;
  i32x8 n = __builtin_convertvector(fx, i32x8);
  f32x8 nf = __builtin_convertvector(n, f32x8);
  n = nf > fx ? n - 1 : n;  // floor
  nf = __builtin_convertvector(n, f32x8);
  const f32x8 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  f32x8 p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  const i32x8 bits = (n + 127) << 23;
  f32x8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// min S over positives, max S over negatives of columns [begin, end) (end - begin a multiple of 8).
FT_ALWAYS_INLINE void thresholds8(const float* s, const int64_t* ref, int64_t label, int64_t begin,
                                  int64_t end, float& min_pos, float& max_neg) {
  const f32x8 inf = splat(std::numeric_limits<float>::infinity());
  f32x8 lo = inf, hi = -inf;
  for (int64_t j = begin; j < end; j += 8) {
    const f32x8 v = load_vec<float>(s + j);
    const i32x8 pos = label_mask(ref + j, label);
    lo = select(pos & (v < lo), v, lo);
    hi = select(~pos & (v > hi), v, hi);
  }
  min_pos = cpu::horizontal_min<float>(lo) < min_pos ? cpu::horizontal_min<float>(lo) : min_pos;
  max_neg = cpu::horizontal_max<float>(hi) > max_neg ? cpu::horizontal_max<float>(hi) : max_neg;
}

// The mined masks of 8 columns (MS rule, or every pair when !mine).
struct Mined {
  i32x8 pos, neg;
};
FT_ALWAYS_INLINE Mined mined8(f32x8 v, i32x8 is_pos, bool mine, float eps, float min_pos, float max_neg) {
  if (!mine) return {is_pos, ~is_pos};
  // ms_keep_positive / ms_keep_negative: the negated comparisons keep NaN similarities.
  return {is_pos & ~((v - eps) >= max_neg), ~is_pos & ~((v + eps) <= min_pos)};
}

// The exponents of 8 columns at s, x⁺ = −α(S − λ) − c⁺ for positives, x⁻ = β(S − λ) − c⁻ for
// negatives, with the columns' positive mask and mined masks.
FT_ALWAYS_INLINE f32x8 exponent8(const float* s, const int64_t* ref, int64_t label, bool mine, float eps,
                                 float min_pos, float max_neg, float alpha, float beta, float base, float c_pos,
                                 float c_neg, i32x8& is_pos, Mined& m) {
  const f32x8 v = load_vec<float>(s);
  is_pos = label_mask(ref, label);
  m = mined8(v, is_pos, mine, eps, min_pos, max_neg);
  const f32x8 d = v - base;
  return select(is_pos, -alpha * d - c_pos, beta * d - c_neg);
}

// Σ exp(x − c) and counts over the mined columns of [begin, end), x⁺ = −α(S − λ), x⁻ = β(S − λ).
struct Sums {
  float pos = 0, neg = 0, n_pos = 0, n_neg = 0;
};
FT_ALWAYS_INLINE void exp_sums8(const float* s, const int64_t* ref, int64_t label, int64_t begin,
                                int64_t end, bool mine, float eps, float min_pos, float max_neg,
                                float alpha, float beta, float base, float c_pos, float c_neg, Sums& out) {
  f32x8 sp = {}, sn = {}, np = {}, nn = {};
  const f32x8 one = splat(1.0f), zero = {};
  for (int64_t j = begin; j < end; j += 8) {
    i32x8 is_pos;
    Mined m;
    const f32x8 e = exp8(exponent8(s + j, ref + j, label, mine, eps, min_pos, max_neg, alpha, beta, base, c_pos,
                                   c_neg, is_pos, m));
    sp += select(m.pos, e, zero);
    sn += select(m.neg, e, zero);
    np += select(m.pos, one, zero);
    nn += select(m.neg, one, zero);
  }
  out.pos += cpu::horizontal_sum<float>(sp);
  out.neg += cpu::horizontal_sum<float>(sn);
  out.n_pos += cpu::horizontal_sum<float>(np);
  out.n_neg += cpu::horizontal_sum<float>(nn);
}

// dL/dS over [begin, end), written over the similarities.
FT_ALWAYS_INLINE void grad8(float* s, const int64_t* ref, int64_t label, int64_t begin, int64_t end,
                            bool mine, float eps, float min_pos, float max_neg, float alpha, float beta,
                            float base, float lse_pos, float lse_neg, float w) {
  const f32x8 zero = {};
  for (int64_t j = begin; j < end; j += 8) {
    i32x8 is_pos;
    Mined m;
    const f32x8 x = exponent8(s + j, ref + j, label, mine, eps, min_pos, max_neg, alpha, beta, base, lse_pos,
                              lse_neg, is_pos, m);
    const f32x8 g = exp8(x) * select(is_pos, splat(-w), splat(w));
    store_vec<float>(s + j, select(m.pos | m.neg, g, zero));
  }
}

}  // namespace simd
}  // namespace mining
}  // namespace fusedtrain
