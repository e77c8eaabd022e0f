"""The spherical family's `python -m fusedtrain selftest` checks: each op forward and backward on a
small fresh case against its float64 reference."""
from __future__ import annotations

import torch

from .._core.selftest import Check, rel_err
from .linear import linear_spherical_loss
from .linear_reference import linear_spherical_loss as linear_reference
from .ops import spherical_loss
from .reference import spherical_loss as reference


def check_spherical(device: str) -> list[Check]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=gen).to(device)
    target = torch.randint(0, 1000, (64,), generator=gen).to(device)
    checks = []
    for kind in ("z", "spherical", "taylor", "mse"):
        x = logits.clone().requires_grad_()
        loss = spherical_loss(x, target, kind)
        loss.backward()
        x64 = logits.double().requires_grad_()
        ref = reference(x64, target, kind)
        ref.backward()
        err = max(rel_err(loss, ref), rel_err(x.grad, x64.grad))
        checks.append(Check(f"spherical_loss kind={kind}", err, 1e-5))
    return checks


def check_linear(device: str) -> list[Check]:
    """The fused linear op (Gram form) against the float64 logits path, every kind, with a bias."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(96, 32, generator=gen).to(device)
    w = (torch.randn(500, 32, generator=gen) / 32**0.5).to(device)
    b = torch.randn(500, generator=gen).to(device)
    target = torch.randint(0, 500, (96,), generator=gen).to(device)
    target[::7] = -100
    checks = []
    for kind in ("z", "spherical", "taylor", "mse"):
        ours = [x.clone().requires_grad_() for x in (h, w, b)]
        loss = linear_spherical_loss(ours[0], ours[1], target, linear_bias=ours[2], kind=kind)
        loss.backward()
        ref = [x.double().requires_grad_() for x in (h, w, b)]
        ref_loss = linear_reference(ref[0], ref[1], target, linear_bias=ref[2], kind=kind)
        ref_loss.backward()
        err = max([rel_err(loss, ref_loss)] + [rel_err(x.grad, r.grad) for x, r in zip(ours, ref)])
        # The spherical kind divides by o_c^2: a small target logit magnifies rounding in any fp32
        # computation, so the bar is also 4x the error of the fp32 logits path on the same case.
        plain = [x.clone().requires_grad_() for x in (h, w, b)]
        plain_loss = spherical_loss(torch.nn.functional.linear(plain[0], plain[1], plain[2]), target, kind)
        plain_loss.backward()
        plain_err = max([rel_err(plain_loss, ref_loss)] + [rel_err(x.grad, r.grad) for x, r in zip(plain, ref)])
        checks.append(Check(f"linear_spherical_loss kind={kind}", err, max(2e-5, 4 * plain_err)))
    return checks
