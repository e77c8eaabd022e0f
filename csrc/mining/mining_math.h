// Per-pair and per-row math of the similarity-mining family (spec/mining.md), shared by the CPU and
// CUDA tile kernels so the CPU tests cover the very formulas the GPU runs.
//
// Every op works on tiles of S = Ê·R̂ᵀ (rows of the batch against all reference columns). A column j
// relates to anchor i as a positive (same label), a negative (different label) or not at all (the
// anchor's own row when the reference set is the batch itself).
#pragma once

#include "../common/math.h"

#include <cmath>
#include <cstdint>
#include <limits>

namespace fusedtrain {
namespace mining {

// What a tile kernel does with its rows.
enum Pass : int {
  kMsForward = 0,   // Multi-Similarity: thresholds, then the two log-sum-exps of the mined pairs
  kMsBackward = 1,  // overwrite the tile with dL/dS from the saved row statistics
  kTcmForward = 2,  // TCM: per-row sums and counts of the active pairs
  kTcmBackward = 3, // overwrite the tile with dL/dS
  kMineCount = 4,   // mining: per-row numbers of mined positives and negatives (and thresholds)
  kMineWrite = 5,   // mining: write the mined pairs' indices at the counted offsets
  kBatchHard = 6,   // batch-hard: hardest positive and negative per row (or -1)
  kMsForwardBackward = 7,  // kMsForward, then kMsBackward on the same rows while they are in cache
};

enum Rule : int { kRuleMultiSimilarity = 0, kRulePairMargin = 1 };

// Per-row statistics saved by the forward passes (accumulate type, kStatCount per row).
// Multi-Similarity: thresholds, log(1 + Σ exp) of each side, mined pair counts.
enum MsStat : int { kMinPos = 0, kMaxNeg = 1, kLsePos = 2, kLseNeg = 3, kNumPos = 4, kNumNeg = 5 };
// TCM: Σ(m⁺ − s) and count over positives with s <= m⁺; Σ(s − m⁻) and count over negatives s >= m⁻.
enum TcmStat : int { kTcmSumPos = 0, kTcmNumPos = 1, kTcmSumNeg = 2, kTcmNumNeg = 3 };
constexpr int kStatCount = 6;

struct Params {
  // Multi-Similarity loss and miner.
  double alpha = 2.0, beta = 50.0, base = 0.5, epsilon = 0.1;
  bool mine = true;
  // Index mining: which rule; pair-margin margins.
  int rule = kRuleMultiSimilarity;
  double pos_margin = 0.2, neg_margin = 0.8;
  // Threshold-consistent margin regularizer.
  double lambda_plus = 1.0, lambda_minus = 1.0, margin_plus = 0.9, margin_minus = 0.5;
};

enum Relation : int { kNone = 0, kPositive = 1, kNegative = 2 };

// Column j for anchor i: excluded when it is the anchor itself (in-batch reference), else positive
// or negative by label.
FT_HOST_DEVICE inline int relation(int64_t label_i, int64_t label_j, bool is_self) {
  if (is_self) return kNone;
  return label_i == label_j ? kPositive : kNegative;
}

// Multi-Similarity mining predicates (PML MultiSimilarityMiner with cosine similarity): strict
// comparisons against the row's hardest opposite pair, S ± ε evaluated in the working precision
// first, as PML does. With no positives min_pos is +inf (no negative is kept); with no negatives
// max_neg is -inf (no positive is kept). A NaN similarity (from a NaN or infinite embedding) is
// always kept, written as the negated opposite comparison: it then reaches the loss's log-sum-exp
// and makes the loss NaN, where a false comparison would drop it and leave a finite loss.
// The thresholds themselves skip NaN (min/max keep their running value).
template <typename T>
FT_HOST_DEVICE inline bool ms_keep_negative(T s, T epsilon, T min_pos) {
  const T shifted = s + epsilon;
  return !(shifted <= min_pos);
}
template <typename T>
FT_HOST_DEVICE inline bool ms_keep_positive(T s, T epsilon, T max_neg) {
  const T shifted = s - epsilon;
  return !(shifted >= max_neg);
}

// Pair-margin predicates (PML PairMarginMiner with a similarity): strict.
template <typename T>
FT_HOST_DEVICE inline bool margin_keep_positive(T s, T pos_margin) { return s < pos_margin; }
template <typename T>
FT_HOST_DEVICE inline bool margin_keep_negative(T s, T neg_margin) { return s > neg_margin; }

// Multi-Similarity exponents: x⁺ = −α(S − λ) for positives, x⁻ = β(S − λ) for negatives.
template <typename T>
FT_HOST_DEVICE inline T ms_pos_exponent(T s, T alpha, T base) { return -alpha * (s - base); }
template <typename T>
FT_HOST_DEVICE inline T ms_neg_exponent(T s, T beta, T base) { return beta * (s - base); }

// Streaming log-sum-exp of a set of exponents (max and the sum of exp(x − max)); two partial states
// merge, so threads of a block can each hold one. `log1p_value` is log(1 + Σ exp(x)), the loss's
// form with the "+1" term, and 0 for an empty set.
template <typename T>
struct Lse {
  T max = -std::numeric_limits<T>::infinity();
  T sum = T(0);

  FT_HOST_DEVICE inline void add(T x) {
    using std::exp;
    if (x > max) {
      sum = sum * exp(max - x) + T(1);  // exp(-inf) = 0 on the first element
      max = x;
    } else {
      sum += exp(x - max);
    }
  }

  FT_HOST_DEVICE inline void merge(const Lse& o) {
    using std::exp;
    if (o.sum == T(0)) return;
    if (sum == T(0)) { *this = o; return; }
    if (o.max > max) {
      sum = sum * exp(max - o.max) + o.sum;
      max = o.max;
    } else {
      sum += o.sum * exp(o.max - max);
    }
  }

  FT_HOST_DEVICE inline T log1p_value() const {
    using std::exp; using std::log;
    if (sum == T(0)) return T(0);
    const T top = max > T(0) ? max : T(0);
    return top + log(sum * exp(max - top) + exp(-top));
  }
};

// Row loss from the two log(1 + Σ exp) values.
template <typename T>
FT_HOST_DEVICE inline T ms_row_loss(T lse_pos, T lse_neg, T alpha, T beta) {
  return lse_pos / alpha + lse_neg / beta;
}

// dL/dS of one mined pair: −w·exp(x⁺ − lse⁺) for a positive, w·exp(x⁻ − lse⁻) for a negative,
// w = upstream / B.
template <typename T>
FT_HOST_DEVICE inline T ms_pos_grad(T s, T alpha, T base, T lse_pos, T w) {
  using std::exp;
  return -w * exp(ms_pos_exponent(s, alpha, base) - lse_pos);
}
template <typename T>
FT_HOST_DEVICE inline T ms_neg_grad(T s, T beta, T base, T lse_neg, T w) {
  using std::exp;
  return w * exp(ms_neg_exponent(s, beta, base) - lse_neg);
}

// TCM: active pairs (inclusive comparisons, as PML). A NaN similarity is active (negated strict
// comparison), so it reaches the sums and the loss is NaN rather than finite.
template <typename T>
FT_HOST_DEVICE inline bool tcm_pos_active(T s, T margin_plus) { return !(s > margin_plus); }
template <typename T>
FT_HOST_DEVICE inline bool tcm_neg_active(T s, T margin_minus) { return !(s < margin_minus); }

// Batch-hard: strict improvement keeps the first index on ties (torch.min/max's rule when the
// columns are visited in increasing order).
template <typename T>
FT_HOST_DEVICE inline bool harder_positive(T s, int64_t j, T best, int64_t best_j) {
  return s < best || (s == best && best_j >= 0 && j < best_j) || best_j < 0;
}
template <typename T>
FT_HOST_DEVICE inline bool harder_negative(T s, int64_t j, T best, int64_t best_j) {
  return s > best || (s == best && best_j >= 0 && j < best_j) || best_j < 0;
}


// Which positives and negatives of a row a pass keeps: the Multi-Similarity rule (against the row's
// thresholds), the pair-margin rule, or every pair (the loss without mining).
template <typename T>
struct Selector {
  int rule;
  bool mine;
  T epsilon, pos_margin, neg_margin;

  FT_HOST_DEVICE Selector(const Params& p, int rule_, bool mine_)
      : rule(rule_), mine(mine_), epsilon(T(p.epsilon)), pos_margin(T(p.pos_margin)),
        neg_margin(T(p.neg_margin)) {}

  // Whether the rule needs the row's thresholds (a first pass over the row).
  FT_HOST_DEVICE bool needs_thresholds() const { return mine && rule == kRuleMultiSimilarity; }

  FT_HOST_DEVICE bool positive(T s, T max_neg) const {
    if (!mine) return true;
    return rule == kRulePairMargin ? margin_keep_positive(s, pos_margin)
                                   : ms_keep_positive(s, epsilon, max_neg);
  }
  FT_HOST_DEVICE bool negative(T s, T min_pos) const {
    if (!mine) return true;
    return rule == kRulePairMargin ? margin_keep_negative(s, neg_margin)
                                   : ms_keep_negative(s, epsilon, min_pos);
  }
};

}  // namespace mining
}  // namespace fusedtrain
