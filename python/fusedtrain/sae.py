"""Top-k / feature-choice / mutual-choice SAE routing, sparse decode and the SAE module (spec/sae.md).

Every routing returns one format, :class:`SparseActs`: CSR by token (`row_ptr (B+1,)`, `feature
(nnz,)` int64 ascending within a row, `value (nnz,)`), holding only entries with pre > 0. TopK also
comes in sparsify's dense `(B, k)` form (:func:`topk_route` with `dense=True`).

The fused :func:`sae_encode` computes the pre-activations with one GEMM, routes them and frees them:
backward needs only the kept entries (`dW_enc`, `db_enc`, `dx` are sparse-dense products aggregated
per feature in a fixed order), so the B x F matrix is never kept and no dense B x F gradient is made.
:func:`sparse_decode` gathers decoder rows with fp32 accumulation; its backward computes `dvalue` as
dot products at the kept entries only and `dW_dec` per feature (deterministic).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from . import _backend
from .reference import sae as _reference

ROUTINGS = ("topk", "feature_choice", "mutual_choice")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_ops = torch.ops.fusedtrain


class SparseActs(NamedTuple):
    """Sparse latent activations, CSR by token: row b holds `feature[row_ptr[b]:row_ptr[b+1]]`."""
    row_ptr: torch.Tensor
    feature: torch.Tensor
    value: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.row_ptr.numel() - 1

    def token(self) -> torch.Tensor:
        """The token (row) of every stored entry, (nnz,) int64."""
        return torch.repeat_interleave(torch.arange(self.num_tokens, device=self.row_ptr.device),
                                       self.row_ptr.diff(), output_size=self.feature.numel())

    def to_dense(self, num_latents: int) -> torch.Tensor:
        """The (B, num_latents) dense activations (differentiable in `value`)."""
        return _reference.dense_from_csr(self.row_ptr, self.feature, self.value, num_latents)


class TopKOutput(NamedTuple):
    """TopK in sparsify's `EncoderOutput` shape: `(B, k)` rectified values and their int64 indices."""
    top_acts: torch.Tensor
    top_indices: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Argument checks (the C++ ops check again; these name the Python-level argument).

def _check_tensor(t, name: str, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _check_same(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _routing_param(routing: str, k, m, budget, batch: int, num_latents: int) -> int:
    """The op's integer parameter: k (TopK), m (feature choice), budget (mutual choice)."""
    if routing == "topk":
        return _check_int(k, "k", 1, num_latents)
    if routing == "feature_choice":
        if m is None:
            k = _check_int(k, "k", 0)
            return math.ceil(k * batch / num_latents) if num_latents else 0
        return _check_int(m, "m", 0)
    if routing == "mutual_choice":
        if budget is None:
            return _check_int(k, "k", 0) * batch
        return _check_int(budget, "budget", 0)
    raise ValueError(f"routing must be one of {ROUTINGS + ('threshold',)}, got {routing!r}")


def _check_theta(theta, pre: torch.Tensor) -> torch.Tensor:
    if isinstance(theta, (int, float)) and not isinstance(theta, bool):
        # Not rounded to pre's dtype: the kernels compare in the accumulate type (fp32, fp64 for fp64).
        acc = torch.float64 if pre.dtype == torch.float64 else torch.float32
        return torch.tensor(float(theta), dtype=acc, device=pre.device)
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"theta must be a float or a tensor, got {type(theta).__name__}")
    F = pre.shape[1]
    if not (theta.numel() == 1 and theta.dim() <= 1) and tuple(theta.shape) != (F,):
        raise ValueError(f"theta must have shape ({F},) (one per feature) or be a single value, "
                         f"got shape {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor, got {theta.dtype}")
    if theta.device != pre.device:
        raise ValueError(f"theta is on {theta.device} but pre is on {pre.device}")
    return theta


# ---------------------------------------------------------------------------------------------
# Routing ops.

def _route(pre: torch.Tensor, routing: str, param: int, theta=None) -> tuple[SparseActs, torch.Tensor]:
    if _backend.use_kernel("sae_route", pre.device):
        row_ptr, feature, value, cutoff = _ops.sae_route(pre, routing, param, theta)
        return SparseActs(row_ptr, feature, value), cutoff
    mask = _reference.route_mask(pre.detach(), routing, param, theta)
    acts = SparseActs(*_reference.csr_from_dense(pre, mask))
    return acts, _reference_cutoff(pre.detach(), routing, param)


def _reference_cutoff(pre: torch.Tensor, routing: str, param: int) -> torch.Tensor:
    acc = torch.float64 if pre.dtype == torch.float64 else torch.float32
    if routing == "feature_choice":
        return _reference.feature_choice_cutoff(pre, param).to(acc)
    if routing == "mutual_choice":
        pos = pre[pre > 0].double()
        if param == 0:
            return torch.full((1,), math.inf, dtype=acc, device=pre.device)
        if pos.numel() <= param:
            return torch.zeros(1, dtype=acc, device=pre.device)
        return pos.sort(descending=True).values[param - 1:param].to(acc)
    return torch.empty(0, dtype=acc, device=pre.device)


def topk_route(pre: torch.Tensor, k: int, *, dense: bool = False):
    """Token choice: each row keeps its k largest positive pre-activations.

    Returns :class:`SparseActs`, or with `dense=True` a :class:`TopKOutput` of `(B, k)` rectified
    values and indices (best first; rows with fewer than k positive entries are padded with zero
    values at their best non-positive features). Ties: larger value first, then smaller index.
    """
    _check_tensor(pre, "pre", 2)
    k = _check_int(k, "k", 1, pre.shape[1])
    if dense:
        if _backend.use_kernel("sae_topk_select", pre.device):
            values, indices = _ops.sae_topk_select(pre, k)
        else:
            values, indices = _reference.topk_select(pre, k)
        return TopKOutput(values.relu(), indices)
    return _route(pre, "topk", k)[0]


def feature_choice_route(pre: torch.Tensor, m: int) -> SparseActs:
    """Feature choice: each feature (column) keeps its m largest positive tokens of the batch.
    m = 0 keeps nothing; m >= B keeps every positive entry. Ties: smaller token first."""
    _check_tensor(pre, "pre", 2)
    return _route(pre, "feature_choice", _check_int(m, "m", 0))[0]


def mutual_choice_route(pre: torch.Tensor, budget: int) -> SparseActs:
    """Mutual choice (= BatchTopK): the `budget` largest positive entries of the whole (B, F)
    matrix. Ties: smaller flat index b·F + f first."""
    _check_tensor(pre, "pre", 2)
    return _route(pre, "mutual_choice", _check_int(budget, "budget", 0))[0]


def threshold_route(pre: torch.Tensor, theta) -> SparseActs:
    """Threshold (inference for the batch-dependent routings): keep pre > θ_f (and pre > 0);
    `theta` is one value per feature `(F,)` or a single global value."""
    _check_tensor(pre, "pre", 2)
    theta = _check_theta(theta, pre)
    return _route(pre, "threshold", 0, theta)[0]


# ---------------------------------------------------------------------------------------------
# Fused encode and sparse decode.

def _check_encoder(x, W_enc, b_enc, b_dec) -> None:
    _check_tensor(x, "x", 2)
    _check_tensor(W_enc, "W_enc", 2)
    d = x.shape[1]
    if W_enc.shape[0] != d:
        raise ValueError(f"W_enc must have shape (d, F) with d = {d}, got {tuple(W_enc.shape)}")
    F = W_enc.shape[1]
    for name, t, n in (("b_enc", b_enc, F), ("b_dec", b_dec, d)):
        _check_tensor(t, name, 1)
        if t.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec)):
        _check_same(t, x, name, "x")


def _encode(x, W_enc, b_enc, b_dec, routing: str, param: int, theta=None) -> tuple[SparseActs, torch.Tensor]:
    if _backend.use_kernel("sae_encode", x.device):
        row_ptr, feature, value, cutoff = _ops.sae_encode(x, W_enc, b_enc, b_dec, routing, param, theta)
        return SparseActs(row_ptr, feature, value), cutoff
    pre = (x - b_dec) @ W_enc + b_enc
    return _route(pre, routing, param, theta)


def sae_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
               routing: str = "topk", k: int | None = None, *, m: int | None = None,
               budget: int | None = None, theta=None) -> SparseActs:
    """Fused encoder: pre = (x − b_dec)·W_enc + b_enc, then the routing, as :class:`SparseActs`.

    routing "topk" (k), "feature_choice" (m, default ceil(k·B/F)), "mutual_choice" (budget,
    default k·B) or "threshold" (theta). The dense pre-activations are freed before returning;
    backward gives sparse-dense gradients for x, W_enc, b_enc and b_dec.
    """
    _check_encoder(x, W_enc, b_enc, b_dec)
    if routing == "threshold":
        theta = _check_theta(theta, x.new_empty(0, W_enc.shape[1]))
        return _encode(x, W_enc, b_enc, b_dec, "threshold", 0, theta)[0]
    param = _routing_param(routing, k, m, budget, x.shape[0], W_enc.shape[1])
    return _encode(x, W_enc, b_enc, b_dec, routing, param)[0]


def _check_acts(acts, W_dec: torch.Tensor) -> SparseActs:
    if not isinstance(acts, tuple) or len(acts) != 3:
        raise TypeError("acts must be SparseActs(row_ptr, feature, value)")
    row_ptr, feature, value = acts
    for name, t in (("row_ptr", row_ptr), ("feature", feature)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise TypeError(f"acts.{name} must be a 1-D int64 tensor")
    _check_tensor(value, "acts.value", 1)
    if row_ptr.numel() < 1 or value.shape[0] != feature.shape[0]:
        raise ValueError(f"acts must have row_ptr of B + 1 entries and value, feature of one length; got "
                         f"{row_ptr.numel()}, {value.shape[0]}, {feature.shape[0]}")
    _check_same(W_dec, value, "W_dec", "acts.value")
    for name, t in (("row_ptr", row_ptr), ("feature", feature)):
        if t.device != value.device:
            raise ValueError(f"acts.{name} is on {t.device} but acts.value is on {value.device}")
    return SparseActs(row_ptr, feature, value)


def _check_indices(acts: SparseActs, num_latents: int) -> None:
    """Index ranges of a user-supplied CSR (reads values back: a sync on CUDA)."""
    row_ptr, feature, _ = acts
    nnz = feature.numel()
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((row_ptr.diff() < 0).any()):
        raise ValueError(f"acts.row_ptr must rise from 0 to nnz = {nnz}")
    if nnz and (int(feature.min()) < 0 or int(feature.max()) >= num_latents):
        raise ValueError(f"acts.feature must lie in [0, {num_latents})")


def sparse_decode(acts, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None, *,
                  check_indices: bool = True) -> torch.Tensor:
    """x̂_b = Σ_{(b, f) stored} value·W_dec[f] + b_dec, accumulated in fp32 (fp64 for fp64).

    acts: :class:`SparseActs` (or a `(row_ptr, feature, value)` tuple); W_dec (F, d); b_dec (d,) or
    None. check_indices: validate row_ptr and feature (a host sync on CUDA; pass False for
    activations made by this module's routings).
    """
    _check_tensor(W_dec, "W_dec", 2)
    acts = _check_acts(acts, W_dec)
    if b_dec is not None:
        _check_tensor(b_dec, "b_dec", 1)
        _check_same(b_dec, W_dec, "b_dec", "W_dec")
        if b_dec.shape[0] != W_dec.shape[1]:
            raise ValueError(f"b_dec must have shape ({W_dec.shape[1]},), got {tuple(b_dec.shape)}")
    if check_indices:
        _check_indices(acts, W_dec.shape[0])
    if _backend.use_kernel("sae_gather_rows", W_dec.device):
        return _ops.sae_gather_rows(acts.row_ptr, acts.feature, acts.value, W_dec, b_dec)
    out = _reference.decode(acts.to_dense(W_dec.shape[0]), W_dec, b_dec if b_dec is not None else 0)
    return out


# ---------------------------------------------------------------------------------------------
# Autograd and fake kernels of the compiled ops. Registered only when `_C` defines them.

def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_csr(pre_like: torch.Tensor, B: int, F: int, routing: str):
    nnz = torch.library.get_ctx().new_dynamic_size()
    cut = {"feature_choice": F, "mutual_choice": 1}.get(routing, 0)
    return (pre_like.new_empty(B + 1, dtype=torch.int64), pre_like.new_empty(nnz, dtype=torch.int64),
            pre_like.new_empty(nnz), pre_like.new_empty(cut, dtype=_acc(pre_like.dtype)))


def _fake_route(pre, routing, k, theta):
    return _fake_csr(pre, pre.shape[0], pre.shape[1], routing)


def _fake_encode(x, W_enc, b_enc, b_dec, routing, k, theta):
    return _fake_csr(x, x.shape[0], W_enc.shape[1], routing)


def _fake_topk_select(pre, k):
    return pre.new_empty(pre.shape[0], k), pre.new_empty(pre.shape[0], k, dtype=torch.int64)


def _fake_gather_rows(row_ptr, feature, value, table, bias):
    return table.new_empty(row_ptr.shape[0] - 1, table.shape[1])


def _fake_sampled_dot(row_ptr, feature, grad, table):
    return grad.new_empty(feature.shape[0])


def _fake_csc(row_ptr, feature, num_cols):
    return (feature.new_empty(num_cols + 1), feature.new_empty(feature.shape[0]),
            feature.new_empty(feature.shape[0]))


def _fake_segment_sum(col_ptr, perm, token, coef, src):
    F = col_ptr.shape[0] - 1
    return src.new_empty(F, src.shape[1]), coef.new_empty(F)


def _dense_grad_of_csr(row_ptr, feature, grad_value, shape):
    """d/dpre of values gathered at the stored entries: the upstream gradient scattered back."""
    return _reference.dense_from_csr(row_ptr, feature, grad_value, shape[1])


def _route_setup(ctx, inputs, output):
    pre = inputs[0]
    row_ptr, feature, _, cutoff = output
    ctx.mark_non_differentiable(row_ptr, feature, cutoff)
    ctx.set_materialize_grads(False)
    ctx.shape = pre.shape
    ctx.save_for_backward(row_ptr, feature)


def _route_backward(ctx, _g_row_ptr, _g_feature, grad_value, _g_cutoff):
    if grad_value is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    row_ptr, feature = ctx.saved_tensors
    return _dense_grad_of_csr(row_ptr, feature, grad_value, ctx.shape), None, None, None


def _topk_setup(ctx, inputs, output):
    pre = inputs[0]
    _, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)
    ctx.shape = pre.shape
    ctx.save_for_backward(indices)


def _topk_backward(ctx, grad_values, _g_indices):
    if grad_values is None or not ctx.needs_input_grad[0]:
        return None, None
    (indices,) = ctx.saved_tensors
    grad = grad_values.new_zeros(ctx.shape)
    return grad.scatter(1, indices, grad_values), None


def _encode_setup(ctx, inputs, output):
    x, W_enc, _, b_dec = inputs[:4]
    row_ptr, feature, _, cutoff = output
    ctx.mark_non_differentiable(row_ptr, feature, cutoff)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, W_enc, b_dec, row_ptr, feature)


def _encode_backward(ctx, _g_row_ptr, _g_feature, grad_value, _g_cutoff):
    """Sparse gradients of the fused encoder. dpre = dvalue at the kept entries (each kept
    pre-activation is > 0, so ReLU' = 1) and zero elsewhere:
    dW_enc[:, f] = Σ_b dpre_bf (x_b − b_dec)  (per feature, fixed order),  db_enc = Σ_b dpre_b,
    dx_b = Σ_f dpre_bf W_enc[:, f],  db_dec = −W_enc·db_enc."""
    none = (None,) * 7
    if grad_value is None:
        return none
    x, W_enc, b_dec, row_ptr, feature = ctx.saved_tensors
    need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
    grad_value = grad_value.contiguous()
    dx = dW_enc = db_enc = db_dec = None
    if need_w or need_be or need_bd:
        col_ptr, perm, token = _ops._sae_csc(row_ptr, feature, W_enc.shape[1])
        # dW_enc is built as its (F, d) transpose, rows written whole; returned as a (d, F) view,
        # which matches an encoder weight stored as (F, d) memory (SparseAutoencoder's layout).
        dW_enc_t, db_enc = _ops._sae_segment_sum(col_ptr, perm, token, grad_value, x - b_dec)
        dW_enc = dW_enc_t.t() if need_w else None
        if need_bd:
            db_dec = -(W_enc @ db_enc)
        if not need_be:
            db_enc = None
    if need_x:
        dx = _ops.sae_gather_rows(row_ptr, feature, grad_value, W_enc.t(), None)
    return dx, dW_enc, db_enc, db_dec, None, None, None


def _gather_setup(ctx, inputs, output):
    row_ptr, feature, value, table, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(row_ptr, feature, value, table)


def _gather_backward(ctx, grad_out):
    """dvalue_j = grad[b_j]·table[f_j] (dot products at the stored entries only);
    dtable[f] = Σ_{j in feature f} value_j·grad[b_j] (per feature, fixed order); dbias = Σ_b grad_b."""
    row_ptr, feature, value, table = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dvalue = dtable = dbias = None
    if ctx.needs_input_grad[2]:
        dvalue = _ops._sae_sampled_dot(row_ptr, feature, grad_out, table)
    if ctx.needs_input_grad[3]:
        col_ptr, perm, token = _ops._sae_csc(row_ptr, feature, table.shape[0])
        dtable = _ops._sae_segment_sum(col_ptr, perm, token, value, grad_out)[0]
    if ctx.has_bias and ctx.needs_input_grad[4]:
        dbias = grad_out.sum(0)
    return None, None, dvalue, dtable, dbias


def _register() -> None:
    if not _backend.has_extension() or not hasattr(_ops, "sae_route"):
        return
    lib = "fusedtrain::"
    for name, fake in (("sae_route", _fake_route), ("sae_encode", _fake_encode),
                       ("sae_topk_select", _fake_topk_select), ("sae_gather_rows", _fake_gather_rows),
                       ("_sae_sampled_dot", _fake_sampled_dot), ("_sae_csc", _fake_csc),
                       ("_sae_segment_sum", _fake_segment_sum)):
        torch.library.register_fake(lib + name)(fake)
    torch.library.register_autograd(lib + "sae_route", _route_backward, setup_context=_route_setup)
    torch.library.register_autograd(lib + "sae_topk_select", _topk_backward, setup_context=_topk_setup)
    torch.library.register_autograd(lib + "sae_encode", _encode_backward, setup_context=_encode_setup)
    torch.library.register_autograd(lib + "sae_gather_rows", _gather_backward, setup_context=_gather_setup)


_register()


# ---------------------------------------------------------------------------------------------
# The module.

class ForwardOutput(NamedTuple):
    sae_out: torch.Tensor          # (B, d) reconstruction
    latent_acts: SparseActs        # the kept latents
    fvu: torch.Tensor              # fraction of variance unexplained
    auxk_loss: torch.Tensor        # AuxK loss of the dead latents (0 when none are dead)
    loss: torch.Tensor             # fvu + auxk_alpha · auxk_loss
    num_dead: int                  # latents dead before this batch


class SparseAutoencoder(nn.Module):
    """TopK / feature-choice / mutual-choice sparse autoencoder with SAELens parameter names.

    Parameters `W_enc (d, F)`, `b_enc (F,)`, `W_dec (F, d)`, `b_dec (d,)`. `W_enc` is stored as the
    transpose of an (F, d) matrix, so its backward rows are written whole (`load_state_dict` copies
    any layout in). Buffers: `num_tokens_since_fired (F,)` (dead-latent counters) and `threshold`
    (EMA of each feature's selection cutoff, for threshold inference of the batch-dependent
    routings; used in eval mode once trained, see `use_threshold`).

    routing: "topk" (each token keeps k latents), "feature_choice" (each latent keeps
    m = ceil(k·B/F) tokens, or the `m` given), "mutual_choice" (the k·B best entries of the batch).
    AuxK (Gao et al.): latents that fired on none of the last `dead_tokens_threshold` tokens are
    dead; the top `k_aux` (default d/2) of them reconstruct the detached residual, weight `auxk_alpha`.
    """

    def __init__(self, d_in: int, num_latents: int, routing: str = "topk", k: int = 32, *,
                 m: int | None = None, k_aux: int | None = None, auxk_alpha: float = 1 / 32,
                 dead_tokens_threshold: int = 10_000_000, threshold_decay: float = 0.99,
                 use_threshold: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        _check_int(d_in, "d_in", 1)
        _check_int(num_latents, "num_latents", 1)
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        _check_int(k, "k", 1, num_latents if routing == "topk" else None)
        if m is not None:
            _check_int(m, "m", 0)
        if not 0.0 <= threshold_decay < 1.0:
            raise ValueError(f"threshold_decay must be in [0, 1), got {threshold_decay}")
        self.d_in, self.num_latents, self.routing, self.k, self.m = d_in, num_latents, routing, k, m
        self.k_aux = k_aux if k_aux is not None else d_in // 2
        self.auxk_alpha, self.dead_tokens_threshold = auxk_alpha, dead_tokens_threshold
        self.threshold_decay, self.use_threshold = threshold_decay, use_threshold
        kw = dict(device=device, dtype=dtype)
        enc = torch.empty(num_latents, d_in, **kw)
        nn.init.uniform_(enc, -1 / math.sqrt(d_in), 1 / math.sqrt(d_in))  # nn.Linear's default
        self.W_enc = nn.Parameter(enc.t())
        self.b_enc = nn.Parameter(torch.zeros(num_latents, **kw))
        self.W_dec = nn.Parameter(enc.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        self.set_decoder_norm_to_unit_norm()
        self.register_buffer("num_tokens_since_fired", torch.zeros(num_latents, dtype=torch.int64, device=device))
        self.register_buffer("threshold", torch.zeros(num_latents, dtype=torch.float32, device=device))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.int64, device=device))

    # -- loaders ------------------------------------------------------------------------------
    @classmethod
    def from_saelens_state_dict(cls, state_dict: dict, routing: str = "topk", k: int = 32, **kw):
        """From SAELens names: W_enc (d, F), W_dec (F, d), b_enc (F,), b_dec (d,)."""
        d, F = state_dict["W_enc"].shape
        sae = cls(d, F, routing, k, device=state_dict["W_enc"].device, dtype=state_dict["W_enc"].dtype, **kw)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(state_dict[name])
            for name in ("num_tokens_since_fired", "threshold", "threshold_steps"):
                if name in state_dict:
                    getattr(sae, name).copy_(state_dict[name])
        return sae

    @classmethod
    def from_sparsify_state_dict(cls, state_dict: dict, routing: str = "topk", k: int = 32, **kw):
        """From sparsify's `SparseCoder` names: encoder.weight (F, d), encoder.bias (F,), W_dec (F, d), b_dec (d,)."""
        weight = state_dict["encoder.weight"]
        return cls.from_saelens_state_dict({"W_enc": weight.t(), "b_enc": state_dict["encoder.bias"],
                                            "W_dec": state_dict["W_dec"], "b_dec": state_dict["b_dec"]},
                                           routing, k, **kw)

    # -- decoder constraints ------------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(eps))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of W_dec.grad each row's component along its (unit) decoder direction."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    # -- encode / decode ------------------------------------------------------------------------
    def _uses_threshold(self) -> bool:
        return (not self.training and self.use_threshold and self.routing != "topk"
                and bool(self.threshold_steps > 0))

    def encode(self, x: torch.Tensor) -> SparseActs:
        """Sparse latents of x (B, d). In eval mode the batch-dependent routings switch to
        threshold routing with the learned EMA thresholds (when trained and `use_threshold`)."""
        return self._encode_with_cutoff(x)[0]

    def _encode_with_cutoff(self, x: torch.Tensor):
        if self._uses_threshold():
            return _encode(x, self.W_enc, self.b_enc, self.b_dec, "threshold", 0, self.threshold)[0], None
        _check_encoder(x, self.W_enc, self.b_enc, self.b_dec)
        param = _routing_param(self.routing, self.k, self.m, None, x.shape[0], self.num_latents)
        return _encode(x, self.W_enc, self.b_enc, self.b_dec, self.routing, param)

    def decode(self, acts: SparseActs) -> torch.Tensor:
        return sparse_decode(acts, self.W_dec, self.b_dec, check_indices=False)

    @torch.no_grad()
    def _update_statistics(self, acts: SparseActs, cutoff: torch.Tensor | None, batch: int) -> None:
        fired = torch.bincount(acts.feature, minlength=self.num_latents) > 0
        self.num_tokens_since_fired.add_(batch).masked_fill_(fired, 0)
        if cutoff is None or self.routing == "topk" or cutoff.numel() == 0:
            return
        cut = cutoff.float().expand(self.num_latents)
        valid = torch.isfinite(cut)
        first = self.threshold_steps == 0
        w = torch.where(first, torch.ones((), device=cut.device), torch.full((), 1 - self.threshold_decay,
                                                                              device=cut.device))
        self.threshold.copy_(torch.where(valid, self.threshold + w * (cut - self.threshold), self.threshold))
        self.threshold_steps.add_(1)

    def _auxk_loss(self, x: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        num_dead = int(dead.sum())
        k_aux = min(self.k_aux, num_dead)
        if k_aux == 0:
            return x.new_zeros(())
        idx = dead.nonzero().squeeze(1)
        pre = (x - self.b_dec) @ self.W_enc[:, idx] + self.b_enc[idx]  # dead columns only
        values, top = pre.topk(k_aux, dim=1, sorted=False)
        recon = (values.relu().unsqueeze(2) * self.W_dec[idx][top]).sum(1)  # no b_dec
        target = residual.detach()
        total = (target - target.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
        return (recon - target).pow(2).sum() / total

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """Reconstruction, latents, FVU, AuxK loss (training only) and the dead-latent count.
        In training mode also updates the dead-latent counters and the EMA thresholds."""
        acts, cutoff = self._encode_with_cutoff(x)
        sae_out = self.decode(acts)
        residual = sae_out - x
        total_variance = (x - x.mean(0)).pow(2).sum()
        fvu = residual.pow(2).sum() / total_variance
        dead = self.num_tokens_since_fired > self.dead_tokens_threshold
        num_dead = int(dead.sum())
        auxk = self._auxk_loss(x, -residual, dead) if self.training and num_dead else x.new_zeros(())
        if self.training:
            self._update_statistics(acts, cutoff, x.shape[0])
        return ForwardOutput(sae_out, acts, fvu, auxk, fvu + self.auxk_alpha * auxk, num_dead)

    def extra_repr(self) -> str:
        m = f", m={self.m}" if self.m is not None else ""
        return f"d_in={self.d_in}, num_latents={self.num_latents}, routing={self.routing!r}, k={self.k}{m}"


def _selftest(device: str) -> list[tuple[str, float]]:
    """(label, max relative gradient error) of one float64 SAE step per routing against the dense
    reference on `device`: the `python -m fusedtrain selftest` check of this family."""
    gen = torch.Generator().manual_seed(0)
    B, d, F, k = 64, 48, 300, 8
    x, W_enc, b_enc, b_dec, W_dec = (torch.randn(*s, generator=gen, dtype=torch.float64).to(device) * c
                                     for s, c in (((B, d), 1.0), ((d, F), 0.15), ((F,), 0.1), ((d,), 0.1),
                                                  ((F, d), 0.15)))
    results = []
    for routing in ROUTINGS:
        param = _routing_param(routing, k, None, None, B, F)
        ours = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
        acts = sae_encode(*ours[:4], routing, **{"topk": {"k": param}, "feature_choice": {"m": param},
                                                 "mutual_choice": {"budget": param}}[routing])
        sparse_decode(acts, ours[4], ours[3]).pow(2).sum().backward()
        refs = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
        dense = _reference.encode(*refs[:4], routing, param)
        _reference.decode(dense, refs[4], refs[3]).pow(2).sum().backward()
        err = max(((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-300)).item() for a, b in zip(ours, refs))
        results.append((f"sae step routing={routing}", err))
    return results
