// Schemas of the fused linear spherical loss and its device-independent half: argument checks, the
// dense products (at::mm/addmm: MKL/OpenBLAS on the CPU, cuBLAS on CUDA) and the assembly of the
// gradients. The backends supply only the per-row kernels (linear_spherical.h). Nothing here is
// O(N·D): the largest buffers are the (D, d) weight gradient and (N, d') row projections.
#include "linear_spherical.h"

#include "../common/backend.h"
#include "../common/checks.h"
#include "../common/dispatch.h"
#include "../common/cpu/memory.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/addmv.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/outer.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

namespace fusedtrain {
namespace spherical {
namespace linear {
namespace {

void check_weight_and_bias(const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_defined(weight, "linear_weight");
  check_floating(weight, "linear_weight");
  check_dim(weight, 2, "linear_weight");
  FT_CHECK_VALUE(weight.size(0) >= 1, "linear_weight must have at least one class (D >= 1), got shape ",
                 weight.sizes());
  if (bias.has_value() && bias->defined()) {
    check_dim(*bias, 1, "linear_bias");
    FT_CHECK_VALUE(bias->size(0) == weight.size(0), "linear_bias must have shape (", weight.size(0),
                   ",) for linear_weight of shape ", weight.sizes(), ", got ", bias->sizes());
    FT_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), "linear_bias must have linear_weight's dtype ",
                  weight.scalar_type(), ", got ", bias->scalar_type());
    check_same_device(*bias, weight, "linear_bias", "linear_weight");
  }
}

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_inputs(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& target) {
  check_weight_and_bias(weight, bias);
  check_defined(input, "input");
  check_defined(target, "target");
  check_dim(input, 2, "input");
  FT_CHECK_TYPE(input.scalar_type() == weight.scalar_type(), "input must have linear_weight's dtype ",
                weight.scalar_type(), ", got ", input.scalar_type());
  FT_CHECK_VALUE(input.size(1) == weight.size(1), "input must have shape (N, ", weight.size(1),
                 ") for linear_weight of shape ", weight.sizes(), ", got ", input.sizes());
  check_dtype(target, at::kLong, "target");
  FT_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0), "target must have shape (",
                 input.size(0), ",) for input of shape ", input.sizes(), ", got ", target.sizes());
  check_same_device(input, weight, "input", "linear_weight");
  check_same_device(target, weight, "target", "linear_weight");
}

// The statistics a kernel reads must be those of this weight: shape, dtype, device.
void check_statistic(const at::Tensor& t, c10::IntArrayRef shape, at::ScalarType acc, const at::Tensor& weight,
                     const char* name) {
  check_defined(t, name);
  FT_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, " (d' = d + 1 with a bias), got ",
                 t.sizes());
  FT_CHECK_TYPE(t.scalar_type() == acc, name, " must be ", acc, " (the accumulate type), got ",
                t.scalar_type());
  check_same_device(t, weight, name, "linear_weight");
}

// dst (+)= Xᵀ·Y in the accumulate type, for column blocks X, Y of a block of rows of W'. Same dtype:
// one GEMM that accumulates in place (fewer, larger ops: on a busy CPU each parallel op pays for
// its thread barrier). bf16/fp16 (CUDA only: the CPU gets blocks already upcast): cuBLAS with fp32
// accumulation and output (mm's out_dtype), then an add.
void accumulate_product(at::Tensor dst, const at::Tensor& X, const at::Tensor& Y, bool first) {
  if (X.scalar_type() == dst.scalar_type()) {
    if (first) at::mm_out(dst, X.t(), Y);
    else dst.addmm_(X.t(), Y);
    return;
  }
  const at::Tensor product = at::mm(X.t(), Y, dst.scalar_type());
  if (first) dst.copy_(product);
  else dst.add_(product);
}

// From this many columns on, Q = AᵀA is formed from its upper 2 x 2 blocks (3/4 of the multiply-adds:
// the lower off-diagonal block is the transpose of the upper one), each product still large enough
// to run at full GEMM rate. (No SYRK in ATen; this is the symmetric product where it pays.)
constexpr int64_t kSymmetricMinColumns = 1024;

// Q += Aᵀ·A for a block A of rows of W' (first: Q = AᵀA). With the symmetric split, only Q's upper
// blocks are written here; gram() mirrors Q's upper triangle at the end (symmetric_from_upper).
void add_block(at::Tensor& Q, const at::Tensor& A, bool first) {
  const auto acc = Q.scalar_type();
  const at::Tensor up = A.scalar_type() == acc || A.is_cuda() ? A : A.to(acc);  // a block, never all of W
  const int64_t n = A.size(1);
  if (n < kSymmetricMinColumns) {
    accumulate_product(Q, up, up, first);
  } else {
    const int64_t h = n / 2;
    const at::Tensor left = up.narrow(1, 0, h), right = up.narrow(1, h, n - h);
    accumulate_product(Q.narrow(0, 0, h).narrow(1, 0, h), left, left, first);
    accumulate_product(Q.narrow(0, 0, h).narrow(1, h, n - h), left, right, first);
    accumulate_product(Q.narrow(0, h, n - h).narrow(1, h, n - h), right, right, first);
  }
}

// Q's upper triangle (diagonal included) with its transpose as the lower one: symmetric to the bit
// on every path. A GEMM need not round Q[i][j] and Q[j][i] alike (its blocking and summation order
// depend on the BLAS and the CPU), nor does outer(colsum, mean); and add_block's symmetric split
// leaves the lower off-diagonal block unwritten. at::where selects (never multiplies), so whatever
// the lower triangle held, NaN included, cannot reach the result.
at::Tensor symmetric_from_upper(const at::Tensor& Q) {
  const at::Tensor strictly_lower = at::ones(Q.sizes(), Q.options().dtype(at::kBool)).tril_(-1);
  return at::where(strictly_lower, Q.t(), Q);
}

// A·B in fp32 for A bf16 (exact) and B fp32, at fp32 accuracy and bf16 tensor-core speed: B is split
// into three bf16 parts (B = B0 + B1 + B2 to 24 significant bits, bf16 having fp32's exponent range)
// and the three products accumulate in fp32 (cuBLAS, mm's out_dtype). An fp32 product would run on
// the H100 at about a fifteenth of the bf16 rate. fp16 inputs (whose range B may exceed) and the
// CPU (no half-in/fp32-out product) upcast A instead; the CPU still runs the split, so the CPU
// tests check the arithmetic the GPU runs.
at::Tensor mm_split_bf16(const at::Tensor& A, const at::Tensor& B) {
  const auto acc = B.scalar_type();
  if (A.scalar_type() != at::kBFloat16) return at::mm(A.to(acc), B);
  at::Tensor rest = B;
  at::Tensor out;
  const at::Tensor A_up = A.is_cuda() ? at::Tensor() : A.to(acc);
  for (int part = 0; part < 3; ++part) {
    const at::Tensor piece = rest.to(at::kBFloat16);
    if (part < 2) rest = rest.sub(piece.to(acc));
    const at::Tensor prod = A.is_cuda() ? at::mm(A, piece, acc) : at::mm(A_up, piece.to(acc));
    out = part == 0 ? prod : out.add_(prod);
  }
  return out;
}

// The statistics of W' = [W | bias]: its column sums w̄' and its *centered* Gram (scatter) matrix
// C = Σ_k (W'_k − m)(W'_k − m)ᵀ about the mean row m = w̄'/D, both (d',) / (d', d') in acc_t. With
// s = h'·w̄', a row's spread is h'ᵀCh' = Σ(o_k − s/D)² directly and q = h'ᵀCh' + s²/D, where the
// plain Gram matrix would give the spread as q − s²/D: a catastrophic cancellation when the logits
// share a large common offset (e.g. a bias), which the Z-loss is invariant to.
// fp32/fp64 weights are centered block by block before the product. bf16/fp16 products are exact
// in fp32, so there C = W'ᵀW' − w̄'mᵀ from the uncentered (exact) product: centering a bf16 block
// would round it; the cancellation left is far below the bf16 logits' own rounding.
std::tuple<at::Tensor, at::Tensor> gram(const at::Tensor& weight_in, const std::optional<at::Tensor>& bias) {
  check_weight_and_bias(weight_in, bias);
  const at::Tensor weight = rows_unit_stride(weight_in);
  const int64_t D = weight.size(0), d = weight.size(1);
  const bool with_bias = has(bias);
  const int64_t dp = d + (with_bias ? 1 : 0);
  const auto acc = accumulate_type(weight.scalar_type());
  at::Tensor colsum = weight.sum({0}, /*keepdim=*/false, acc);
  if (with_bias) colsum = at::cat({colsum, bias->sum({0}, /*keepdim=*/true, acc)});
  const at::Tensor mean = colsum.div(static_cast<double>(D));
  const bool center_blocks = weight.scalar_type() == acc;
  at::Tensor C = at::empty({dp, dp}, weight.options().dtype(acc));
  if (!with_bias && !center_blocks && weight.is_cuda()) {
    add_block(C, weight, true);  // no copy of W
  } else {
    // Blocks of rows of W' (augmented, centered or upcast), up to 2^24 elements each: the copy is
    // one block, never the whole weight, and each product stays large enough for full GEMM rate.
    const int64_t rows = std::max<int64_t>(1, (int64_t(1) << 24) / std::max<int64_t>(dp, 1));
    at::Tensor buffer;  // centered rows, reused by every block
    for (int64_t start = 0; start < D; start += rows) {
      const int64_t len = std::min(rows, D - start);
      at::Tensor block = weight.narrow(0, start, len);
      if (with_bias) block = at::cat({block, bias->narrow(0, start, len).unsqueeze(1)}, 1);
      if (center_blocks) {
        if (!buffer.defined()) {
          buffer = at::empty({std::min(rows, D), dp}, weight.options());
          if (!buffer.is_cuda()) cpu::advise_huge_pages(buffer.data_ptr(), buffer.nbytes());  // fresh pages
        }
        at::Tensor centered = buffer.narrow(0, 0, len);
        at::sub_out(centered, block, mean);
        block = centered;
      }
      add_block(C, block, start == 0);
    }
  }
  if (!center_blocks) C.sub_(at::outer(colsum, mean));
  return {symmetric_from_upper(C), colsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
    const at::Tensor& target_in, const at::Tensor& gram_in, const at::Tensor& colsum_in,
    const std::string& kind, double a, double b, double eps, double var_eps, int64_t ignore_index,
    const std::string& reduction, bool check_target) {
  check_inputs(input_in, weight_in, bias, target_in);
  const Params params = make_params(kind, a, b, eps, var_eps);
  const int red = parse_reduction(reduction);
  const int64_t N = input_in.size(0), d = input_in.size(1), D = weight_in.size(0);
  const bool with_bias = has(bias);
  const int64_t dp = d + (with_bias ? 1 : 0);
  const auto acc = accumulate_type(input_in.scalar_type());
  check_statistic(gram_in, {dp, dp}, acc, weight_in, "gram");
  check_statistic(colsum_in, {dp}, acc, weight_in, "colsum");
  const auto acc_opts = input_in.options().dtype(acc);

  ForwardLaunch L;
  L.input = rows_unit_stride(input_in);
  L.weight = rows_unit_stride(weight_in);
  L.bias = with_bias ? bias->contiguous() : at::Tensor();
  L.target = target_in.contiguous();
  L.colsum = colsum_in.contiguous();
  const at::Tensor gram = gram_in.contiguous();
  // p = H'·C = H·C[:d] + C[d] (the bias row), in the accumulate type: an (N, d') buffer.
  L.proj = mm_split_bf16(L.input, gram.narrow(0, 0, d));
  if (with_bias) L.proj.add_(gram.narrow(0, d, 1));
  L.ignore_index = ignore_index;
  L.params = params;
  L.row_loss = at::empty({N}, acc_opts);
  L.coef = at::empty({N, kCoefs}, acc_opts);
  L.bad_target = at::zeros({1}, input_in.options().dtype(at::kInt));
  const at::Tensor count = mean_count(target_in, ignore_index, red, acc);
  if (red == kMean) L.scale = count.reciprocal();
  if (N > 0) backend<Kernels>(weight_in).forward(L);
  if (check_target && N > 0 && L.bad_target.item<int>() != 0) throw_bad_target(D, ignore_index);
  // In the accumulate type, as spherical_loss's (the Python layer picks the dtype returned).
  return {reduce_loss(L.row_loss, red, count, acc), L.coef, L.proj};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_loss, const at::Tensor& input_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias, const at::Tensor& target_in, const at::Tensor& colsum,
    const at::Tensor& coef_in, const at::Tensor& proj, int64_t ignore_index, std::array<bool, 3> output_mask) {
  check_inputs(input_in, weight_in, bias, target_in);
  const int64_t N = input_in.size(0), d = input_in.size(1), D = weight_in.size(0);
  const bool with_bias = has(bias);
  const int64_t dp = d + (with_bias ? 1 : 0);
  const auto acc = accumulate_type(input_in.scalar_type());
  const auto dtype = input_in.scalar_type();
  check_statistic(colsum, {dp}, acc, weight_in, "colsum");
  check_statistic(coef_in, {N, kCoefs}, acc, weight_in, "coef");
  check_statistic(proj, {N, dp}, acc, weight_in, "proj");
  FT_CHECK_VALUE(grad_loss.numel() == 1 || (grad_loss.dim() == 1 && grad_loss.size(0) == N),
                 "grad_loss must be a scalar or have shape (", N, ",), got ", grad_loss.sizes());
  check_same_device(grad_loss, weight_in, "grad_loss", "linear_weight");
  const at::Tensor input = rows_unit_stride(input_in);
  const at::Tensor weight = rows_unit_stride(weight_in);
  const at::Tensor target = target_in.contiguous();
  // Upstream gradient folded into the coefficients once: (N, 3), tiny.
  const at::Tensor up = grad_loss.to(acc);
  const at::Tensor coef = (grad_loss.numel() == 1 ? coef_in.mul(up.reshape({})) : coef_in.mul(up.unsqueeze(1)))
                              .contiguous();
  // Outputs not asked for are distinct empty tensors (outputs must not alias one another).
  const auto empty = [&] { return at::empty({0}, input_in.options()); };

  at::Tensor grad_input = empty();
  if (output_mask[0]) {
    InputGradLaunch L{weight, target, colsum.contiguous(), proj.contiguous(), coef, ignore_index,
                      at::empty({N, d}, input_in.options())};
    if (N > 0) backend<Kernels>(weight_in).input_grad(L);
    grad_input = L.grad_input;
  }
  at::Tensor grad_weight = empty(), grad_bias = empty();
  const bool want_weight = output_mask[1], want_bias = output_mask[2] && with_bias;
  if (want_weight || want_bias) {
    // a = Σ α_n h'_n and M' = Σ β_n h'_n h'_nᵀ, in blocks: a (d), Σα; M (d, d), m = Σ β_n h_n, Σβ.
    const at::Tensor h = input.to(acc);
    const at::Tensor alpha = coef.select(1, kAlpha), beta = coef.select(1, kBeta);
    const at::Tensor beta_h = h.mul(beta.unsqueeze(1));  // (N, d): O(N·d)
    const at::Tensor m = beta_h.sum(0);
    const at::Tensor sum_beta = beta.sum();
    // The coefficients are centered (∂L/∂o_k = α + β(o_k − μ) + γ[k = c]): the rank-1 row of dW' is
    // a − M'·w̄'/D (linear_spherical.h), whose entries need w̄ = w̄'[:d] and, with a bias, w̄'[d].
    const at::Tensor colsum_w = colsum.narrow(0, 0, d);
    const at::Tensor colsum_b = with_bias ? colsum.select(0, d) : at::Tensor();
    const double inv_D = 1.0 / static_cast<double>(D);
    if (want_weight) {
      const at::Tensor M = mm_split_bf16(input.t(), beta_h);  // Hᵀ·(βH), fp32 accuracy
      at::Tensor correction = at::mv(M, colsum_w);
      if (with_bias) correction.add_(m.mul(colsum_b));
      const at::Tensor a_vec = at::mv(h.t(), alpha).sub_(correction.mul_(inv_D));
      // dW = 1·aᵀ + W·M (+ bias·mᵀ) + scatter: addmm writes the broadcast row and the product into
      // one fresh (D, d) buffer; the rank-1 bias term and the scatter update it in place.
      grad_weight = at::addmm(a_vec.to(dtype).unsqueeze(0).expand({D, d}), weight, M.to(dtype))
                        .contiguous();  // a no-op: the scatter kernels index rows c·d
      if (with_bias) grad_weight.addr_(*bias, m.to(dtype));
    }
    if (want_bias) {
      // dbias = (Σα − (m·w̄ + Σβ·w̄'[d])/D)·1 + W·m + Σβ·bias + scatter of γ.
      const at::Tensor row = alpha.sum().sub(m.dot(colsum_w).add(sum_beta.mul(colsum_b)).mul(inv_D));
      grad_bias = at::addmv(row.to(dtype).expand({D}), weight, m.to(dtype));
      grad_bias.add_(bias->mul(sum_beta.to(dtype)));
    }
    if (N > 0) {
      // Rows that scatter: kept, in range. Others get key D and sort last.
      const at::Tensor valid = target.ne(ignore_index).logical_and(target.ge(0)).logical_and(target.lt(D));
      const at::Tensor key = target.masked_fill(valid.logical_not(), D);
      auto sorted = key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
      ScatterLaunch S{input, coef, std::get<0>(sorted), std::get<1>(sorted),
                      want_weight ? grad_weight : at::Tensor(), want_bias ? grad_bias : at::Tensor()};
      backend<Kernels>(weight_in).scatter(S);
    }
  }
  return {grad_input, grad_weight, grad_bias};
}

// The registered ops (schema signatures).
std::tuple<at::Tensor, at::Tensor> gram_op(const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const DeviceScope scope(weight);
  return gram(weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_op(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& gram, const at::Tensor& colsum, c10::string_view kind,
    double a, double b, double eps, double var_eps, int64_t ignore_index, c10::string_view reduction,
    bool check_target) {
  const DeviceScope scope(weight);
  return forward(input, weight, bias, target, gram, colsum, std::string(kind), a, b, eps, var_eps,
                 ignore_index, std::string(reduction), check_target);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_backward_op(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& colsum,
    const at::Tensor& coef, const at::Tensor& proj, int64_t ignore_index, std::array<bool, 3> output_mask) {
  const DeviceScope scope(weight);
  return backward(grad_loss, input, weight, bias, target, colsum, coef, proj, ignore_index, output_mask);
}

}  // namespace

void Kernels::impl_ops(torch::Library& m) {
  m.impl("_linear_spherical_gram", &gram_op);
  m.impl("linear_spherical_loss", &loss_op);
  m.impl("_linear_spherical_loss_backward", &loss_backward_op);
}

}  // namespace linear
}  // namespace spherical
}  // namespace fusedtrain

TORCH_LIBRARY_FRAGMENT(fusedtrain, m) {
  m.def("_linear_spherical_gram(Tensor linear_weight, Tensor? linear_bias) -> (Tensor gram, Tensor colsum)");
  m.def(
      "linear_spherical_loss(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
      "Tensor gram, Tensor colsum, str kind, float a, float b, float eps, float var_eps, int ignore_index, "
      "str reduction, bool check_target) -> (Tensor loss, Tensor coef, Tensor proj)");
  m.def(
      "_linear_spherical_loss_backward(Tensor grad_loss, Tensor input, Tensor linear_weight, "
      "Tensor? linear_bias, Tensor target, Tensor colsum, Tensor coef, Tensor proj, int ignore_index, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}
