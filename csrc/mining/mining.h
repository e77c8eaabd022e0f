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

namespace torch {
class Library;
}

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

// What each backend supplies (common/backend.h).
struct Kernels {
  // The per-row work of one tile for L.pass, in place on L.S and the per-row outputs.
  void (*tile)(const TileLaunch& L);
  static void impl_ops(torch::Library& m);  // mining.cpp
};

}  // namespace mining
}  // namespace fusedtrain
