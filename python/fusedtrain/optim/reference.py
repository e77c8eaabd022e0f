"""Pure-PyTorch reference of FRUGAL's element-wise update (maths: docs/frugal.md), written from the
definitions, and `FRUGALReference`, the optimizer that uses it.

- `frugal_step_`: the reference of the fused op `fusedtrain::frugal_step_`: same arguments, same
  in-place effect, plain tensor ops (gathers, scatters, full-size intermediates), float64-capable.
- `FRUGALReference`: `FRUGALBase` (the subspace choice, refreshes, state and `state_dict`, shared
  with `fusedtrain.optim.FRUGAL`) stepping with this reference, so the two optimizers draw the same
  subspaces from the same seed and differ only in the fused update.

Update of a projectable W (m×n) with gradient G: G_full = P(G); u = AdamW direction of G_full with
moments kept in the subspace; G_free = G − P⁻¹(G_full); u_free = sign(G_free) (signsgd), G_free (sgd)
or 0 (none); W ← W·(1 − lr·wd) − lr·P⁻¹(u) − lr·free_lr_scale·u_free.
"""
from __future__ import annotations

import math

import torch

from .._core.dtypes import accumulate_dtype
from .base import FRUGALBase
from .subspace import (BLOCK_ORDERS, COLUMNS, DENSE, FREE, FREE_UPDATES, PROJECTIONS, RESIDUAL,  # noqa: F401
                       ROWS, matrix_shape, subspace_size)


def free_direction(g: torch.Tensor, free_update: str) -> torch.Tensor:
    if free_update == "signsgd":
        return torch.sign(g)
    if free_update == "sgd":
        return g
    return torch.zeros_like(g)


def frugal_step_(params, grads, exp_avgs, exp_avg_sqs, indices, kinds, steps, *, lr, beta1, beta2,
                 eps, weight_decay, free_update="signsgd", free_lr_scale=1.0, residual_bases=None,
                 dense_updates=None) -> None:
    """Reference of `fusedtrain.frugal_step_` (see there for the arguments)."""
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        kind = int(kinds[i])
        acc = accumulate_dtype(p.dtype)
        rows, cols = matrix_shape(p)
        W = p.detach().reshape(rows, cols).to(acc)
        G = grads[i].reshape(rows, cols).to(acc)
        decay = 1.0 - lr * weight_decay
        free_scale = lr * free_lr_scale
        if kind == RESIDUAL:
            base = residual_bases[i].reshape(rows, cols).to(acc)
            update = dense_updates[i].reshape(rows, cols).to(acc)
            new = W * decay - lr * update - free_scale * free_direction(G - base, free_update)
            p.detach().copy_(new.reshape(p.shape))
            continue
        new = W * decay - free_scale * free_direction(G, free_update)
        if kind in (DENSE, COLUMNS, ROWS):
            if kind == DENSE:
                select, slots = (slice(None), slice(None)), (slice(None), slice(None))
                m_all, v_all = exp_avgs[i].reshape(rows, cols), exp_avg_sqs[i].reshape(rows, cols)
            else:
                idx = indices[i].long()
                active = active_slots(idx, cols if kind == COLUMNS else rows)
                k = idx.numel()
                if kind == COLUMNS:
                    select, slots = (slice(None), idx[active]), (slice(None), active)
                    m_all, v_all = exp_avgs[i].reshape(rows, k), exp_avg_sqs[i].reshape(rows, k)
                else:
                    select, slots = (idx[active], slice(None)), (active, slice(None))
                    m_all, v_all = exp_avgs[i].reshape(k, cols), exp_avg_sqs[i].reshape(k, cols)
            Gs, Ws = G[select], W[select]
            m, v = m_all[slots].to(acc), v_all[slots].to(acc)
            # torch.optim.AdamW's order of operations.
            m = torch.lerp(m, Gs, 1.0 - beta1)
            v = v * beta2 + (1.0 - beta2) * Gs * Gs
            t = int(steps[i])
            step_size = lr / (1.0 - beta1 ** t)
            bc2_sqrt = math.sqrt(1.0 - beta2 ** t)
            new[select] = Ws * decay - step_size * (m / (v.sqrt() / bc2_sqrt + eps))
            m_all[slots] = m.to(m_all.dtype)
            v_all[slots] = v.to(v_all.dtype)
        p.detach().copy_(new.reshape(p.shape))


def active_slots(idx: torch.Tensor, limit: int) -> torch.Tensor:
    """The positions of an index list's active entries (docs/frugal.md, "Index lists are read as a
    set"): the value lies in [0, limit) and no earlier entry has the same value."""
    order = torch.argsort(idx, stable=True)  # equal values keep their positions' order
    first = torch.ones_like(idx, dtype=torch.bool)
    sorted_idx = idx[order]
    first[order[1:]] = sorted_idx[1:] != sorted_idx[:-1]
    return torch.nonzero(first & (idx >= 0) & (idx < limit)).squeeze(1)


class FRUGALReference(FRUGALBase):
    """FRUGAL (Zmushko et al., 2025) with the reference step: arguments as `fusedtrain.optim.FRUGAL`."""

    _step_fn = staticmethod(frugal_step_)
