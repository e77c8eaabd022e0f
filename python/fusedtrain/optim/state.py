"""Validation of a FRUGAL state dict before `load_state_dict` applies it: every param group's options
(a state dict of another optimizer, e.g. AdamW, lacks them) and each tensor's state (step counters,
moments of the shape its subspace implies, sorted in-range indices, projection bases). A bad state
dict raises with what is wrong, before anything is loaded, instead of failing or silently stepping
differently later."""
from __future__ import annotations

import torch

from .options import check_group
from .subspace import matrix_shape

__all__ = ["check_state_dict"]

_STATE_KEYS = {"step", "adam_step", "exp_avg", "exp_avg_sq", "indices", "projection", "active"}


def _fail(where: str, what: str):
    raise ValueError(f"cannot load this FRUGAL state dict: {where}: {what}")


def check_state_dict(state_dict, param_groups: list[dict]) -> None:
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise TypeError("state_dict must be an optimizer state dict (a dict with 'state' and 'param_groups')")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        return  # torch's own load_state_dict says so
    for group_id, (saved, current) in enumerate(zip(saved_groups, param_groups)):
        if len(saved.get("params", ())) != len(current["params"]):
            return  # likewise
        merged = {**saved, "params": current["params"]}  # what load_state_dict would make of it
        try:
            check_group(merged, group_id)
        except ValueError as exc:  # the message names the option and the group
            raise ValueError(f"cannot load this FRUGAL state dict: {exc}") from None
        for pid, p in zip(saved["params"], current["params"]):
            state = state_dict["state"].get(pid)
            if state is not None:
                _check_param_state(state, p, merged, f"state of param {pid} (param group {group_id})")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_param_state(state: dict, p: torch.Tensor, group: dict, where: str) -> None:
    unknown = sorted(set(state) - _STATE_KEYS, key=str)
    if unknown:
        _fail(where, f"unknown entries {unknown} (a state dict of another optimizer?)")
    for key in ("step", "adam_step"):
        if key in state and not _is_count(state[key]):
            _fail(where, f"{key} must be an int >= 0, got {state[key]!r} (a state dict of another optimizer?)")
    if "active" in state and not isinstance(state["active"], bool):
        _fail(where, f"active must be a bool, got {state['active']!r}")
    rows, cols = matrix_shape(p)
    proj = group["proj"]
    shape = None  # of the moments
    if proj is None or p.dim() < 2 or proj == "block":
        shape = tuple(p.shape)
    elif proj in ("columns", "rows"):
        if "indices" in state:
            shape = _check_indices(state["indices"], cols if proj == "columns" else rows, where)
            shape = (rows, shape) if proj == "columns" else (shape, cols)
    elif "projection" in state:  # svd / random: a basis of the smaller side
        basis = state["projection"]
        right = rows >= cols
        if not (isinstance(basis, torch.Tensor) and basis.dim() == 2 and basis.shape[0] == (cols if right else rows)):
            _fail(where, f"projection must be a ({cols if right else rows}, r) basis for a param of shape "
                         f"{tuple(p.shape)}, got {_describe(basis)}")
        shape = (rows, basis.shape[1]) if right else (basis.shape[1], cols)
    moments = [key for key in ("exp_avg", "exp_avg_sq") if key in state]
    if moments and (len(moments) != 2 or "adam_step" not in state):
        _fail(where, "exp_avg, exp_avg_sq and adam_step come together")
    for key in moments:
        t = state[key]
        if shape is None:
            _fail(where, f"{key} without the subspace it lives in (indices or projection) for proj={proj!r}")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            _fail(where, f"{key} must have shape {shape} for a param of shape {tuple(p.shape)} with "
                         f"proj={proj!r}, got {_describe(t)}")


def _check_indices(idx, limit: int, where: str) -> int:
    """Sorted, unique indices in [0, limit) (read on the host: loading is not on the hot path)."""
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 1 and not idx.is_floating_point()
            and not idx.is_complex() and idx.dtype != torch.bool):
        _fail(where, f"indices must be a 1-D integer tensor, got {_describe(idx)}")
    values = idx.detach().cpu().long()
    if values.numel() and (values.min() < 0 or values.max() >= limit or bool((values.diff() <= 0).any())):
        _fail(where, f"indices must be sorted, unique and in [0, {limit})")
    return idx.numel()


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)
