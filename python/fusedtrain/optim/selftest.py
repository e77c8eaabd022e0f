"""FRUGAL's `python -m fusedtrain selftest` check: the fused step against the reference optimizer in
fp64, every projection, refreshes included."""
from __future__ import annotations

import torch

from .._core.selftest import Check, rel_err
from .frugal import FRUGAL
from .reference import FRUGALReference


def check_frugal(device: str) -> list[Check]:
    """The fused FRUGAL step against the reference optimizer in fp64: 30 steps, refreshes included."""
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
