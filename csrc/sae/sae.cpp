// Schemas of the SAE ops and their device-independent halves: argument checks (once, for both
// backends), allocation, and the assembly of the CSR-by-token result every routing returns.
#include "sae.h"

#include "../common/backend.h"
#include "../common/checks.h"
#include "../common/dispatch.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/cummax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>

namespace fusedtrain {
namespace sae {
namespace {

enum Routing { kTopK, kFeatureChoice, kMutualChoice, kThreshold };

Routing parse_routing(const std::string& routing) {
  if (routing == "topk") return kTopK;
  if (routing == "feature_choice") return kFeatureChoice;
  if (routing == "mutual_choice") return kMutualChoice;
  if (routing == "threshold") return kThreshold;
  FT_CHECK_VALUE(false, "routing must be one of 'topk', 'feature_choice', 'mutual_choice', 'threshold', got '",
                 routing, "'");
  return kTopK;  // not reached
}

void check_pre(const at::Tensor& pre) {
  check_defined(pre, "pre");
  check_floating(pre, "pre");
  check_dim(pre, 2, "pre");
}

void check_index_vector(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  check_dtype(t, at::kLong, name);
  check_dim(t, 1, name);
}

at::Tensor offsets_from_counts(const at::Tensor& counts) {
  auto row_ptr = at::zeros({counts.numel() + 1}, counts.options());
  if (counts.numel() > 0) {
    at::Tensor tail = row_ptr.slice(0, 1);
    at::cumsum_out(tail, counts, 0);
  }
  return row_ptr;
}

// CSR of the entries kept by per-feature cutoffs: count per row, offsets, then fill.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cutoff_csr(const Cutoffs& c, const Kernels& K) {
  const int64_t B = c.pre.size(0);
  auto counts = at::empty({B}, c.pre.options().dtype(at::kLong));
  if (B > 0 && c.pre.size(1) > 0) K.count_kept(c, counts);
  else counts.zero_();
  auto row_ptr = offsets_from_counts(counts);
  // The output size depends on the data: one int read back (a sync on CUDA).
  const int64_t nnz = row_ptr[B].item<int64_t>();
  auto feature = at::empty({nnz}, c.pre.options().dtype(at::kLong));
  auto value = at::empty({nnz}, c.pre.options());
  if (nnz > 0) K.fill_kept(c, row_ptr, feature, value);
  return {row_ptr, feature, value};
}

// TopK's dense (B, k) selection as CSR: entries <= 0 dropped, features ascending within a row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_csr(const at::Tensor& pre, int64_t k, const Kernels& K) {
  const int64_t F = pre.size(1);
  auto [values, indices] = topk_select(pre, k, K);
  auto keep = values.gt(0);
  auto keyed = indices.masked_fill(keep.logical_not(), F);  // dropped entries sort last
  auto [sorted_index, order] = keyed.sort(1);
  auto sorted_values = values.gather(1, order);
  auto row_ptr = offsets_from_counts(keep.sum(1));
  auto kept_sorted = sorted_index.lt(F);
  return {row_ptr, sorted_index.masked_select(kept_sorted), sorted_values.masked_select(kept_sorted)};
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  FT_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
                ref.scalar_type(), "), got ", t.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_select(const at::Tensor& pre_in, int64_t k, const Kernels& K) {
  check_pre(pre_in);
  const int64_t B = pre_in.size(0), F = pre_in.size(1);
  FT_CHECK_VALUE(k >= 1 && k <= F, "k must be in [1, F] = [1, ", F, "] for pre of shape ", pre_in.sizes(),
                 ", got k = ", k);
  auto pre = rows_unit_stride(pre_in);
  auto values = at::empty({B, k}, pre.options());
  auto indices = at::empty({B, k}, pre.options().dtype(at::kLong));
  if (B > 0) K.topk(pre, k, values, indices);
  return {values, indices};
}

Csr4 route(const at::Tensor& pre_in, const std::string& routing, int64_t k,
           const c10::optional<at::Tensor>& theta, const Kernels& K) {
  check_pre(pre_in);
  const Routing r = parse_routing(routing);
  const int64_t B = pre_in.size(0), F = pre_in.size(1);
  const auto acc_opts = pre_in.options().dtype(accumulate_type(pre_in.scalar_type()));
  const auto long_opts = pre_in.options().dtype(at::kLong);
  auto no_cutoff = at::empty({0}, acc_opts);
  if (r == kTopK) {
    auto [row_ptr, feature, value] = topk_csr(pre_in, k, K);
    return {row_ptr, feature, value, no_cutoff};
  }
  auto pre = rows_unit_stride(pre_in);
  Cutoffs c;
  c.pre = pre;
  // The cutoff is the first rejected entry (sae_math.h): the (m + 1)-th best positive one, so
  // the kernels select rank m + 1. m >= the entries there are keeps every positive one: (0, -1)
  // without a pass (and no m + 1 overflow).
  if (r == kFeatureChoice) {
    FT_CHECK_VALUE(k >= 0, "m (tokens per feature) must be >= 0, got ", k);
    c.value = at::empty({F}, acc_opts);
    c.index = at::empty({F}, long_opts);
    if (k >= B) {
      c.value.zero_();
      c.index.fill_(-1);
    } else if (F > 0) {
      K.column_cutoff(pre, k + 1, c.value, c.index);
    }
  } else if (r == kMutualChoice) {
    FT_CHECK_VALUE(k >= 0, "budget must be >= 0, got ", k);
    c.value = at::empty({1}, acc_opts);
    c.index = at::empty({1}, long_opts);
    c.flat = true;
    if (k >= B * F) {
      c.value.zero_();
      c.index.fill_(-1);
    } else {
      K.global_cutoff(pre, k + 1, c.value, c.index);
    }
  } else {
    FT_CHECK_VALUE(theta.has_value() && theta->defined(), "threshold routing needs theta");
    const at::Tensor& t = *theta;
    check_floating(t, "theta");
    FT_CHECK_VALUE(t.numel() == 1 ? t.dim() <= 1 : (t.dim() == 1 && t.size(0) == F),
                   "theta must have shape (F,) = (", F, ",) or be a single value, got shape ", t.sizes());
    check_same_device(t, pre, "theta", "pre");
    c.value = t.reshape({-1}).to(acc_opts.dtype()).contiguous();
    c.index = at::full({c.value.numel()}, -1, long_opts);
  }
  auto [row_ptr, feature, value] = cutoff_csr(c, K);
  return {row_ptr, feature, value, r == kThreshold ? no_cutoff : c.value};
}

Csr4 encode(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& b_dec,
            const std::string& routing, int64_t k, const c10::optional<at::Tensor>& theta, const Kernels& K) {
  check_defined(x, "x");
  check_floating(x, "x");
  check_dim(x, 2, "x");
  check_defined(W_enc, "W_enc");
  check_dim(W_enc, 2, "W_enc");
  const int64_t d = x.size(1), F = W_enc.size(1);
  FT_CHECK_VALUE(W_enc.size(0) == d, "W_enc must have shape (d, F) with d = ", d, " (x is ", x.sizes(),
                 "), got ", W_enc.sizes());
  FT_CHECK_VALUE(b_enc.defined() && b_enc.dim() == 1 && b_enc.size(0) == F, "b_enc must have shape (", F,
                 ",), got ", b_enc.sizes());
  FT_CHECK_VALUE(b_dec.defined() && b_dec.dim() == 1 && b_dec.size(0) == d, "b_dec must have shape (", d,
                 ",), got ", b_dec.sizes());
  check_same_dtype(W_enc, x, "W_enc", "x");
  check_same_dtype(b_enc, x, "b_enc", "x");
  check_same_dtype(b_dec, x, "b_dec", "x");
  check_same_device(W_enc, x, "W_enc", "x");
  check_same_device(b_enc, x, "b_enc", "x");
  check_same_device(b_dec, x, "b_dec", "x");
  parse_routing(routing);
  // The B x F pre-activations live only inside this call: routing reads them, backward never does.
  auto pre = at::addmm(b_enc, at::sub(x, b_dec), W_enc);
  return route(pre, routing, k, theta, K);
}

namespace {

void check_csr(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef, const char* coef_name) {
  check_index_vector(row_ptr, "row_ptr");
  check_index_vector(col, "feature");
  FT_CHECK_VALUE(row_ptr.size(0) >= 1, "row_ptr must have B + 1 >= 1 entries");
  check_defined(coef, coef_name);
  check_floating(coef, coef_name);
  FT_CHECK_VALUE(coef.dim() == 1 && coef.size(0) == col.size(0), coef_name, " must have shape (nnz,) = (",
                 col.size(0), ",), got ", coef.sizes());
  check_same_device(col, row_ptr, "feature", "row_ptr");
  check_same_device(coef, row_ptr, coef_name, "row_ptr");
}

void check_table(const at::Tensor& table, const at::Tensor& coef, const char* name, const char* coef_name) {
  check_defined(table, name);
  check_dim(table, 2, name);
  check_same_dtype(table, coef, name, coef_name);
  check_same_device(table, coef, name, coef_name);
}

// An offsets vector as every op reads it (sae.h): clamped to [0, nnz] and made non-decreasing (its
// running maximum), so its ranges never overlap and never leave [0, nnz], whatever its values. A
// valid one (0 = first <= ... <= last = nnz) is read unchanged. CPU: checked on the host first, so
// the valid case costs no copy; CUDA: two small device ops, no host sync.
at::Tensor read_offsets(const at::Tensor& ptr_in, int64_t nnz) {
  auto ptr = ptr_in.contiguous();
  if (ptr.is_cpu()) {
    const int64_t* p = ptr.const_data_ptr<int64_t>();
    const int64_t n = ptr.numel();
    bool ok = true;
    for (int64_t i = 0; i < n && ok; ++i) ok = p[i] >= 0 && p[i] <= nnz && (i == 0 || p[i] >= p[i - 1]);
    if (ok) return ptr;
  }
  return std::get<0>(at::cummax(at::clamp(ptr, c10::Scalar(int64_t(0)), c10::Scalar(nnz)), 0)).contiguous();
}

}  // namespace

at::Tensor gather_rows(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef,
                       const at::Tensor& table, const c10::optional<at::Tensor>& bias, const Kernels& K) {
  check_csr(row_ptr, col, coef, "value");
  check_table(table, coef, "W_dec", "value");
  const int64_t B = row_ptr.size(0) - 1, d = table.size(1);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    FT_CHECK_VALUE(b.dim() == 1 && b.size(0) == d, "b_dec must have shape (", d, ",), got ", b.sizes());
    check_same_dtype(b, coef, "b_dec", "value");
    check_same_device(b, coef, "b_dec", "value");
    b = b.contiguous();
  }
  auto out = at::empty({B, d}, table.options());
  if (B > 0 && d > 0)
    K.gather_rows(read_offsets(row_ptr, col.size(0)), col.contiguous(), coef.contiguous(), table.contiguous(), b,
                  out);
  return out;
}

at::Tensor sampled_dot(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& grad,
                       const at::Tensor& table, const Kernels& K) {
  check_index_vector(row_ptr, "row_ptr");
  check_index_vector(col, "feature");
  check_defined(grad, "grad");
  check_floating(grad, "grad");
  check_dim(grad, 2, "grad");
  check_table(table, grad, "table", "grad");
  FT_CHECK_VALUE(grad.size(0) == row_ptr.size(0) - 1 && grad.size(1) == table.size(1),
                 "grad must have shape (B, d) = (", row_ptr.size(0) - 1, ", ", table.size(1), "), got ",
                 grad.sizes());
  auto out = at::empty({col.size(0)}, grad.options());
  check_same_device(row_ptr, grad, "row_ptr", "grad");
  check_same_device(col, grad, "feature", "grad");
  if (col.size(0) > 0)
    K.sampled_dot(read_offsets(row_ptr, col.size(0)), col.contiguous(), grad.contiguous(), table.contiguous(), out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csc_torch(const at::Tensor& row_ptr, const at::Tensor& col,
                                                         int64_t num_cols) {
  const int64_t B = row_ptr.size(0) - 1, nnz = col.size(0);
  // Each entry's row (sae.h: -1 before the first row, B after the last), by a search of the
  // non-decreasing row_ptr; then its key: the feature, or num_cols for an entry that is dropped.
  auto entries = at::arange(nnz, col.options());
  auto row_of = at::sub(at::searchsorted(row_ptr, entries, /*out_int32=*/false, /*right=*/true), 1);
  auto valid = row_of.ge(0).logical_and_(row_of.lt(B)).logical_and_(col.ge(0)).logical_and_(col.lt(num_cols));
  auto key = at::where(valid, col, at::scalar_tensor(num_cols, col.options()));
  // A stable sort by key keeps each feature's entries in token order: the aggregation order, and
  // so the sums, are the same on every run. col_ptr[f] = the first position whose key is >= f.
  auto [sorted_key, perm] = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto col_ptr = at::searchsorted(sorted_key, at::arange(num_cols + 1, col.options()), false, false);
  return {col_ptr, perm, row_of.index_select(0, perm)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csc(const at::Tensor& row_ptr, const at::Tensor& col,
                                                   int64_t num_cols, const Kernels& K) {
  check_index_vector(row_ptr, "row_ptr");
  check_index_vector(col, "feature");
  FT_CHECK_VALUE(row_ptr.size(0) >= 1, "row_ptr must have B + 1 >= 1 entries");
  FT_CHECK_VALUE(num_cols >= 0 && num_cols < (int64_t(1) << 62), "num_cols must be in [0, 2^62), got ", num_cols);
  check_same_device(row_ptr, col, "row_ptr", "feature");
  return K.csc(read_offsets(row_ptr, col.size(0)), col.contiguous(), num_cols);
}

std::tuple<at::Tensor, at::Tensor> segment_sum(const at::Tensor& col_ptr, const at::Tensor& perm,
                                               const at::Tensor& token, const at::Tensor& coef,
                                               const at::Tensor& src, const Kernels& K) {
  check_index_vector(col_ptr, "col_ptr");
  check_index_vector(perm, "perm");
  check_index_vector(token, "token");
  check_defined(coef, "coef");
  check_floating(coef, "coef");
  FT_CHECK_VALUE(coef.dim() == 1 && coef.size(0) == perm.size(0) && token.size(0) == perm.size(0),
                 "perm, token and coef must all have nnz = ", perm.size(0), " entries");
  check_table(src, coef, "src", "coef");
  FT_CHECK_VALUE(col_ptr.size(0) >= 1, "col_ptr must have F + 1 >= 1 entries");
  const int64_t F = col_ptr.size(0) - 1;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{col_ptr, "col_ptr"}, {perm, "perm"}, {token, "token"}})
    check_same_device(t, src, name, "src");
  check_same_device(coef, src, "coef", "src");
  auto out = at::empty({F, src.size(1)}, src.options());
  auto coef_sum = at::empty({F}, coef.options());
  if (F > 0)
    K.segment_sum(read_offsets(col_ptr, perm.size(0)), perm.contiguous(), token.contiguous(), coef.contiguous(),
                  src.contiguous(), out, coef_sum);
  return {out, coef_sum};
}


namespace {

// The registered ops (schema signatures): each runs on the device of the tensor it guards.
std::tuple<at::Tensor, at::Tensor> topk_select_op(const at::Tensor& pre, int64_t k) {
  const DeviceScope scope(pre);
  return topk_select(pre, k, backend<Kernels>(pre));
}
Csr4 route_op(const at::Tensor& pre, c10::string_view routing, int64_t k, const c10::optional<at::Tensor>& theta) {
  const DeviceScope scope(pre);
  return route(pre, std::string(routing), k, theta, backend<Kernels>(pre));
}
Csr4 encode_op(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& b_dec,
               c10::string_view routing, int64_t k, const c10::optional<at::Tensor>& theta) {
  const DeviceScope scope(x);
  return encode(x, W_enc, b_enc, b_dec, std::string(routing), k, theta, backend<Kernels>(x));
}
at::Tensor gather_rows_op(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& coef,
                          const at::Tensor& table, const c10::optional<at::Tensor>& bias) {
  const DeviceScope scope(table);
  return gather_rows(row_ptr, col, coef, table, bias, backend<Kernels>(table));
}
at::Tensor sampled_dot_op(const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& grad,
                          const at::Tensor& table) {
  const DeviceScope scope(grad);
  return sampled_dot(row_ptr, col, grad, table, backend<Kernels>(grad));
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> csc_op(const at::Tensor& row_ptr, const at::Tensor& col,
                                                      int64_t num_cols) {
  const DeviceScope scope(col);
  return csc(row_ptr, col, num_cols, backend<Kernels>(col));
}
std::tuple<at::Tensor, at::Tensor> segment_sum_op(const at::Tensor& col_ptr, const at::Tensor& perm,
                                                  const at::Tensor& token, const at::Tensor& coef,
                                                  const at::Tensor& src) {
  const DeviceScope scope(src);
  return segment_sum(col_ptr, perm, token, coef, src, backend<Kernels>(src));
}

}  // namespace

void Kernels::impl_ops(torch::Library& m) {
  m.impl("sae_topk_select", &topk_select_op);
  m.impl("sae_route", &route_op);
  m.impl("sae_encode", &encode_op);
  m.impl("sae_gather_rows", &gather_rows_op);
  m.impl("_sae_sampled_dot", &sampled_dot_op);
  m.impl("_sae_segment_sum", &segment_sum_op);
  m.impl("_sae_csc", &csc_op);
}

}  // namespace sae
}  // namespace fusedtrain

TORCH_LIBRARY_FRAGMENT(fusedtrain, m) {
  m.def("sae_topk_select(Tensor pre, int k) -> (Tensor values, Tensor indices)");
  m.def(
      "sae_route(Tensor pre, str routing, int k, Tensor? theta) "
      "-> (Tensor row_ptr, Tensor feature, Tensor value, Tensor cutoff)");
  m.def(
      "sae_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor b_dec, str routing, int k, Tensor? theta) "
      "-> (Tensor row_ptr, Tensor feature, Tensor value, Tensor cutoff)");
  m.def("sae_gather_rows(Tensor row_ptr, Tensor feature, Tensor value, Tensor table, Tensor? bias) -> Tensor");
  m.def("_sae_sampled_dot(Tensor row_ptr, Tensor feature, Tensor grad, Tensor table) -> Tensor");
  m.def("_sae_csc(Tensor row_ptr, Tensor feature, int num_cols) -> (Tensor col_ptr, Tensor perm, Tensor token)");
  m.def(
      "_sae_segment_sum(Tensor col_ptr, Tensor perm, Tensor token, Tensor coef, Tensor src) "
      "-> (Tensor out, Tensor coef_sum)");
}

