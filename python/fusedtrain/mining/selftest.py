"""The mining family's `python -m fusedtrain selftest` checks: the fused losses forward and
backward, and the miners' pairs, against the float64 reference, on one tile and on tiles of one row."""
from __future__ import annotations

import torch

from .._core.selftest import Check, rel_err
from . import ops as mining
from . import reference


def check_mining(device: str) -> list[Check]:
    """Fused Multi-Similarity loss (against a reference set and in-batch) and TCM, forward and
    backward, on one tile and on tiles of one row; the miners' pairs."""
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
