"""Fused linear spherical loss (spec/spherical.md, "Fused linear op"): functional API, autograd, fake
kernels, the cached-statistics head, and the chunked evaluation top-k.

`linear_spherical_loss(h, W, t)` equals `spherical_loss(F.linear(h, W, b), t)` but never forms the
N x D logits: a spherical loss needs only `s = Σo`, `q = Σo²` and `o_c` per row, and with the Gram
matrix `Q = WᵀW` and the column sums `w̄ = Wᵀ1` these are `h·w̄`, `hᵀQh` and `W_c·h`. (The op keeps
the Gram matrix centered about the mean row, `C = Q − w̄w̄ᵀ/D`, formed from centered rows, so that
the spread `Σ(o − mean)² = hᵀCh` never comes as a difference of large numbers.) The cost is
about `3·D·d²` (Q, then `W·M` in backward) plus `O(N·d²)`, against `6·N·D·d` for a fused cross-entropy.
`Q` and `w̄` depend on the weight only: `SphericalHead` caches them while the weight is unchanged.
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

from . import _backend
from . import spherical as _spherical
from .reference import linear_spherical as _reference

__all__ = ["LinearStats", "linear_spherical_stats", "linear_spherical_loss", "linear_topk",
           "LinearSphericalLoss", "SphericalHead"]

OP = "linear_spherical_loss"
LinearStats = collections.namedtuple("LinearStats", ["gram", "colsum"])
TopK = collections.namedtuple("TopK", ["values", "indices"])


def _check_tensors(input, linear_weight, target, linear_bias) -> None:
    """Python-side checks with the torch argument names (the C++ op checks again)."""
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if linear_bias is not None and not isinstance(linear_bias, torch.Tensor):
        raise TypeError(f"linear_bias must be a torch.Tensor or None, got {type(linear_bias).__name__}")
    if linear_weight.dtype not in _spherical._SUPPORTED_DTYPES:
        raise TypeError(f"linear_weight must be float32, float64, bfloat16 or float16, got {linear_weight.dtype}")
    if linear_weight.dim() != 2 or linear_weight.shape[0] == 0:
        raise ValueError(f"linear_weight must have shape (D, d) with D >= 1, got {tuple(linear_weight.shape)}")
    if input.dtype != linear_weight.dtype:
        raise TypeError(f"input must have linear_weight's dtype {linear_weight.dtype}, got {input.dtype}")
    if input.dim() < 1 or input.shape[-1] != linear_weight.shape[1]:
        raise ValueError(f"input must have shape (..., {linear_weight.shape[1]}) for linear_weight of shape "
                         f"{tuple(linear_weight.shape)}, got {tuple(input.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if linear_bias is not None:
        if tuple(linear_bias.shape) != (linear_weight.shape[0],):
            raise ValueError(f"linear_bias must have shape ({linear_weight.shape[0]},), got "
                             f"{tuple(linear_bias.shape)}")
        if linear_bias.dtype != linear_weight.dtype:
            raise TypeError(f"linear_bias must have linear_weight's dtype {linear_weight.dtype}, got "
                            f"{linear_bias.dtype}")
    for name, t in (("input", input), ("target", target), ("linear_bias", linear_bias)):
        if t is not None and t.device != linear_weight.device:
            raise ValueError(f"{name} is on {t.device} but linear_weight is on {linear_weight.device}")


def linear_spherical_stats(linear_weight: torch.Tensor, linear_bias: torch.Tensor | None = None) -> LinearStats:
    """The statistics of the augmented weight W' = [W | bias] (d' = d + 1 with a bias, else d) that
    the fused loss reads: `gram`, its centered Gram matrix Σ_k (W'_k − m)(W'_k − m)ᵀ about the mean
    row m (d', d'), and `colsum`, its column sums (d',); fp32 (fp64 for fp64 weights). Centered, so
    a row's spread Σ(o_k − mean)² comes without cancellation when the logits share a large offset.
    Not differentiable: the loss's backward accounts for the weight's role in them."""
    if not _backend.use_kernel(OP, linear_weight.device):
        w = linear_weight.detach()
        if linear_bias is not None:
            w = torch.cat([w, linear_bias.detach().unsqueeze(1)], dim=1)
        w = w.to(_spherical._accumulate_dtype(w.dtype))
        centered = w - w.mean(0)
        return LinearStats(centered.t() @ centered, w.sum(0))
    bias = None if linear_bias is None else linear_bias.detach()
    return LinearStats(*torch.ops.fusedtrain._linear_spherical_gram(linear_weight.detach(), bias))


def linear_spherical_loss(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                          linear_bias: torch.Tensor | None = None, kind: str = "z",
                          a: float = _spherical.DEFAULT_A, b: float = _spherical.DEFAULT_B,
                          eps: float = _spherical.DEFAULT_EPS, var_eps: float = _spherical.DEFAULT_VAR_EPS,
                          ignore_index: int = -100, reduction: str = "mean", check_target: bool = True,
                          stats: LinearStats | None = None) -> torch.Tensor:
    """Spherical-family loss of the logits `input @ linear_weight.T + linear_bias`, without forming them.

    Arguments as `torch.nn.functional.linear_cross_entropy` (input (..., d), linear_weight (D, d),
    target (...) int64, optional linear_bias (D,)) and as :func:`fusedtrain.spherical_loss` (kind,
    a, b, eps, var_eps, ignore_index, reduction, check_target). Gradients flow to input,
    linear_weight and linear_bias.

    stats: the weight's :func:`linear_spherical_stats`, when the caller has them (e.g. cached across
      micro-batches by :class:`fusedtrain.nn.SphericalHead`); they must be those of this very
      weight and bias, else the loss is wrong. Computed here when None.
    check_target: as in :func:`fusedtrain.spherical_loss` (False: out-of-range rows give NaN).
    Numerics: statistics and products accumulate in fp32 (fp64 for fp64). The row spread comes from
    the centered Gram matrix, so a large common offset of the logits costs the loss no precision;
    the gradients' `W·M + 1·aᵀ` still cancels by about offset/spread, as any factored form must
    (measured in fp32, Z-loss, offset/spread = 1000: gradients within 1.2e-5 of float64, the fp32
    logits path within 3.1e-5; at 100: 1.1e-6).
    """
    _check_tensors(input, linear_weight, target, linear_bias)
    _spherical._check_hyperparameters(kind, a, b, eps, var_eps, ignore_index, reduction)
    if not _backend.use_kernel(OP, linear_weight.device):
        return _reference.linear_spherical_loss(input, linear_weight, target, linear_bias=linear_bias,
                                                kind=kind, a=a, b=b, eps=eps, var_eps=var_eps,
                                                ignore_index=ignore_index, reduction=reduction)
    out_shape = target.shape
    h = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1)
    if stats is None:
        stats = linear_spherical_stats(linear_weight, linear_bias)
    loss, _, _ = torch.ops.fusedtrain.linear_spherical_loss(
        h, linear_weight, linear_bias, t, stats[0].detach(), stats[1].detach(), kind, float(a), float(b),
        float(eps), float(var_eps), int(ignore_index), reduction, bool(check_target))
    return loss.reshape(out_shape) if reduction == "none" else loss


def linear_topk(input: torch.Tensor, linear_weight: torch.Tensor, k: int, *,
                linear_bias: torch.Tensor | None = None, chunk: int = 8192) -> TopK:
    """The k largest logits of `input @ linear_weight.T + linear_bias` per row, largest first, and their
    class indices, for evaluation (no gradient). Streams over `chunk` classes at a time: memory is
    O(N·(chunk + k)), never the N x D logits. bf16/fp16 logits are formed in fp32 (a chunk of the
    weight upcast at a time) so that rounding does not create ties; the values come back in the
    input's dtype. Ties between equal logits resolve in any order."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    dummy_target = torch.empty(input.shape[:-1], dtype=torch.int64, device=input.device)
    _check_tensors(input, linear_weight, dummy_target, linear_bias)
    D = linear_weight.shape[0]
    if k > D:
        raise ValueError(f"k must be <= the number of classes {D}, got {k}")
    values = indices = None
    work = _spherical._accumulate_dtype(input.dtype)
    with torch.no_grad():
        x = input.to(work)
        for start in range(0, D, chunk):
            stop = min(D, start + chunk)
            bias = None if linear_bias is None else linear_bias[start:stop].to(work)
            logits = F.linear(x, linear_weight[start:stop].to(work), bias)
            v, i = logits.topk(min(k, stop - start), dim=-1)
            i += start
            if values is not None:  # merge with the best so far
                merged = torch.cat([values, v], dim=-1)
                v, pos = merged.topk(min(k, merged.shape[-1]), dim=-1)
                i = torch.cat([indices, i], dim=-1).gather(-1, pos)
            values, indices = v, i
    return TopK(values.to(input.dtype), indices)


class LinearSphericalLoss(torch.nn.Module):
    """Module form of :func:`linear_spherical_loss`:
    `criterion(input, linear_weight, target, linear_bias=None)`."""

    def __init__(self, kind: str = "z", *, a: float = _spherical.DEFAULT_A, b: float = _spherical.DEFAULT_B,
                 eps: float = _spherical.DEFAULT_EPS, var_eps: float = _spherical.DEFAULT_VAR_EPS,
                 ignore_index: int = -100, reduction: str = "mean", check_target: bool = True) -> None:
        super().__init__()
        _spherical._check_hyperparameters(kind, a, b, eps, var_eps, ignore_index, reduction)
        self.kind, self.a, self.b, self.eps, self.var_eps = kind, a, b, eps, var_eps
        self.ignore_index, self.reduction, self.check_target = ignore_index, reduction, check_target

    def _loss_kwargs(self) -> dict:
        return dict(kind=self.kind, a=self.a, b=self.b, eps=self.eps, var_eps=self.var_eps,
                    ignore_index=self.ignore_index, reduction=self.reduction, check_target=self.check_target)

    def forward(self, input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                linear_bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_spherical_loss(input, linear_weight, target, linear_bias=linear_bias,
                                     **self._loss_kwargs())

    def extra_repr(self) -> str:
        hyper = f"a={self.a}, b={self.b}, var_eps={self.var_eps}" if self.kind == "z" else f"eps={self.eps}"
        return f"kind={self.kind!r}, {hyper}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class SphericalHead(LinearSphericalLoss):
    """A classifier head `o = W·h + bias` trained with a spherical loss through the fused op.

    `head(h, target)` returns the loss; `head.logits(h)` and `head.topk(h, k)` evaluate. The weight's
    Gram matrix and column sums are cached and reused while `weight` and `bias` are unchanged: same
    storage and same tensor version (an optimizer's in-place step bumps the version), so
    gradient-accumulation micro-batches and evaluation compute them once per optimizer step.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, kind: str = "z", *,
                 device=None, dtype=None, **loss_kwargs) -> None:
        super().__init__(kind, **loss_kwargs)
        layer = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.weight = layer.weight  # nn.Linear's initialization
        self.bias = layer.bias
        self.in_features, self.num_classes = in_features, num_classes
        self._stats: LinearStats | None = None
        self._stats_key = None

    def _key(self) -> tuple:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None
                     for t in (self.weight, self.bias))

    def stats(self) -> LinearStats:
        """The cached (gram, colsum), recomputed when the weight or bias changed."""
        key = self._key()
        if self._stats is None or key != self._stats_key:
            self._stats = linear_spherical_stats(self.weight, self.bias)
            self._stats_key = key
        return self._stats

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        stats = None if torch.compiler.is_compiling() else self.stats()
        return linear_spherical_loss(input, self.weight, target, linear_bias=self.bias, stats=stats,
                                     **self._loss_kwargs())

    def logits(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)

    def topk(self, input: torch.Tensor, k: int, *, chunk: int = 8192) -> TopK:
        return linear_topk(input, self.weight, k, linear_bias=self.bias, chunk=chunk)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"bias={self.bias is not None}, {super().extra_repr()}")


# ---------------------------------------------------------------------------------------------
# Autograd and fake (meta) kernels for the compiled ops. Registered only when `_C` defines them.

def _fake_gram(linear_weight, linear_bias):
    dp = linear_weight.shape[1] + (linear_bias is not None)
    acc = _spherical._accumulate_dtype(linear_weight.dtype)
    return linear_weight.new_empty((dp, dp), dtype=acc), linear_weight.new_empty((dp,), dtype=acc)


def _fake_loss(input, linear_weight, linear_bias, target, gram, colsum, kind, a, b, eps, var_eps,
               ignore_index, reduction, check_target):
    n = input.shape[0]
    dp = input.shape[1] + (linear_bias is not None)
    acc = _spherical._accumulate_dtype(input.dtype)
    loss = input.new_empty((n,) if reduction == "none" else ())
    return loss, input.new_empty((n, 3), dtype=acc), input.new_empty((n, dp), dtype=acc)


def _fake_backward(grad_loss, input, linear_weight, linear_bias, target, colsum, coef, proj, ignore_index,
                   output_mask):
    def maybe(shape, wanted):
        return input.new_empty(shape if wanted else (0,))
    return (maybe(input.shape, output_mask[0]), maybe(linear_weight.shape, output_mask[1]),
            maybe((linear_weight.shape[0],), output_mask[2] and linear_bias is not None))


def _setup_context(ctx, inputs, output):
    input, weight, bias, target, _gram, colsum = inputs[:6]
    _, coef, proj = output
    ctx.ignore_index = inputs[11]
    ctx.mark_non_differentiable(coef, proj)
    ctx.set_materialize_grads(False)  # no zeros for the non-differentiable outputs
    ctx.save_for_backward(input, weight, bias, target, colsum, coef, proj)


def _backward(ctx, grad_loss, _grad_coef, _grad_proj):
    input, weight, bias, target, colsum, coef, proj = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
            bool(ctx.needs_input_grad[2]) and bias is not None]
    if grad_loss is None or not any(mask):
        return (None,) * 14
    grads = torch.ops.fusedtrain._linear_spherical_loss_backward(
        grad_loss, input, weight, bias, target, colsum, coef, proj, ctx.ignore_index, mask)
    return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,) * 11


def _register() -> None:
    if not _backend.has_extension() or not hasattr(torch.ops.fusedtrain, OP):
        return
    torch.library.register_fake("fusedtrain::_linear_spherical_gram")(_fake_gram)
    torch.library.register_fake("fusedtrain::linear_spherical_loss")(_fake_loss)
    torch.library.register_fake("fusedtrain::_linear_spherical_loss_backward")(_fake_backward)
    torch.library.register_autograd("fusedtrain::linear_spherical_loss", _backward,
                                    setup_context=_setup_context)


_register()
