"""Helpers shared by the spherical test files (test_spherical.py, test_spherical_errors.py)."""
from __future__ import annotations

import torch


def make_case(n, d, device, dtype=torch.float32, *, ignore=True, scale=2.0):
    """Random logits (drawn in fp64, then rounded to `dtype`) and targets, row 1 ignored."""
    logits = torch.randn(n, d, dtype=torch.float64) * scale
    if d <= 2:
        # At D = 1 the spherical loss is log(o² + eps) − log(o² + eps) ≡ 0, its gradient the sum of
        # ±2o/(o² + eps) ~ ±2/o; at D = 2 the Z-loss gradient cancels terms ~ 1/|o_1 − o_2|. Exact
        # zeros are compared in absolute terms (check_against_reference), which is only meaningful
        # when the cancelling terms are O(1): keep |o| and |o_1 − o_2| >= 0.5 there.
        away = 0.5 + torch.randn(n, d, dtype=torch.float64).abs() * scale
        sign = torch.randint(0, 2, (n, d), dtype=torch.float64) * 2 - 1
        logits = (away * sign).cumsum(dim=1)  # |o_1| >= 0.5 and |o_2 − o_1| >= 0.5
    logits = logits.to(device=device, dtype=dtype)
    target = torch.randint(0, d, (n,), device=device)
    if ignore and n > 2:
        target[1] = -100
    return logits, target


def plant_non_finite(logits, target, value):
    """`value` (NaN or ±inf) at a non-target logit of row 2 and at the target logit of row 4."""
    d = logits.shape[1]
    logits[2, (target[2] + 1) % d] = value
    logits[4, target[4]] = value
    return [2, 4]


def check_rows_non_finite(loss, grad, bad_rows, reduction):
    """The loss (each bad row's, or the reduced one) and each bad row's gradient are not finite;
    every other row stays finite."""
    good = [r for r in range(grad.shape[0]) if r not in bad_rows]
    if reduction == "none":
        assert not torch.isfinite(loss[bad_rows]).any(), loss
        assert torch.isfinite(loss[good]).all(), loss
    else:
        assert not torch.isfinite(loss), loss
    assert all(not torch.isfinite(grad[r]).all() for r in bad_rows), grad[bad_rows]
    assert torch.isfinite(grad[good]).all()
