"""FRUGAL optimizer (spec/frugal.md) and its fused step op `fusedtrain.frugal_step_`.

`FRUGAL` is a `torch.optim` drop-in: AdamW on a subspace of density ρ of each weight matrix (state
for those coordinates only), state-free signSGD on the rest, so every update is full rank while the
optimizer state is about ρ of AdamW's. Its step is one call of the fused op per (device, dtype) of
a param group: every tensor of the group in one `at::parallel_for` (CPU) or one multi-tensor launch
(CUDA), reading p and g once and the moments only where they exist. The svd/random projections
add matrix products (BLAS/cuBLAS) per tensor and then one fused element-wise pass per tensor.

Not supported: CUDA graph capture of the step (the step counters and subspace bookkeeping are on
the host), sparse gradients, complex parameters, a tensor learning rate.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _backend
from .reference import frugal as _reference
from .reference.frugal import BLOCK_ORDERS, FREE_UPDATES, PROJECTIONS  # noqa: F401  (re-exported)

__all__ = ["FRUGAL", "frugal_step_"]

_OP = "frugal_step_"


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
      1 columns:  AdamW on the columns `indices[i]` (int32, sorted, unique), moments (rows, k);
                  `free_update` on the other columns
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
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), free_update=free_update, free_lr_scale=float(free_lr_scale))
    if not _backend.use_kernel(_OP, params[0].device):
        _reference.frugal_step_(params, grads, exp_avgs, exp_avg_sqs, indices, kinds, steps,
                                residual_bases=residual_bases, dense_updates=dense_updates, **hyper)
        return
    torch.ops.fusedtrain.frugal_step_(
        params, list(grads), list(exp_avgs), list(exp_avg_sqs), list(indices), residual_bases,
        dense_updates, [int(k) for k in kinds], [int(s) for s in steps], hyper["lr"], hyper["beta1"],
        hyper["beta2"], hyper["eps"], hyper["weight_decay"], free_update, hyper["free_lr_scale"])


class FRUGAL(_reference.FRUGALReference):
    """FRUGAL: memory-efficient optimization by gradient splitting (Zmushko et al., ICML 2025).

    FRUGAL(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, density=0.25,
           proj="columns", update_gap=200, reset_state=True, free_update="signsgd",
           free_lr_scale=1.0, seed=None, block_order="random")

    Each weight W (m×n; higher-dimensional ones are viewed as (size(0), rest)) is split into a
    state-full part, updated by AdamW with moments kept only there, and the residual, updated by
    signSGD ("signsgd"), SGD ("sgd") or not at all ("none") scaled by `free_lr_scale`. Weight decay is
    decoupled (AdamW's) and applies to all of W.

    proj: "columns" / "rows": a random round(density·n) columns (rows), int32 indices, state m×ρn;
      "block": round(density·#tensors) whole tensors of the group are state-full, chosen in
      `block_order` ("random", or cycling "ascending"/"descending" like BAdam);
      "svd": top singular vectors of the gradient (GaLore), "random": a random semi-orthogonal basis,
      of the smaller side, rank round(density·min(m, n)); None: plain AdamW for the whole group
      (embeddings, output head). 1-D tensors (norms, biases) always get plain AdamW.
    update_gap: steps between subspace refreshes; reset_state: zero the moments (and restart bias
      correction) at a refresh, else keep them (GaLore's behaviour).
    seed: seeds the subspace draws (None: drawn from torch's global generator).
    Any of these can be overridden per param group, e.g. `{"params": head, "proj": None}`.
    density=1 with columns/rows/block is AdamW; density=0 is signSGD. `state_dict()` holds the
    subspaces, step counters and the generator, so a resumed run continues bit-identically.
    """

    _step_fn = staticmethod(frugal_step_)


# ---------------------------------------------------------------------------------------------

def _fake_frugal_step_(params, grads, exp_avgs, exp_avg_sqs, indices, residual_bases, dense_updates,
                       kinds, steps, lr, beta1, beta2, eps, weight_decay, free_update, free_lr_scale):
    return None


def _register() -> None:
    if not _backend.has_extension() or not hasattr(torch.ops.fusedtrain, _OP):
        return
    torch.library.register_fake("fusedtrain::" + _OP)(_fake_frugal_step_)


_register()
