// CPU tile kernels of the mining family: the rows of a tile of S in parallel, each row's passes
// back to back while it is in cache (thresholds, then the mined pairs' log-sum-exps, counts, indices
// or gradient). The tiles themselves come from at::mm in the driver (mining.cpp).
#include "mining.h"

#include "../common/backend.h"
#include "mining_cpu_simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

namespace fusedtrain {
namespace mining {
namespace {

// fn(j) for every column but `skip` (the self pair, or -1): two plain ranges, so the loops carry no
// per-column test for it.
template <typename Fn>
inline void for_columns(int64_t M, int64_t skip, Fn&& fn) {
  const int64_t cut = skip >= 0 && skip < M ? skip : M;
  for (int64_t j = 0; j < cut; ++j) fn(j);
  for (int64_t j = cut + 1; j < M; ++j) fn(j);
}

template <typename T>
struct Row {
  const TilePointers<T>& t;
  int64_t r;
  T* s;
  int64_t label, self, drop;

  Row(const TilePointers<T>& tp, int64_t row)
      : t(tp), r(row), s(tp.S + row * tp.M), label(tp.labels[tp.row0 + row]),
        self(tp.self_column(row)), drop(tp.dropped_column(row)) {}

  bool is_pos(int64_t j) const { return t.ref_labels[j] == label; }

  // min S over positives and max S over negatives (the whole unmined sets, self pair excluded).
  void thresholds(T& min_pos, T& max_neg) const {
    T lo = std::numeric_limits<T>::infinity(), hi = -std::numeric_limits<T>::infinity();
    const int64_t* ref = t.ref_labels;
    const int64_t li = label;
    const T* v = s;
    for_columns(t.M, self, [&](int64_t j) {
      const bool pos = ref[j] == li;
      lo = std::min(lo, pos ? v[j] : std::numeric_limits<T>::infinity());
      hi = std::max(hi, pos ? -std::numeric_limits<T>::infinity() : v[j]);
    });
    min_pos = lo;
    max_neg = hi;
  }
};

template <typename T>
void ms_forward_row(const TilePointers<T>& t, int64_t r) {
  const Row<T> row(t, r);
  const Selector<T> sel(t.params, kRuleMultiSimilarity, t.params.mine);
  T min_pos = std::numeric_limits<T>::infinity(), max_neg = -std::numeric_limits<T>::infinity();
  if (sel.needs_thresholds()) row.thresholds(min_pos, max_neg);
  const T alpha = T(t.params.alpha), beta = T(t.params.beta), base = T(t.params.base);
  Lse<T> lp, ln;
  int64_t np = 0, nn = 0;
  for_columns(t.M, row.self, [&](int64_t j) {
    const T v = row.s[j];
    if (row.is_pos(j)) {
      if (j != row.drop && sel.positive(v, max_neg)) {
        lp.add(ms_pos_exponent(v, alpha, base));
        ++np;
      }
    } else if (sel.negative(v, min_pos)) {
      ln.add(ms_neg_exponent(v, beta, base));
      ++nn;
    }
  });
  T* st = t.stats + r * kStatCount;
  st[kMinPos] = min_pos;
  st[kMaxNeg] = max_neg;
  st[kLsePos] = lp.log1p_value();
  st[kLseNeg] = ln.log1p_value();
  st[kNumPos] = T(np);
  st[kNumNeg] = T(nn);
}

template <typename T>
void ms_backward_row(const TilePointers<T>& t, int64_t r) {
  const Row<T> row(t, r);
  const Selector<T> sel(t.params, kRuleMultiSimilarity, t.params.mine);
  const T* st = t.stats + r * kStatCount;
  const T min_pos = st[kMinPos], max_neg = st[kMaxNeg], lse_pos = st[kLsePos], lse_neg = st[kLseNeg];
  const T alpha = T(t.params.alpha), beta = T(t.params.beta), base = T(t.params.base);
  const T w = t.coef[0];
  T* g = row.s;
  for (int64_t j = 0; j < t.M; ++j) {
    const T v = g[j];
    T out = T(0);
    if (j != row.self) {
      if (row.is_pos(j)) {
        if (j != row.drop && sel.positive(v, max_neg)) out = ms_pos_grad(v, alpha, base, lse_pos, w);
      } else if (sel.negative(v, min_pos)) {
        out = ms_neg_grad(v, beta, base, lse_neg, w);
      }
    }
    g[j] = out;
  }
}

#if FT_HAVE_AVX2_PATH
// Columns [0, M) in maximal runs that avoid `a` and `b` (either may be -1): vec(begin, end) on the
// multiple-of-8 part of each run, scalar(j) on its remainder. The skipped columns are the caller's.
template <typename Vec, typename Scalar>
FT_ALWAYS_INLINE void for_runs(int64_t M, int64_t a, int64_t b, Vec&& vec, Scalar&& scalar) {
  int64_t cuts[2];
  int n = 0;
  if (a >= 0 && a < M) cuts[n++] = a;
  if (b >= 0 && b < M && b != a) cuts[n++] = b;
  if (n == 2 && cuts[0] > cuts[1]) std::swap(cuts[0], cuts[1]);
  int64_t begin = 0;
  for (int k = 0; k <= n; ++k) {
    const int64_t end = k < n ? cuts[k] : M;
    const int64_t vend = begin + (end - begin) / 8 * 8;
    if (vend > begin) vec(begin, vend);
    for (int64_t j = vend; j < end; ++j) scalar(j);
    begin = end + 1;
  }
}

// log(1 + Σ exp(x)) from Σ exp(x − c), c >= 0 and >= every x; 0 for an empty set.
inline float log1p_from_shifted(float c, float sum, float count) {
  return count > 0 ? c + std::log(std::exp(-c) + sum) : 0.0f;
}

FT_TARGET_AVX2 void ms_forward_row_avx2(const TilePointers<float>& t, int64_t r) {
  const Row<float> row(t, r);
  const Params& P = t.params;
  const float alpha = float(P.alpha), beta = float(P.beta), base = float(P.base), eps = float(P.epsilon);
  const bool mine = P.mine;
  const int64_t* ref = t.ref_labels;
  const int64_t label = row.label;
  const float* s = row.s;
  // Thresholds over every column but the self pair (the dropped slot counts, as in PML).
  float min_pos = std::numeric_limits<float>::infinity(), max_neg = -min_pos;
  for_runs(t.M, row.self, -1,
           [&](int64_t b, int64_t e) { simd::thresholds8(s, ref, label, b, e, min_pos, max_neg); },
           [&](int64_t j) {
             if (ref[j] == label) min_pos = std::min(min_pos, s[j]);
             else max_neg = std::max(max_neg, s[j]);
           });
  // The largest exponent of each side comes from its threshold (the hardest pair is mined whenever
  // any is): shift by it, so every term is <= 1 and the loop needs no running max.
  const float c_pos = std::isfinite(min_pos) ? std::max(-alpha * (min_pos - base), 0.0f) : 0.0f;
  const float c_neg = std::isfinite(max_neg) ? std::max(beta * (max_neg - base), 0.0f) : 0.0f;
  simd::Sums sums;
  auto scalar = [&](int64_t j) {
    const float v = s[j];
    if (ref[j] == label) {
      if (!mine || ms_keep_positive(v, eps, max_neg)) {
        sums.pos += std::exp(ms_pos_exponent(v, alpha, base) - c_pos);
        sums.n_pos += 1;
      }
    } else if (!mine || ms_keep_negative(v, eps, min_pos)) {
      sums.neg += std::exp(ms_neg_exponent(v, beta, base) - c_neg);
      sums.n_neg += 1;
    }
  };
  for_runs(t.M, row.self, row.drop,
           [&](int64_t b, int64_t e) {
             simd::exp_sums8(s, ref, label, b, e, mine, eps, min_pos, max_neg, alpha, beta, base, c_pos, c_neg,
                             sums);
           },
           scalar);
  // The dropped slot leaves the positives only.
  if (row.drop >= 0 && row.drop < t.M && row.drop != row.self && ref[row.drop] != label) scalar(row.drop);
  float* st = t.stats + r * kStatCount;
  st[kMinPos] = min_pos;
  st[kMaxNeg] = max_neg;
  st[kLsePos] = log1p_from_shifted(c_pos, sums.pos, sums.n_pos);
  st[kLseNeg] = log1p_from_shifted(c_neg, sums.neg, sums.n_neg);
  st[kNumPos] = sums.n_pos;
  st[kNumNeg] = sums.n_neg;
}

FT_TARGET_AVX2 void ms_backward_row_avx2(const TilePointers<float>& t, int64_t r) {
  const Row<float> row(t, r);
  const Params& P = t.params;
  const float alpha = float(P.alpha), beta = float(P.beta), base = float(P.base), eps = float(P.epsilon);
  const bool mine = P.mine;
  const float* st = t.stats + r * kStatCount;
  const float min_pos = st[kMinPos], max_neg = st[kMaxNeg], lse_pos = st[kLsePos], lse_neg = st[kLseNeg];
  const float w = t.coef[0];
  const int64_t* ref = t.ref_labels;
  float* g = row.s;
  auto scalar = [&](int64_t j, bool dropped) {
    const float v = g[j];
    float out = 0.0f;
    if (ref[j] == row.label) {
      if (!dropped && (!mine || ms_keep_positive(v, eps, max_neg))) out = ms_pos_grad(v, alpha, base, lse_pos, w);
    } else if (!mine || ms_keep_negative(v, eps, min_pos)) {
      out = ms_neg_grad(v, beta, base, lse_neg, w);
    }
    g[j] = out;
  };
  for_runs(t.M, row.self, row.drop,
           [&](int64_t b, int64_t e) {
             simd::grad8(g, ref, row.label, b, e, mine, eps, min_pos, max_neg, alpha, beta, base, lse_pos, lse_neg, w);
           },
           [&](int64_t j) { scalar(j, false); });
  if (row.drop >= 0 && row.drop < t.M && row.drop != row.self) scalar(row.drop, true);
  if (row.self >= 0 && row.self < t.M) g[row.self] = 0.0f;
}
#endif

template <typename T>
void tcm_forward_row(const TilePointers<T>& t, int64_t r) {
  const Row<T> row(t, r);
  const T mp = T(t.params.margin_plus), mm = T(t.params.margin_minus);
  T sp = 0, sn = 0;
  int64_t np = 0, nn = 0;
  for_columns(t.M, row.self, [&](int64_t j) {
    const T v = row.s[j];
    if (row.is_pos(j)) {
      if (tcm_pos_active(v, mp)) { sp += mp - v; ++np; }
    } else if (tcm_neg_active(v, mm)) {
      sn += v - mm;
      ++nn;
    }
  });
  T* st = t.stats + r * kStatCount;
  st[kTcmSumPos] = sp;
  st[kTcmNumPos] = T(np);
  st[kTcmSumNeg] = sn;
  st[kTcmNumNeg] = T(nn);
  st[4] = st[5] = T(0);
}

template <typename T>
void tcm_backward_row(const TilePointers<T>& t, int64_t r) {
  const Row<T> row(t, r);
  const T mp = T(t.params.margin_plus), mm = T(t.params.margin_minus);
  const T gp = t.coef[0], gn = t.coef[1];
  T* g = row.s;
  for (int64_t j = 0; j < t.M; ++j) {
    const T v = g[j];
    T out = T(0);
    if (j != row.self) {
      if (row.is_pos(j)) out = tcm_pos_active(v, mp) ? gp : T(0);
      else out = tcm_neg_active(v, mm) ? gn : T(0);
    }
    g[j] = out;
  }
}

// Count pass (write == false): thresholds into stats, numbers of mined pairs into counts.
// Write pass: the same predicates, indices written from the row's exclusive offsets.
template <typename T>
void mine_row(const TilePointers<T>& t, int64_t r, bool write) {
  const Row<T> row(t, r);
  const Selector<T> sel(t.params, t.params.rule, /*mine=*/true);
  T* st = t.stats + r * kStatCount;
  T min_pos = std::numeric_limits<T>::infinity(), max_neg = -std::numeric_limits<T>::infinity();
  if (sel.needs_thresholds()) {
    if (write) {
      min_pos = st[kMinPos];
      max_neg = st[kMaxNeg];
    } else {
      row.thresholds(min_pos, max_neg);
      st[kMinPos] = min_pos;
      st[kMaxNeg] = max_neg;
    }
  }
  int64_t np = 0, nn = 0;
  const int64_t anchor = t.row0 + r;
  const int64_t pos0 = write ? t.counts[2 * r] : 0, neg0 = write ? t.counts[2 * r + 1] : 0;
  for_columns(t.M, row.self, [&](int64_t j) {
    const T v = row.s[j];
    if (row.is_pos(j)) {
      if (sel.positive(v, max_neg)) {
        if (write) {
          t.a1[pos0 + np] = anchor;
          t.p[pos0 + np] = j;
        }
        ++np;
      }
    } else if (sel.negative(v, min_pos)) {
      if (write) {
        t.a2[neg0 + nn] = anchor;
        t.n[neg0 + nn] = j;
      }
      ++nn;
    }
  });
  if (!write) {
    t.counts[2 * r] = np;
    t.counts[2 * r + 1] = nn;
  }
}

template <typename T>
void batch_hard_row(const TilePointers<T>& t, int64_t r) {
  const Row<T> row(t, r);
  T best_p = std::numeric_limits<T>::infinity(), best_n = -std::numeric_limits<T>::infinity();
  int64_t jp = -1, jn = -1;
  for_columns(t.M, row.self, [&](int64_t j) {
    const T v = row.s[j];
    if (row.is_pos(j)) {
      if (harder_positive(v, j, best_p, jp)) { best_p = v; jp = j; }
    } else if (harder_negative(v, j, best_n, jn)) {
      best_n = v;
      jn = j;
    }
  });
  t.hard[2 * r] = jp;
  t.hard[2 * r + 1] = jn;
}

template <typename T>
void run_rows(const TileLaunch& L) {
  const TilePointers<T> t = tile_pointers<T>(L);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(t.M, 1));
  bool simd = false;
#if FT_HAVE_AVX2_PATH
  simd = std::is_same_v<T, float> && cpu::cpu_has_avx2();
#endif
  (void)simd;
  at::parallel_for(0, t.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
#if FT_HAVE_AVX2_PATH
      if constexpr (std::is_same_v<T, float>) {
        if (simd && (t.pass == kMsForward || t.pass == kMsBackward || t.pass == kMsForwardBackward)) {
          if (t.pass != kMsBackward) ms_forward_row_avx2(t, r);
          if (t.pass != kMsForward) ms_backward_row_avx2(t, r);
          continue;
        }
      }
#endif
      switch (t.pass) {
        case kMsForward: ms_forward_row(t, r); break;
        case kMsBackward: ms_backward_row(t, r); break;
        case kMsForwardBackward:
          ms_forward_row(t, r);
          ms_backward_row(t, r);
          break;
        case kTcmForward: tcm_forward_row(t, r); break;
        case kTcmBackward: tcm_backward_row(t, r); break;
        case kMineCount: mine_row(t, r, false); break;
        case kMineWrite: mine_row(t, r, true); break;
        case kBatchHard: batch_hard_row(t, r); break;
        default: break;
      }
    }
  });
}

void tile_kernel_cpu(const TileLaunch& L) {
  AT_DISPATCH_FLOATING_TYPES(L.S.scalar_type(), "mining_tile_cpu", [&] { run_rows<scalar_t>(L); });
}

}  // namespace

constexpr Kernels kCpuKernels{tile_kernel_cpu};

}  // namespace mining
}  // namespace fusedtrain

FT_REGISTER_BACKEND(CPU, fusedtrain::mining::kCpuKernels)
