"""The fused linear spherical loss and its helpers (maths: docs/spherical.md, "Fused linear op"):
`linear_spherical_loss`, `linear_spherical_stats` and the chunked evaluation top-k `linear_topk`.

`linear_spherical_loss(h, W, t)` equals `spherical_loss(F.linear(h, W, b), t)` but never forms the
N x D logits: a spherical loss needs only `s = Σo`, `q = Σo²` and `o_c` per row, and with the Gram
matrix `Q = WᵀW` and the column sums `w̄ = Wᵀ1` these are `h·w̄`, `hᵀQh` and `W_c·h`. (The op keeps
the Gram matrix centered about the mean row, `C = Q − w̄w̄ᵀ/D`, formed from centered rows, so that
the spread `Σ(o − mean)² = hᵀCh` never comes as a difference of large numbers.) The cost is
about `4·D·d² + 4·N·d²` (the Gram matrix, `W·M` in backward, the per-row products), against `6·N·D·d`
for a fused cross-entropy. `Q` and `w̄` depend on the weight only: `SphericalHead` caches them while
the weight is unchanged.
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

from .._core import autocast, backend
from .._core.dtypes import accumulate_dtype
from . import linear_reference as _reference
from .checks import (DEFAULT_A, DEFAULT_B, DEFAULT_EPS, DEFAULT_VAR_EPS, check_hyperparameters,
                     check_linear_arguments, check_saved, class_indices)

# Autocast (docs/spherical.md, "Mixed precision"): like F.linear, the activations, weight and bias are
# cast to the autocast dtype, so the kernels run their bf16/fp16 GEMMs with fp32 accumulation; the
# loss comes back as float32, like F.linear_cross_entropy's under autocast.
_LOWER = dict(device="linear_weight", cast_args=("input", "linear_weight", "linear_bias"))

__all__ = ["LinearStats", "TopK", "linear_spherical_stats", "linear_spherical_loss", "linear_topk"]

LinearStats = collections.namedtuple("LinearStats", ["gram", "colsum"])
TopK = collections.namedtuple("TopK", ["values", "indices"])


@autocast.policy(autocast.LOWER, device="linear_weight", cast_args=("linear_weight", "linear_bias"))
def linear_spherical_stats(linear_weight: torch.Tensor, linear_bias: torch.Tensor | None = None) -> LinearStats:
    """The statistics of the augmented weight W' = [W | bias] (d' = d + 1 with a bias, else d) that
    the fused loss reads: `gram`, its centered Gram matrix Σ_k (W'_k − m)(W'_k − m)ᵀ about the mean
    row m (d', d'), and `colsum`, its column sums (d',); fp32 (fp64 for fp64 weights). Centered, so
    a row's spread Σ(o_k − mean)² comes without cancellation when the logits share a large offset.
    Not differentiable: the loss's backward accounts for the weight's role in them. Under autocast,
    those of the weight cast to the autocast dtype (the weight the loss then reads)."""
    if not backend.use_kernel("linear_spherical_loss", linear_weight.device):
        w = linear_weight.detach()
        if linear_bias is not None:
            w = torch.cat([w, linear_bias.detach().unsqueeze(1)], dim=1)
        w = w.to(accumulate_dtype(w.dtype))
        centered = w - w.mean(0)
        return LinearStats(centered.t() @ centered, w.sum(0))
    bias = None if linear_bias is None else linear_bias.detach()
    return LinearStats(*torch.ops.fusedtrain._linear_spherical_gram(linear_weight.detach(), bias))


def check_stats(stats, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None) -> None:
    """`stats=` must look like this weight's `linear_spherical_stats`: a (gram, colsum) pair of the
    accumulate dtype, of the augmented width d' = d (+ 1 with a bias), on the weight's device."""
    if not (isinstance(stats, tuple) and len(stats) == 2):
        raise TypeError(f"stats must be linear_spherical_stats(linear_weight, linear_bias) (a (gram, colsum) "
                        f"pair), got {type(stats).__name__}")
    dp = linear_weight.shape[1] + (linear_bias is not None)
    acc = accumulate_dtype(linear_weight.dtype)
    for name, t, shape in (("stats.gram", stats[0], (dp, dp)), ("stats.colsum", stats[1], (dp,))):
        check_saved(t, name, shape, acc)
        if t.device != linear_weight.device:
            raise ValueError(f"{name} is on {t.device} but linear_weight is on {linear_weight.device}")


@autocast.policy(autocast.LOWER, loss=True, **_LOWER)
def linear_spherical_loss(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                          linear_bias: torch.Tensor | None = None, kind: str = "z",
                          a: float = DEFAULT_A, b: float = DEFAULT_B,
                          eps: float = DEFAULT_EPS, var_eps: float = DEFAULT_VAR_EPS,
                          ignore_index: int = -100, reduction: str = "mean", check_target: bool = True,
                          stats: LinearStats | None = None) -> torch.Tensor:
    """Spherical-family loss of the logits `input @ linear_weight.T + linear_bias`, without forming them.

    Arguments as `torch.nn.functional.linear_cross_entropy` (input (..., d), linear_weight (D, d),
    target (...) of integer class indices, optional linear_bias (D,)) and as :func:`fusedtrain.spherical_loss` (kind,
    a, b, eps, var_eps, ignore_index, reduction, check_target). Gradients flow to input,
    linear_weight and linear_bias.

    stats: the weight's :func:`linear_spherical_stats`, when the caller has them (e.g. cached across
      micro-batches by :class:`fusedtrain.nn.SphericalHead`); they must be those of this very
      weight and bias, else the loss is wrong. Computed here when None.
    check_target: as in :func:`fusedtrain.spherical_loss` (False: out-of-range rows give NaN).
    Numerics: statistics and products accumulate in fp32 (fp64 for fp64). The row spread comes from
    the centered Gram matrix, so a large common offset of the logits costs the loss no precision;
    the gradients' `W·M + 1·aᵀ` still cancels by about offset/spread, as any factored form must
    (figures in docs/spherical.md, "Numerics"). Under torch.autocast input, weight and bias are cast
    to the autocast dtype (as F.linear) and the loss comes back as float32.
    """
    check_linear_arguments(input, linear_weight, target, linear_bias)
    check_hyperparameters(kind, a, b, eps, var_eps, ignore_index, reduction)
    target = class_indices(target)
    if not backend.use_kernel("linear_spherical_loss", linear_weight.device):
        return _reference.linear_spherical_loss(input, linear_weight, target, linear_bias=linear_bias,
                                                kind=kind, a=a, b=b, eps=eps, var_eps=var_eps,
                                                ignore_index=ignore_index, reduction=reduction)
    out_shape = target.shape
    # (N, d) with N from the target: reshape(-1, d) is ambiguous for d = 0.
    h = input.reshape(target.numel(), input.shape[-1])
    t = target.reshape(-1)
    if stats is None:
        stats = linear_spherical_stats(linear_weight, linear_bias)
    else:
        check_stats(stats, linear_weight, linear_bias)
    loss, _, _ = torch.ops.fusedtrain.linear_spherical_loss(
        h, linear_weight, linear_bias, t, stats[0].detach(), stats[1].detach(), kind, float(a), float(b),
        float(eps), float(var_eps), int(ignore_index), reduction, bool(check_target))
    return loss.reshape(out_shape) if reduction == "none" else loss


@autocast.policy(autocast.LOWER, **_LOWER)
def linear_topk(input: torch.Tensor, linear_weight: torch.Tensor, k: int, *,
                linear_bias: torch.Tensor | None = None, chunk: int = 8192) -> TopK:
    """The k largest logits of `input @ linear_weight.T + linear_bias` per row, largest first, and their
    class indices, for evaluation (no gradient). Streams over `chunk` classes at a time: memory is
    O(N·(chunk + k)), never the N x D logits. bf16/fp16 logits are formed in fp32 (a chunk of the
    weight upcast at a time) so that rounding does not create ties; the values come back in the
    input's dtype (under autocast: the autocast dtype, as F.linear's logits). Ties between equal
    logits resolve in any order."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    dummy_target = torch.empty(input.shape[:-1], dtype=torch.int64, device=input.device)
    check_linear_arguments(input, linear_weight, dummy_target, linear_bias)
    D = linear_weight.shape[0]
    if k > D:
        raise ValueError(f"k must be <= the number of classes {D}, got {k}")
    values = indices = None
    work = accumulate_dtype(input.dtype)
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
