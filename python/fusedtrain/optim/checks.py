"""Checks of FRUGAL's fused step op as csrc/frugal/frugal.cpp makes them (shapes, dtypes, kinds,
hyperparameters; not the index values, which need data), for its fake kernel: meta tensors raise
the errors the compiled step raises."""
from __future__ import annotations

import torch

from .._core.checks import check_finite
from .._core.dtypes import FLOAT_DTYPES
from .subspace import COLUMNS, DENSE, FREE_UPDATES, RESIDUAL, ROWS, matrix_shape

KIND_COUNT = 5


def _check_companion(t, p, numel: int, name: str, i: int) -> None:
    if t.dtype != p.dtype:
        raise TypeError(f"{name}[{i}] must have the dtype of params[{i}] ({p.dtype}), got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name}[{i}] must be contiguous")
    if t.numel() != numel:
        raise ValueError(f"{name}[{i}] must hold {numel} elements, got shape {tuple(t.shape)}")


def check_raw_step(params, grads, exp_avgs, exp_avg_sqs, indices, residual_bases, dense_updates, kinds, steps,
                   lr, beta1, beta2, eps, weight_decay, free_update, free_lr_scale) -> None:
    count = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("indices", indices), ("residual_bases", residual_bases),
                      ("dense_updates", dense_updates), ("kinds", kinds), ("steps", steps)):
        if len(lst) != count:
            raise ValueError(f"{name} must have one entry per param ({count}), got {len(lst)}")
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("free_lr_scale", free_lr_scale)):
        if check_finite(name, value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    if free_update not in FREE_UPDATES:
        raise ValueError(f"free_update must be one of {FREE_UPDATES}, got {free_update!r}")
    for i, (p, g, kind) in enumerate(zip(params, grads, kinds)):
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"params[{i}] must be float32, float64, bfloat16 or float16, got {p.dtype}")
        if p.dtype != params[0].dtype:
            raise TypeError(f"params[{i}] is {p.dtype} but params[0] is {params[0].dtype} (one call per dtype)")
        if not p.is_contiguous():
            raise ValueError(f"params[{i}] must be contiguous")
        if g.layout != torch.strided:
            raise ValueError(f"grads[{i}] is sparse: FRUGAL needs dense gradients")
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] must have the shape of params[{i}] {tuple(p.shape)}, got {tuple(g.shape)}")
        _check_companion(g, p, p.numel(), "grads", i)
        if not 0 <= kind < KIND_COUNT:
            raise ValueError(f"kinds[{i}] must be in [0, {KIND_COUNT}), got {kind}")
        adam = kind in (DENSE, COLUMNS, ROWS)
        if adam and steps[i] < 1:
            raise ValueError(f"steps[{i}] must be >= 1 (Adam steps taken, this one included), got {steps[i]}")
        rows, cols = matrix_shape(p)
        state_numel = p.numel() if kind == DENSE else 0
        if kind in (COLUMNS, ROWS):
            idx, limit = indices[i], (cols if kind == COLUMNS else rows)
            if idx.dtype != torch.int32:
                raise TypeError(f"indices[{i}] must be int32, got {idx.dtype}")
            if idx.dim() != 1 or not idx.is_contiguous():
                raise ValueError(f"indices[{i}] must be a contiguous 1-D tensor, got shape {tuple(idx.shape)}")
            if idx.numel() > limit:
                raise ValueError(f"indices[{i}] selects {idx.numel()} of only {limit} columns/rows")
            state_numel = rows * idx.numel() if kind == COLUMNS else idx.numel() * cols
        if adam:
            _check_companion(exp_avgs[i], p, state_numel, "exp_avgs", i)
            _check_companion(exp_avg_sqs[i], p, state_numel, "exp_avg_sqs", i)
        if kind == RESIDUAL:
            _check_companion(residual_bases[i], p, p.numel(), "residual_bases", i)
            _check_companion(dense_updates[i], p, p.numel(), "dense_updates", i)
