"""The options of a FRUGAL param group and their checks (shared by the optimizer's constructor, its
step and `load_state_dict`)."""
from __future__ import annotations

import math

from .subspace import BLOCK_ORDERS, FREE_UPDATES, PROJECTIONS

__all__ = ["OPTIONS", "FLAGS", "check_group", "check_options"]

# The options of a param group (FRUGAL's constructor arguments but params and seed).
OPTIONS = ("lr", "betas", "eps", "weight_decay", "density", "proj", "update_gap", "reset_state", "free_update",
           "free_lr_scale", "block_order")
# torch.optim.AdamW's flags that FRUGAL honours, with their defaults: kept in each param group as
# torch keeps them (a group or state dict made before they existed reads as the defaults).
FLAGS = {"maximize": False, "foreach": None, "fused": None}


def _check_number(name, value, group_id, low=None, high=None, *, low_open=False, high_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        span = f" in {lo}{low}, {high}{hi}" if high is not None else f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be a finite number{span}, got {value!r} (param group {group_id})")


def check_group(group: dict, group_id: int) -> None:
    """Validate one param group's hyperparameters and params; the error names the bad one."""
    check_options(group, group_id)
    for p in group["params"]:
        if p.is_complex():
            raise ValueError(f"FRUGAL does not support complex parameters (a {p.dtype} tensor of shape "
                             f"{tuple(p.shape)} in param group {group_id}); view it as real with "
                             "torch.view_as_real first")
        if not p.is_floating_point():
            raise ValueError(f"FRUGAL optimizes floating-point parameters, got {p.dtype} "
                             f"(param group {group_id})")


def check_options(group: dict, group_id: int) -> None:
    """Validate one param group's hyperparameters (cheap: checked again at every step, since a group
    dict can be edited between steps); the error names the bad one."""
    missing = [key for key in OPTIONS if key not in group]
    if missing:
        raise ValueError(f"param group {group_id} lacks the FRUGAL options {missing} (a state dict or param "
                         "group of another optimizer?)")
    _check_number("lr", group["lr"], group_id, 0.0)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r} (param group {group_id})")
    for name, beta in zip(("betas[0]", "betas[1]"), betas):
        _check_number(name, beta, group_id, 0.0, 1.0, high_open=True)
    _check_number("eps", group["eps"], group_id, 0.0)
    _check_number("weight_decay", group["weight_decay"], group_id, 0.0)
    _check_number("density", group["density"], group_id, 0.0, 1.0)
    _check_number("free_lr_scale", group["free_lr_scale"], group_id, 0.0)
    if group["proj"] is not None and group["proj"] not in PROJECTIONS:
        raise ValueError(f"proj must be one of {PROJECTIONS} or None (plain AdamW), got {group['proj']!r} "
                         f"(param group {group_id})")
    gap = group["update_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"update_gap must be an int >= 1, got {gap!r} (param group {group_id})")
    if not isinstance(group["reset_state"], bool):
        raise ValueError(f"reset_state must be a bool, got {group['reset_state']!r} (param group {group_id})")
    if group["free_update"] not in FREE_UPDATES:
        raise ValueError(f"free_update must be one of {FREE_UPDATES}, got {group['free_update']!r} "
                         f"(param group {group_id})")
    if group["block_order"] not in BLOCK_ORDERS:
        raise ValueError(f"block_order must be one of {BLOCK_ORDERS}, got {group['block_order']!r} "
                         f"(param group {group_id})")
    if not isinstance(group.get("maximize", False), bool):
        raise ValueError(f"maximize must be a bool, got {group['maximize']!r} (param group {group_id})")
    for flag in ("foreach", "fused"):
        if group.get(flag) is not None and not isinstance(group[flag], bool):
            raise ValueError(f"{flag} must be None or a bool, got {group[flag]!r} (param group {group_id})")
    if group.get("foreach") and group.get("fused"):  # torch.optim's rule
        raise ValueError(f"`fused` and `foreach` cannot be `True` together (param group {group_id})")
    block_step = group.get("block_step", 0)
    if isinstance(block_step, bool) or not isinstance(block_step, int) or block_step < 0:
        raise ValueError(f"block_step must be an int >= 0, got {block_step!r} (param group {group_id})")
