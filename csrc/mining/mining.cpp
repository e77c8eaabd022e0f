// Schemas of the mining ops and their device-independent driver. Every op walks the batch in row
// chunks: one at::mm gives a tile of S = Ê·R̂ᵀ (bounded rows × all M columns), then the backend's
// tile kernel reduces it per row. Backward recomputes each tile, turns it into dL/dS in place and
// multiplies it back (two more at::mm). Extra memory: the normalized copies (O((B + M)·d)), one
// tile, and O(B) per-row statistics. Everything a user can get wrong is checked here, once.
#include "mining.h"

#include "../common/backend.h"
#include "../common/checks.h"
#include "../common/dispatch.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace fusedtrain {
namespace mining {

namespace {
// Tile sizes: big enough for efficient GEMMs, small next to PML's B×M. CPU: 8 MiB of fp32 (>= 256
// rows up to M = 8192). CUDA: 16 MiB, and at least 128 rows (blocks of row work per tile) however
// long the rows, so the row kernels fill the GPU.
constexpr int64_t kCpuTileElements = int64_t(1) << 21;
constexpr int64_t kCudaTileElements = int64_t(1) << 22;
constexpr int64_t kCudaMinRows = 128;
std::atomic<int64_t> g_tile_elements{0};  // 0: the device defaults above
constexpr double kNormEps = 1e-12;  // F.normalize's default
}  // namespace

int64_t tile_elements() { return g_tile_elements.load(); }
void set_tile_elements(int64_t elements) { g_tile_elements.store(std::max<int64_t>(0, elements)); }

namespace {

using TileKernel = void (*)(const TileLaunch&);

void check_params(const Params& p) {
  check_finite(p.alpha, "alpha");
  check_finite(p.beta, "beta");
  check_finite(p.base, "base");
  check_finite(p.epsilon, "epsilon");
  FT_CHECK_VALUE(p.alpha > 0, "alpha must be > 0, got ", p.alpha);
  FT_CHECK_VALUE(p.beta > 0, "beta must be > 0, got ", p.beta);
}

void check_tcm_params(const Params& p) {
  check_finite(p.lambda_plus, "lambda_plus");
  check_finite(p.lambda_minus, "lambda_minus");
  check_finite(p.margin_plus, "margin_plus");
  check_finite(p.margin_minus, "margin_minus");
}

// The operands every op shares: inputs in the accumulate dtype, their clamped norms, the normalized
// rows. In-batch (no ref_emb) the reference is the batch itself and r_* alias q_*.
struct Operands {
  at::Tensor x, x_norm_raw, x_norm, q_hat;
  at::Tensor r, r_norm_raw, r_norm, r_hat;
  at::Tensor labels, ref_labels, self_index;
  bool in_batch = true;
  int64_t B = 0, M = 0, d = 0;
  at::ScalarType dtype = at::kFloat, acc = at::kFloat;
};

void normalize_rows(const at::Tensor& x, at::Tensor& raw, at::Tensor& clamped, at::Tensor& hat) {
  // F.normalize(x, dim=1): x / max(‖x‖, 1e-12), the same ATen ops so the values match PML's.
  raw = at::linalg_vector_norm(x, 2, c10::IntArrayRef{1}, /*keepdim=*/true);
  // ATen sums unscaled squares: a finite row beyond ~1e19 (fp32) gets ‖x‖ = inf and normalizes to
  // a plausible 0. Such rows take the norm in units of their largest |x| (as BLAS nrm2 does). The
  // CPU looks first (B values, no sync there); CUDA always computes it (O(B·d), no host sync).
  if (x.is_cuda() || raw.isinf().any().item<bool>()) {
    const int64_t dim[] = {1};
    const at::Tensor top = at::linalg_vector_norm(x, std::numeric_limits<double>::infinity(), dim, true);
    const at::Tensor scaled = at::linalg_vector_norm(x / top, 2, dim, /*keepdim=*/true).mul_(top);
    raw = at::where(raw.isinf().logical_and_(top.isfinite()), scaled, raw);
  }
  clamped = raw.clamp_min(kNormEps);
  hat = x / clamped;
}

Operands prepare(const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
                 const at::Tensor& ref_labels, const at::Tensor& self_index) {
  check_defined(embeddings, "embeddings");
  check_defined(labels, "labels");
  check_floating(embeddings, "embeddings");
  check_dim(embeddings, 2, "embeddings");
  check_dtype(labels, at::kLong, "labels");
  FT_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == embeddings.size(0), "labels must have shape (",
                 embeddings.size(0), ",) for embeddings of shape ", embeddings.sizes(), ", got ",
                 labels.sizes());
  check_same_device(labels, embeddings, "labels", "embeddings");
  FT_CHECK_VALUE(ref_emb.defined() == ref_labels.defined(),
                 "ref_emb and ref_labels must be given together (or both omitted)");
  Operands o;
  o.B = embeddings.size(0);
  o.d = embeddings.size(1);
  o.dtype = embeddings.scalar_type();
  o.acc = accumulate_type(o.dtype);
  o.in_batch = !ref_emb.defined();
  o.x = embeddings.to(o.acc).contiguous();
  normalize_rows(o.x, o.x_norm_raw, o.x_norm, o.q_hat);
  o.labels = labels.contiguous();
  if (o.in_batch) {
    o.M = o.B;
    o.r = o.x;
    o.r_norm_raw = o.x_norm_raw;
    o.r_norm = o.x_norm;
    o.r_hat = o.q_hat;
    o.ref_labels = o.labels;
  } else {
    check_floating(ref_emb, "ref_emb");
    check_dim(ref_emb, 2, "ref_emb");
    FT_CHECK_VALUE(ref_emb.size(1) == o.d, "ref_emb must have ", o.d,
                   " columns like embeddings, got shape ", ref_emb.sizes());
    FT_CHECK_TYPE(ref_emb.scalar_type() == o.dtype, "ref_emb must have the dtype of embeddings (",
                  o.dtype, "), got ", ref_emb.scalar_type());
    check_same_device(ref_emb, embeddings, "ref_emb", "embeddings");
    check_dtype(ref_labels, at::kLong, "ref_labels");
    FT_CHECK_VALUE(ref_labels.dim() == 1 && ref_labels.size(0) == ref_emb.size(0),
                   "ref_labels must have shape (", ref_emb.size(0), ",) for ref_emb of shape ",
                   ref_emb.sizes(), ", got ", ref_labels.sizes());
    check_same_device(ref_labels, embeddings, "ref_labels", "embeddings");
    o.M = ref_emb.size(0);
    o.r = ref_emb.to(o.acc).contiguous();
    normalize_rows(o.r, o.r_norm_raw, o.r_norm, o.r_hat);
    o.ref_labels = ref_labels.contiguous();
  }
  if (self_index.defined()) {
    FT_CHECK_VALUE(!o.in_batch, "self_index needs ref_emb (it names each anchor's column in it)");
    check_dtype(self_index, at::kLong, "self_index");
    FT_CHECK_VALUE(self_index.dim() == 1 && self_index.size(0) == o.B, "self_index must have shape (",
                   o.B, ",), got ", self_index.sizes());
    check_same_device(self_index, embeddings, "self_index", "embeddings");
    // Only compared with column numbers, never used to address memory: any value is safe.
    o.self_index = self_index.contiguous();
  }
  return o;
}

int64_t chunk_rows(const Operands& o) {
  const int64_t set = tile_elements();
  const bool cuda = o.x.is_cuda();
  const int64_t elements = set > 0 ? set : (cuda ? kCudaTileElements : kCpuTileElements);
  int64_t rows = elements / std::max<int64_t>(o.M, 1);
  if (set == 0 && cuda) rows = std::max(rows, kCudaMinRows);
  return std::max<int64_t>(1, std::min<int64_t>(o.B, rows));
}

TileLaunch base_launch(const Operands& o, int pass, const Params& params) {
  TileLaunch L;
  L.pass = pass;
  L.labels = o.labels;
  L.ref_labels = o.ref_labels;
  L.self_index = o.self_index;
  L.in_batch = o.in_batch;
  L.params = params;
  return L;
}

// Walks the batch in chunks: fn(row0, rows, S) with S = Ê[row0:row0+rows]·R̂ᵀ in a reused buffer.
template <typename Fn>
void for_each_tile(const Operands& o, Fn&& fn) {
  if (o.B == 0) return;
  const int64_t R = chunk_rows(o);
  at::Tensor buffer = at::empty({R, o.M}, o.q_hat.options());
  const at::Tensor rt = o.r_hat.t();
  for (int64_t row0 = 0; row0 < o.B; row0 += R) {
    const int64_t rows = std::min(R, o.B - row0);
    at::Tensor S = buffer.narrow(0, 0, rows);
    at::mm_out(S, o.q_hat.narrow(0, row0, rows), rt);
    fn(row0, rows, S);
  }
}

// Gradient through x̂ = x / max(‖x‖, eps): (g − x̂ (x̂·g)) / ‖x‖ where ‖x‖ >= eps, else g / eps
// (torch's clamp passes the gradient where the value is >= the bound).
at::Tensor normalize_backward(at::Tensor g, const at::Tensor& hat, const at::Tensor& raw,
                              const at::Tensor& clamped) {
  const at::Tensor through = raw.ge(kNormEps).to(g.scalar_type());
  const at::Tensor proj = hat.unsqueeze(1).bmm(g.unsqueeze(2)).squeeze(2);  // x̂·g per row, no B×d temporary
  g.addcmul_(hat, proj * through, -1);
  return g.div_(clamped);
}

// Gradients from tiles of dL/dS: each tile's rows against the reference set, and (in-batch, or
// when ref_emb needs a gradient) the reference set against the tile's rows. In-batch, both
// products accumulate into one buffer.
struct GradientTiles {
  const Operands& o;
  bool want_r;
  at::Tensor grad_q, grad_r;

  GradientTiles(const Operands& ops, bool ref_grad) : o(ops), want_r(!ops.in_batch && ref_grad) {
    grad_q = o.in_batch ? at::zeros({o.B, o.d}, o.q_hat.options()) : at::empty({o.B, o.d}, o.q_hat.options());
    if (want_r) grad_r = at::zeros({o.M, o.d}, o.q_hat.options());
  }

  void add(int64_t row0, int64_t rows, const at::Tensor& G) {
    at::Tensor q_rows = o.q_hat.narrow(0, row0, rows);
    at::Tensor g_rows = grad_q.narrow(0, row0, rows);
    if (o.in_batch) {
      g_rows.addmm_(G, o.r_hat);     // as anchors
      grad_q.addmm_(G.t(), q_rows);  // as the reference
    } else {
      at::mm_out(g_rows, G, o.r_hat);
      if (want_r) grad_r.addmm_(G.t(), q_rows);
    }
  }

  // (grad embeddings, grad ref_emb or an empty tensor), through the normalization, in the inputs' dtype.
  std::tuple<at::Tensor, at::Tensor> finish() {
    at::Tensor grad_x = normalize_backward(grad_q, o.q_hat, o.x_norm_raw, o.x_norm).to(o.dtype);
    at::Tensor grad_ref = want_r ? normalize_backward(grad_r, o.r_hat, o.r_norm_raw, o.r_norm).to(o.dtype)
                                 : at::empty({0}, o.x.options().dtype(o.dtype));
    return {grad_x, grad_ref};
  }
};

// Backward of an op whose tiles the kernel turns into dL/dS (recomputing each tile of S first).
std::tuple<at::Tensor, at::Tensor> backward_through_tiles(const Operands& o, TileLaunch L,
                                                          const at::Tensor& stats, bool ref_grad,
                                                          TileKernel kernel) {
  GradientTiles grads(o, ref_grad);
  for_each_tile(o, [&](int64_t row0, int64_t rows, at::Tensor& S) {
    L.S = S;
    L.row0 = row0;
    L.stats = stats.narrow(0, row0, rows);
    kernel(L);  // S now holds dL/dS of these rows
    grads.add(row0, rows, S);
  });
  return grads.finish();
}

void check_stats(const at::Tensor& stats, const Operands& o) {
  FT_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == o.B && stats.size(1) == kStatCount &&
                     stats.scalar_type() == o.acc,
                 "row_stats must be the (B, 6) statistics saved by the forward, got shape ",
                 stats.sizes(), " and dtype ", stats.scalar_type());
  check_same_device(stats, o.x, "row_stats", "embeddings");
}

at::Tensor upstream_scalar(const at::Tensor& grad_loss, const Operands& o) {
  FT_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must hold one element, got shape ",
                 grad_loss.sizes());
  check_same_device(grad_loss, o.x, "grad_loss", "embeddings");
  return grad_loss.to(o.acc).reshape({1});
}


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_loss_forward(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const at::Tensor& self_index, const Params& params, bool compute_grad,
    bool ref_grad, TileKernel kernel) {
  check_params(params);
  const Operands o = prepare(embeddings, labels, ref_emb, ref_labels, self_index);
  at::Tensor stats = at::empty({o.B, kStatCount}, o.q_hat.options());
  // compute_grad: each tile also becomes dL/dS (for an upstream gradient of 1) right after its rows'
  // statistics, and goes into the gradients: backward then only scales them, and S is computed once.
  TileLaunch L = base_launch(o, compute_grad ? kMsForwardBackward : kMsForward, params);
  std::optional<GradientTiles> grads;
  if (compute_grad) {
    grads.emplace(o, ref_grad);
    const at::Tensor w = at::full({1}, 1.0 / static_cast<double>(std::max<int64_t>(o.B, 1)), o.q_hat.options());
    L.coef = at::cat({w, w}).contiguous();
  }
  for_each_tile(o, [&](int64_t row0, int64_t rows, at::Tensor& S) {
    L.S = S;
    L.row0 = row0;
    L.stats = stats.narrow(0, row0, rows);
    kernel(L);
    if (grads) grads->add(row0, rows, S);
  });
  // Mean over all B anchors (PML's MeanReducer); an empty batch gives 0.
  const at::Tensor row_loss =
      stats.select(1, kLsePos) / params.alpha + stats.select(1, kLseNeg) / params.beta;
  const at::Tensor loss = (row_loss.sum() / static_cast<double>(std::max<int64_t>(o.B, 1))).to(o.dtype);
  at::Tensor grad_x, grad_ref;
  if (grads) {
    std::tie(grad_x, grad_ref) = grads->finish();
  } else {
    grad_x = at::empty({0}, o.x.options().dtype(o.dtype));
    grad_ref = at::empty({0}, o.x.options().dtype(o.dtype));
  }
  return {loss, stats, grad_x, grad_ref};
}

std::tuple<at::Tensor, at::Tensor> ms_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& embeddings, const at::Tensor& labels,
    const at::Tensor& ref_emb, const at::Tensor& ref_labels, const at::Tensor& self_index,
    const at::Tensor& stats, const Params& params, bool ref_grad, TileKernel kernel) {
  check_params(params);
  const Operands o = prepare(embeddings, labels, ref_emb, ref_labels, self_index);
  check_stats(stats, o);
  // dL/dS scale of both sides: upstream / B.
  const at::Tensor w = upstream_scalar(grad_loss, o) / static_cast<double>(std::max<int64_t>(o.B, 1));
  TileLaunch L = base_launch(o, kMsBackward, params);
  L.coef = at::cat({w, w}).contiguous();
  return backward_through_tiles(o, L, stats.contiguous(), ref_grad, kernel);
}

std::tuple<at::Tensor, at::Tensor> tcm_forward(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const Params& params, TileKernel kernel) {
  check_tcm_params(params);
  const Operands o = prepare(embeddings, labels, ref_emb, ref_labels, at::Tensor());
  at::Tensor stats = at::empty({o.B, kStatCount}, o.q_hat.options());
  TileLaunch L = base_launch(o, kTcmForward, params);
  for_each_tile(o, [&](int64_t row0, int64_t rows, at::Tensor& S) {
    L.S = S;
    L.row0 = row0;
    L.stats = stats.narrow(0, row0, rows);
    kernel(L);
  });
  // λ⁺·mean(m⁺ − s over active positives) + λ⁻·mean(s − m⁻ over active negatives); a side with
  // no active pair contributes 0.
  const at::Tensor total = stats.sum(0);
  auto side = [&](int sum_col, int num_col, double lambda) {
    const at::Tensor num = total.select(0, num_col);
    return at::where(num.gt(0), total.select(0, sum_col) / num.clamp_min(1), at::zeros_like(num)) * lambda;
  };
  const at::Tensor loss = (side(kTcmSumPos, kTcmNumPos, params.lambda_plus) +
                           side(kTcmSumNeg, kTcmNumNeg, params.lambda_minus)).to(o.dtype);
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> tcm_backward(
    const at::Tensor& grad_loss, const at::Tensor& embeddings, const at::Tensor& labels,
    const at::Tensor& ref_emb, const at::Tensor& ref_labels, const at::Tensor& stats,
    const Params& params, bool ref_grad, TileKernel kernel) {
  check_tcm_params(params);
  const Operands o = prepare(embeddings, labels, ref_emb, ref_labels, at::Tensor());
  check_stats(stats, o);
  const at::Tensor g = upstream_scalar(grad_loss, o);
  const at::Tensor total = stats.sum(0);
  // dL/dS = −λ⁺/n⁺ on active positives, λ⁻/n⁻ on active negatives (n = the side's active count).
  const at::Tensor num_pos = total.select(0, kTcmNumPos).reshape({1}).clamp_min(1);
  const at::Tensor num_neg = total.select(0, kTcmNumNeg).reshape({1}).clamp_min(1);
  TileLaunch L = base_launch(o, kTcmBackward, params);
  L.coef = at::cat({g * (-params.lambda_plus) / num_pos, g * params.lambda_minus / num_neg}).contiguous();
  return backward_through_tiles(o, L, stats.contiguous(), ref_grad, kernel);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mine_pairs(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, const Params& params, TileKernel kernel) {
  check_finite(params.epsilon, "epsilon");
  check_finite(params.pos_margin, "pos_margin");
  check_finite(params.neg_margin, "neg_margin");
  const Operands o = prepare(embeddings, labels, ref_emb, ref_labels, at::Tensor());
  const auto long_opts = o.labels.options();
  std::vector<at::Tensor> a1s, ps, a2s, ns;
  const int64_t R = chunk_rows(o);
  at::Tensor stats = at::empty({R, kStatCount}, o.q_hat.options());
  at::Tensor counts = at::empty({R, 2}, long_opts);
  TileLaunch L = base_launch(o, kMineCount, params);
  for_each_tile(o, [&](int64_t row0, int64_t rows, at::Tensor& S) {
    // Count pass: thresholds and per-row numbers of mined pairs.
    L.pass = kMineCount;
    L.S = S;
    L.row0 = row0;
    L.stats = stats.narrow(0, 0, rows);
    L.counts = counts.narrow(0, 0, rows);
    kernel(L);
    const at::Tensor total = L.counts.sum(0).cpu();  // sizes the outputs (one sync per tile)
    const int64_t n_pos = total.data_ptr<int64_t>()[0], n_neg = total.data_ptr<int64_t>()[1];
    // Write pass: each row writes its pairs from its exclusive offset.
    L.pass = kMineWrite;
    L.counts = (L.counts.cumsum(0) - L.counts).contiguous();
    L.out_a1 = at::empty({n_pos}, long_opts);
    L.out_p = at::empty({n_pos}, long_opts);
    L.out_a2 = at::empty({n_neg}, long_opts);
    L.out_n = at::empty({n_neg}, long_opts);
    kernel(L);
    a1s.push_back(L.out_a1);
    ps.push_back(L.out_p);
    a2s.push_back(L.out_a2);
    ns.push_back(L.out_n);
  });
  auto join = [&](std::vector<at::Tensor>& parts) {
    if (parts.empty()) return at::empty({0}, long_opts);
    return parts.size() == 1 ? parts[0] : at::cat(parts);
  };
  return {join(a1s), join(ps), join(a2s), join(ns)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_hard(
    const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor& ref_emb,
    const at::Tensor& ref_labels, TileKernel kernel) {
  const Operands o = prepare(embeddings, labels, ref_emb, ref_labels, at::Tensor());
  at::Tensor hard = at::empty({o.B, 2}, o.labels.options());
  TileLaunch L = base_launch(o, kBatchHard, Params{});
  for_each_tile(o, [&](int64_t row0, int64_t rows, at::Tensor& S) {
    L.S = S;
    L.row0 = row0;
    L.hard = hard.narrow(0, row0, rows);
    kernel(L);
  });
  // Anchors lacking a positive or a negative are dropped.
  const at::Tensor keep = hard.select(1, 0).ge(0).logical_and(hard.select(1, 1).ge(0));
  const at::Tensor anchors = at::arange(o.B, o.labels.options()).masked_select(keep);
  return {anchors, hard.select(1, 0).masked_select(keep), hard.select(1, 1).masked_select(keep)};
}

int parse_rule(c10::string_view rule) {
  if (rule == "multi_similarity") return kRuleMultiSimilarity;
  if (rule == "pair_margin") return kRulePairMargin;
  FT_CHECK_VALUE(false, "rule must be 'multi_similarity' or 'pair_margin', got '", std::string(rule), "'");
  return -1;
}

Params ms_params(double alpha, double beta, double base, double epsilon, bool mine) {
  Params p;
  p.alpha = alpha;
  p.beta = beta;
  p.base = base;
  p.epsilon = epsilon;
  p.mine = mine;
  return p;
}

Params mine_params(c10::string_view rule, double epsilon, double pos_margin, double neg_margin) {
  Params p;
  p.rule = parse_rule(rule);
  p.epsilon = epsilon;
  p.pos_margin = pos_margin;
  p.neg_margin = neg_margin;
  return p;
}

Params tcm_params(double lambda_plus, double lambda_minus, double margin_plus, double margin_minus) {
  Params p;
  p.lambda_plus = lambda_plus;
  p.lambda_minus = lambda_minus;
  p.margin_plus = margin_plus;
  p.margin_minus = margin_minus;
  return p;
}


// ---- the registered ops (schema signatures) --------------------------------------------------

using Opt = std::optional<at::Tensor>;
at::Tensor get(const Opt& t) { return t.has_value() ? *t : at::Tensor(); }
TileKernel tile_kernel(const at::Tensor& embeddings) { return backend<Kernels>(embeddings).tile; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_loss_op(
    const at::Tensor& e, const at::Tensor& l, const Opt& re, const Opt& rl, const Opt& si, double alpha,
    double beta, double base, double epsilon, bool mine, bool compute_grad, bool ref_grad) {
  return ms_loss_forward(e, l, get(re), get(rl), get(si), ms_params(alpha, beta, base, epsilon, mine),
                         compute_grad, ref_grad, tile_kernel(e));
}

std::tuple<at::Tensor, at::Tensor> ms_loss_backward_op(
    const at::Tensor& g, const at::Tensor& e, const at::Tensor& l, const Opt& re, const Opt& rl,
    const Opt& si, const at::Tensor& stats, double alpha, double beta, double base, double epsilon,
    bool mine, bool ref_grad) {
  return ms_loss_backward(g, e, l, get(re), get(rl), get(si), stats,
                          ms_params(alpha, beta, base, epsilon, mine), ref_grad, tile_kernel(e));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mine_op(
    const at::Tensor& e, const at::Tensor& l, const Opt& re, const Opt& rl, c10::string_view rule,
    double epsilon, double pos_margin, double neg_margin) {
  return mine_pairs(e, l, get(re), get(rl), mine_params(rule, epsilon, pos_margin, neg_margin), tile_kernel(e));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_hard_op(const at::Tensor& e, const at::Tensor& l,
                                                             const Opt& re, const Opt& rl) {
  return batch_hard(e, l, get(re), get(rl), tile_kernel(e));
}

std::tuple<at::Tensor, at::Tensor> tcm_op(const at::Tensor& e, const at::Tensor& l, const Opt& re,
                                          const Opt& rl, double lp, double lm, double mp, double mm) {
  return tcm_forward(e, l, get(re), get(rl), tcm_params(lp, lm, mp, mm), tile_kernel(e));
}

std::tuple<at::Tensor, at::Tensor> tcm_backward_op(
    const at::Tensor& g, const at::Tensor& e, const at::Tensor& l, const Opt& re, const Opt& rl,
    const at::Tensor& stats, double lp, double lm, double mp, double mm, bool ref_grad) {
  return tcm_backward(g, e, l, get(re), get(rl), stats, tcm_params(lp, lm, mp, mm), ref_grad, tile_kernel(e));
}

int64_t tile_elements_op(int64_t elements) {
  const int64_t previous = tile_elements();
  if (elements >= 0) set_tile_elements(elements);
  return previous;
}

}  // namespace

void Kernels::impl_ops(torch::Library& m) {
  m.impl("multi_similarity_loss", &ms_loss_op);
  m.impl("_multi_similarity_loss_backward", &ms_loss_backward_op);
  m.impl("mine_pairs", &mine_op);
  m.impl("batch_hard_mine", &batch_hard_op);
  m.impl("tcm_loss", &tcm_op);
  m.impl("_tcm_loss_backward", &tcm_backward_op);
}

}  // namespace mining
}  // namespace fusedtrain

TORCH_LIBRARY_FRAGMENT(fusedtrain, m) {
  m.def(
      "multi_similarity_loss(Tensor embeddings, Tensor labels, Tensor? ref_emb, Tensor? ref_labels, "
      "Tensor? self_index, float alpha, float beta, float base, float epsilon, bool mine, "
      "bool compute_grad, bool ref_grad) "
      "-> (Tensor loss, Tensor row_stats, Tensor grad_embeddings, Tensor grad_ref_emb)");
  m.def(
      "_multi_similarity_loss_backward(Tensor grad_loss, Tensor embeddings, Tensor labels, "
      "Tensor? ref_emb, Tensor? ref_labels, Tensor? self_index, Tensor row_stats, float alpha, "
      "float beta, float base, float epsilon, bool mine, bool ref_grad) "
      "-> (Tensor grad_embeddings, Tensor grad_ref_emb)");
  m.def(
      "mine_pairs(Tensor embeddings, Tensor labels, Tensor? ref_emb, Tensor? ref_labels, str rule, "
      "float epsilon, float pos_margin, float neg_margin) -> (Tensor a1, Tensor p, Tensor a2, Tensor n)");
  m.def(
      "batch_hard_mine(Tensor embeddings, Tensor labels, Tensor? ref_emb, Tensor? ref_labels) "
      "-> (Tensor a, Tensor p, Tensor n)");
  m.def(
      "tcm_loss(Tensor embeddings, Tensor labels, Tensor? ref_emb, Tensor? ref_labels, "
      "float lambda_plus, float lambda_minus, float margin_plus, float margin_minus) "
      "-> (Tensor loss, Tensor row_stats)");
  m.def(
      "_tcm_loss_backward(Tensor grad_loss, Tensor embeddings, Tensor labels, Tensor? ref_emb, "
      "Tensor? ref_labels, Tensor row_stats, float lambda_plus, float lambda_minus, "
      "float margin_plus, float margin_minus, bool ref_grad) "
      "-> (Tensor grad_embeddings, Tensor grad_ref_emb)");
  // Sets the elements of one tile of S (tests use small tiles to cross chunk edges), 0 for the
  // device defaults, a negative value only reads; returns the previous setting.
  m.def("_mining_tile_elements(int elements) -> int", &fusedtrain::mining::tile_elements_op);
}
