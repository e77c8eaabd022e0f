"""Small end-to-end checks of every op family against its float64 reference.

One mechanism, three users: `python -m fusedtrain selftest` (every available device),
`tests/sanitizer_cases.py` (the CUDA kernels under compute-sanitizer) and the tests. A family adds one
function `check_<family>(device) -> list[Check]` to CHECKS; each check runs the op forward and backward
on a small fresh case and reports its relative error against the reference next to its tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Check:
    name: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # NaN fails


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in norm, float64."""
    value, ref = value.double(), ref.double()
    return ((value - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_spherical(device: str) -> list[Check]:
    from .reference.spherical import spherical_loss as reference
    from .spherical import spherical_loss

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


# family -> check function; a new family is one entry here.
CHECKS: dict[str, Callable[[str], list[Check]]] = {"spherical": check_spherical}


def run(devices: list[str], families: list[str] | None = None, *, verbose: bool = True) -> int:
    """Run the checks; returns the number of failures (an exception counts as one)."""
    failures = 0
    for device in devices:
        for family in families or list(CHECKS):
            try:
                checks = CHECKS[family](device)
            except Exception as exc:  # report and go on: one broken family must not hide the others
                checks = [Check(f"{family}: {type(exc).__name__}: {exc}", float("nan"), 0.0)]
            for check in checks:
                failures += not check.ok
                if verbose:
                    print(f"{device:5s} {check.name:40s} rel. error {check.error:.2e} "
                          f"(tol {check.tolerance:.0e}) {'ok' if check.ok else 'FAIL'}")
    return failures
