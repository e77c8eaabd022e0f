"""Pure-PyTorch reference for the softmax-free spherical losses (docs/spherical.md).

Written straight from the definitions with ordinary tensor ops, so autograd supplies the gradients:
it is the float64 oracle the kernels are tested against and the fallback when no kernel is built.
It forms every intermediate the fused kernels avoid; it is meant to be obviously right, not fast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("z", "spherical", "taylor", "mse")
REDUCTIONS = ("mean", "sum", "none")


def _row_loss(o: torch.Tensor, oc: torch.Tensor, kind: str, a: float, b: float, eps: float,
              var_eps: float) -> torch.Tensor:
    """Per-row loss from the rows `o` (R, D) and the target logits `oc` (R,)."""
    D = o.shape[-1]
    if kind == "z":
        mu = o.mean(dim=-1)
        var = torch.clamp((o * o).mean(dim=-1) - mu * mu, min=0.0) + var_eps
        z_c = (oc - mu) / torch.sqrt(var)
        return F.softplus(a * (b - z_c)) / a
    s = o.sum(dim=-1)
    q = (o * o).sum(dim=-1)
    if kind == "spherical":
        return torch.log(q + D * eps) - torch.log(oc * oc + eps)
    if kind == "taylor":
        return torch.log(D + s + 0.5 * q) - torch.log(1.0 + oc + 0.5 * oc * oc)
    if kind == "mse":
        return q - 2.0 * oc + 1.0
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def spherical_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "z", *, a: float = 0.05,
                   b: float = 20.0, eps: float = 1e-6, var_eps: float = 1e-6, ignore_index: int = -100,
                   reduction: str = "mean") -> torch.Tensor:
    """Reference spherical loss over `logits` (N, D) or (N, D, d1, ...) and int64 `target`.

    Batch conventions follow `F.cross_entropy`: rows whose target equals `ignore_index` contribute
    nothing, "mean" divides by the number of kept rows (NaN when every row is ignored).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    extra_shape = target.shape
    if logits.dim() > 2:  # (N, D, d1, ...) -> rows of D classes, as F.cross_entropy accepts
        logits = logits.movedim(1, -1).reshape(-1, logits.shape[1])
        target = target.reshape(-1)
    D = logits.shape[-1]
    keep = target != ignore_index
    if bool(((target < 0) | (target >= D))[keep].any()):
        raise ValueError(f"target holds class indices outside [0, {D}) that are not ignore_index")
    safe_target = torch.where(keep, target, torch.zeros_like(target))
    oc = logits.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    rows = _row_loss(logits, oc, kind, a, b, eps, var_eps)
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(extra_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / keep.sum()
