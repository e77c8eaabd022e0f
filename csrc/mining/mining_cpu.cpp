// CPU tile kernels of the mining family: the rows of a tile of S in parallel, each row's passes
// back to back while it is in cache (thresholds, then the mined pairs' log-sum-exps, counts, indices
// or gradient). The tiles themselves come from at::mm in the driver (mining.cpp).
#include "mining.h"
#include "../common/dispatch.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

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
  at::parallel_for(0, t.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      switch (t.pass) {
        case kMsForward: ms_forward_row(t, r); break;
        case kMsBackward: ms_backward_row(t, r); break;
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
}  // namespace mining
}  // namespace fusedtrain

TORCH_LIBRARY_IMPL(fusedtrain, CPU, m) {
  FUSEDTRAIN_MINING_IMPL(m, &fusedtrain::mining::tile_kernel_cpu);
}
