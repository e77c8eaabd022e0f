"""FRUGAL's fused step op `fusedtrain.frugal_step_` (maths: docs/frugal.md).

One call updates every tensor of a list in place: CPU, one `at::parallel_for` over all of them;
CUDA, one multi-tensor launch. Without a compiled kernel for the device it runs the reference.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._core import backend
from .._core.checks import check_int64
from . import reference as _reference
from .subspace import FREE_UPDATES

__all__ = ["frugal_step_"]


def frugal_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                 indices: Sequence[torch.Tensor], kinds: Sequence[int], steps: Sequence[int], *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 free_update: str = "signsgd", free_lr_scale: float = 1.0,
                 residual_bases: Sequence[torch.Tensor] | None = None,
                 dense_updates: Sequence[torch.Tensor] | None = None) -> None:
    """One fused FRUGAL step over a list of tensors, in place (params and moments).

    Every tensor is seen as a matrix (size(0), rest) and updated by its `kinds[i]`:
      0 dense:    AdamW on all of it (exp_avgs/exp_avg_sqs shaped like the param)
      1 columns:  AdamW on the columns `indices[i]` (int32, sorted, unique as FRUGAL passes them),
                  moments (rows, k); `free_update` on the other columns. The compiled kernels read
                  any list as a set, the same on CPU and CUDA (docs/frugal.md): out-of-range and
                  repeated entries are inactive (their moment slots untouched), order is free
      2 rows:     the same for rows, moments (k, cols)
      3 free:     `free_update` on all of it (no moments: pass empty tensors)
      4 residual: w ← w·(1 − lr·wd) − lr·dense_updates[i] − lr·free_lr_scale·free(g − residual_bases[i])
                  (the svd/random projections, whose subspace work is done by matrix products)
    `steps[i]` is the Adam step count of tensor i including this one (bias correction). Weight decay
    is decoupled (AdamW's). free_update: "signsgd" (sign of the residual gradient), "sgd", "none".
    All params share one dtype and device; entries a kind does not use may be empty tensors.
    """
    params = list(params)
    if not params:
        return
    count = len(params)
    residual_bases = list(residual_bases) if residual_bases is not None else [params[0].new_empty(0)] * count
    dense_updates = list(dense_updates) if dense_updates is not None else [params[0].new_empty(0)] * count
    if free_update not in FREE_UPDATES:
        raise ValueError(f"free_update must be one of {FREE_UPDATES}, got {free_update!r}")
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("indices", indices), ("kinds", kinds), ("steps", steps),
                      ("residual_bases", residual_bases), ("dense_updates", dense_updates)):
        if len(lst) != count:
            raise ValueError(f"{name} must have one entry per param ({count}), got {len(lst)}")
    for i, g in enumerate(grads):
        if g is not None and g.is_sparse:
            raise RuntimeError(f"grads[{i}] is sparse: FRUGAL needs dense gradients")
    kinds = [check_int64(int(k) if isinstance(k, torch.Tensor) else k, f"kinds[{i}]") for i, k in enumerate(kinds)]
    steps = [check_int64(int(t) if isinstance(t, torch.Tensor) else t, f"steps[{i}]") for i, t in enumerate(steps)]
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), free_update=free_update, free_lr_scale=float(free_lr_scale))
    if not backend.use_kernel("frugal_step_", params[0].device):
        _reference.frugal_step_(params, grads, exp_avgs, exp_avg_sqs, indices, kinds, steps,
                                residual_bases=residual_bases, dense_updates=dense_updates, **hyper)
        return
    torch.ops.fusedtrain.frugal_step_(
        params, list(grads), list(exp_avgs), list(exp_avg_sqs), list(indices), residual_bases,
        dense_updates, kinds, steps, hyper["lr"], hyper["beta1"],
        hyper["beta2"], hyper["eps"], hyper["weight_decay"], free_update, hyper["free_lr_scale"])
