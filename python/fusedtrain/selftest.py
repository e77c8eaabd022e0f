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


def check_mining(device: str) -> list[Check]:
    """Fused Multi-Similarity loss (against a reference set and in-batch) and TCM, forward and
    backward, on one tile and on tiles of one row; the miners' pairs."""
    from . import mining
    from .reference import mining as reference

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 24, generator=gen, dtype=torch.float64).to(device)
    r = torch.randn(300, 24, generator=gen, dtype=torch.float64).to(device)
    labels = torch.randint(0, 5, (40,), generator=gen).to(device)
    ref_labels = torch.randint(0, 5, (300,), generator=gen).to(device)
    checks = []
    tiles = getattr(torch.ops.fusedtrain, "_mining_tile_elements", None)  # absent without a build
    previous = tiles(-1) if tiles is not None else None
    try:
        for tile in ((0, 300) if tiles is not None else (0,)):
            if tiles is not None:
                tiles(tile)
            for name, ref_set in (("ref", (r, ref_labels)), ("in-batch", (None, None))):
                for op in ("multi_similarity_loss", "tcm_loss"):
                    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
                    losses = [getattr(module, op)(xi, labels, *ref_set) for module, xi in zip((mining, reference), xs)]
                    for loss in losses:
                        loss.backward()
                    err = max(rel_err(losses[0], losses[1]), rel_err(xs[0].grad, xs[1].grad))
                    checks.append(Check(f"{op} {name} tile={tile or 'default'}", err, 1e-10))
                for op in ("multi_similarity_mine", "pair_margin_mine", "batch_hard_mine"):
                    ours, want = getattr(mining, op)(x, labels, *ref_set), getattr(reference, op)(x, labels, *ref_set)
                    # As sets: (a, p, n) triplets, or the (a1, p) and (a2, n) pairs.
                    groups = [(0, 3)] if len(ours) == 3 else [(0, 2), (2, 4)]
                    same = all(sorted(zip(*[t.tolist() for t in ours[b:e]])) == sorted(zip(*[t.tolist() for t in want[b:e]]))
                               for b, e in groups)
                    checks.append(Check(f"{op} {name} tile={tile or 'default'}", 0.0 if same else 1.0, 0.0))
    finally:
        if tiles is not None:
            tiles(previous)
    return checks


def check_linear(device: str) -> list[Check]:
    """The fused linear op (Gram form) against the float64 logits path, every kind, with a bias."""
    from .linear_spherical import linear_spherical_loss
    from .reference.linear_spherical import linear_spherical_loss as reference
    from .spherical import spherical_loss

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
        ref_loss = reference(ref[0], ref[1], target, linear_bias=ref[2], kind=kind)
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


def check_frugal(device: str) -> list[Check]:
    """The fused FRUGAL step against the reference optimizer in fp64: 30 steps, refreshes included."""
    from .optim import FRUGAL
    from .reference.frugal import FRUGALReference

    checks = []
    for proj in ("columns", "rows", "block", "svd", "random"):
        gen = torch.Generator().manual_seed(0)
        ours = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in ((48, 64), (64,))]
        theirs = [p.clone() for p in ours]
        opts = [cls(ps, lr=1e-2, density=0.25, proj=proj, update_gap=10, seed=0)
                for cls, ps in ((FRUGAL, ours), (FRUGALReference, theirs))]
        for _ in range(30):
            grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device) for p in ours]
            for params, opt in zip((ours, theirs), opts):
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
        err = max(rel_err(a, b) for a, b in zip(ours, theirs))
        checks.append(Check(f"FRUGAL proj={proj}", err, 1e-10))
    return checks


def check_sae(device: str) -> list[Check]:
    """The SAE training step (fused encode, each routing, sparse decode) in float64 vs the dense reference."""
    from .sae import _selftest

    return [Check(label, err, 1e-9) for label, err in _selftest(device)]


# family -> check function; a new family is one entry here.
CHECKS: dict[str, Callable[[str], list[Check]]] = {"spherical": check_spherical, "linear": check_linear,
                                                    "sae": check_sae,
                                                    "frugal": check_frugal,
                                                    "mining": check_mining}


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
