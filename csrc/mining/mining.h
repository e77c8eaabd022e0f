// The mining family's device-independent driver (argument checks, normalization, row-chunk loop with
// one at::mm per tile, reductions of the per-row results) and the interface of the backends' tile
// kernels. A tile is `rows` rows of S = Ê·R̂ᵀ against all M reference columns, at most kTileElems
// elements: the B×M matrix is never held.
#pragma once

#include "mining_math.h"

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fusedtrain {
namespace mining {

// Elements of one tile of S when overridden (tests, tuning), 0 for the device defaults (mining.cpp).
int64_t tile_elements();
void set_tile_elements(int64_t elements);

// One launch of a backend's tile kernel.
struct TileLaunch {
  int pass = kMsForward;
  at::Tensor S;           // (rows, M) contiguous, accumulate dtype; backward passes overwrite it
  int64_t row0 = 0;       // global index of the tile's first row
  at::Tensor labels;      // (B,) int64 contiguous
  at::Tensor ref_labels;  // (M,) int64 contiguous
  at::Tensor self_index;  // (B,) int64 or undefined: column dropped from the loss after mining
  bool in_batch = false;  // reference is the batch itself: column row0 + r is row r's self pair
  Params params;
  at::Tensor stats;       // (rows, kStatCount) accumulate dtype, this tile's rows
  at::Tensor coef;        // backward: (2,) accumulate dtype, dL/dS scale of positives, negatives
  at::Tensor counts;      // mining: (rows, 2) int64 counts (count pass) / exclusive offsets (write)
  at::Tensor out_a1, out_p, out_a2, out_n;  // mining write pass: this tile's int64 outputs
  at::Tensor hard;        // batch-hard: (rows, 2) int64 hardest positive, negative column or -1
};

// The launch as raw pointers, the form both backends' row loops take.
template <typename T>
struct TilePointers {
  int pass = 0;
  T* S = nullptr;
  int64_t rows = 0, M = 0, row0 = 0;
  const int64_t* labels = nullptr;
  const int64_t* ref_labels = nullptr;
  const int64_t* self_index = nullptr;
  bool in_batch = false;
  Params params{};
  T* stats = nullptr;
  const T* coef = nullptr;
  int64_t* counts = nullptr;
  int64_t *a1 = nullptr, *p = nullptr, *a2 = nullptr, *n = nullptr;
  int64_t* hard = nullptr;

  // Column excluded from everything for row r (the self pair of an in-batch reference), or -1.
  FT_HOST_DEVICE inline int64_t self_column(int64_t r) const { return in_batch ? row0 + r : -1; }
  // Column dropped from the loss's positives after mining (cross-batch memory), or -1.
  FT_HOST_DEVICE inline int64_t dropped_column(int64_t r) const {
    return self_index ? self_index[row0 + r] : -1;
  }
};

template <typename T>
TilePointers<T> tile_pointers(const TileLaunch& L) {
  TilePointers<T> t;
  t.pass = L.pass;
  t.S = L.S.data_ptr<T>();
  t.rows = L.S.size(0);
  t.M = L.S.size(1);
  t.row0 = L.row0;
  t.labels = L.labels.data_ptr<int64_t>();
  t.ref_labels = L.ref_labels.data_ptr<int64_t>();
  t.self_index = L.self_index.defined() ? L.self_index.data_ptr<int64_t>() : nullptr;
  t.in_batch = L.in_batch;
  t.params = L.params;
  if (L.stats.defined()) t.stats = L.stats.data_ptr<T>();
  if (L.coef.defined()) t.coef = L.coef.data_ptr<T>();
  if (L.counts.defined()) t.counts = L.counts.data_ptr<int64_t>();
  if (L.out_a1.defined()) {
    t.a1 = L.out_a1.data_ptr<int64_t>();
    t.p = L.out_p.data_ptr<int64_t>();
    t.a2 = L.out_a2.data_ptr<int64_t>();
    t.n = L.out_n.data_ptr<int64_t>();
  }
  if (L.hard.defined()) t.hard = L.hard.data_ptr<int64_t>();
  return t;
}

using TileKernel = void (*)(const TileLaunch&);

// The ops, given the backend's tile kernel. Optional tensors are undefined when absent.
// compute_grad: also the gradients for an upstream gradient of 1 (to ref_emb when ref_grad), from
// the forward's own tiles; otherwise the two gradient outputs are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_loss_forward(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const at::Tensor& self_index, const Params& params, bool compute_grad,
    bool ref_grad, TileKernel kernel);

std::tuple<at::Tensor, at::Tensor> ms_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& embeddings, const at::Tensor& labels,
    const at::Tensor& ref_emb, const at::Tensor& ref_labels, const at::Tensor& self_index,
    const at::Tensor& stats, const Params& params, bool ref_grad, TileKernel kernel);

std::tuple<at::Tensor, at::Tensor> tcm_forward(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const Params& params, TileKernel kernel);

std::tuple<at::Tensor, at::Tensor> tcm_backward(
    const at::Tensor& grad_loss, const at::Tensor& embeddings, const at::Tensor& labels,
    const at::Tensor& ref_emb, const at::Tensor& ref_labels, const at::Tensor& stats,
    const Params& params, bool ref_grad, TileKernel kernel);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mine_pairs(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const Params& params, TileKernel kernel);

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_hard(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, TileKernel kernel);


Params ms_params(double alpha, double beta, double base, double epsilon, bool mine);
Params mine_params(c10::string_view rule, double epsilon, double pos_margin, double neg_margin);
Params tcm_params(double lambda_plus, double lambda_minus, double margin_plus, double margin_minus);

// The registered ops of one backend: `Entry<its tile kernel>::op` has the schema's signature.
template <TileKernel kKernel>
struct Entry {
  using Opt = std::optional<at::Tensor>;
  static at::Tensor get(const Opt& t) { return t.has_value() ? *t : at::Tensor(); }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_loss(
      const at::Tensor& e, const at::Tensor& l, const Opt& re, const Opt& rl, const Opt& si, double alpha,
      double beta, double base, double epsilon, bool mine, bool compute_grad, bool ref_grad) {
    return ms_loss_forward(e, l, get(re), get(rl), get(si), ms_params(alpha, beta, base, epsilon, mine),
                           compute_grad, ref_grad, kKernel);
  }
  static std::tuple<at::Tensor, at::Tensor> ms_loss_backward_op(
      const at::Tensor& g, const at::Tensor& e, const at::Tensor& l, const Opt& re, const Opt& rl,
      const Opt& si, const at::Tensor& stats, double alpha, double beta, double base, double epsilon,
      bool mine, bool ref_grad) {
    return ms_loss_backward(g, e, l, get(re), get(rl), get(si), stats,
                            ms_params(alpha, beta, base, epsilon, mine), ref_grad, kKernel);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mine(
      const at::Tensor& e, const at::Tensor& l, const Opt& re, const Opt& rl, c10::string_view rule,
      double epsilon, double pos_margin, double neg_margin) {
    return mine_pairs(e, l, get(re), get(rl), mine_params(rule, epsilon, pos_margin, neg_margin), kKernel);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> hard(const at::Tensor& e, const at::Tensor& l,
                                                             const Opt& re, const Opt& rl) {
    return batch_hard(e, l, get(re), get(rl), kKernel);
  }
  static std::tuple<at::Tensor, at::Tensor> tcm(const at::Tensor& e, const at::Tensor& l, const Opt& re,
                                                const Opt& rl, double lp, double lm, double mp,
                                                double mm) {
    return tcm_forward(e, l, get(re), get(rl), tcm_params(lp, lm, mp, mm), kKernel);
  }
  static std::tuple<at::Tensor, at::Tensor> tcm_backward_op(
      const at::Tensor& g, const at::Tensor& e, const at::Tensor& l, const Opt& re, const Opt& rl,
      const at::Tensor& stats, double lp, double lm, double mp, double mm, bool ref_grad) {
    return tcm_backward(g, e, l, get(re), get(rl), stats, tcm_params(lp, lm, mp, mm), ref_grad, kKernel);
  }
};

// m.impl of every op for one backend.
#define FUSEDTRAIN_MINING_IMPL(m, KERNEL)                                                          \
  do {                                                                                             \
    using E = ::fusedtrain::mining::Entry<KERNEL>;                                                 \
    m.impl("multi_similarity_loss", &E::ms_loss);                                                  \
    m.impl("_multi_similarity_loss_backward", &E::ms_loss_backward_op);                            \
    m.impl("mine_pairs", &E::mine);                                                                \
    m.impl("batch_hard_mine", &E::hard);                                                           \
    m.impl("tcm_loss", &E::tcm);                                                                   \
    m.impl("_tcm_loss_backward", &E::tcm_backward_op);                                             \
  } while (0)

}  // namespace mining
}  // namespace fusedtrain
