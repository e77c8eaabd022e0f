"""The SAE family's `python -m fusedtrain selftest` check: one float64 training step per routing
(fused encode, sparse decode, backward) against the dense reference."""
from __future__ import annotations

import torch

from .._core.selftest import Check
from . import reference as _reference
from .checks import ROUTINGS, routing_param
from .codec import sae_encode, sparse_decode


def check_sae(device: str) -> list[Check]:
    """The max relative gradient error of one float64 SAE step per routing against the dense reference."""
    gen = torch.Generator().manual_seed(0)
    B, d, F, k = 64, 48, 300, 8
    x, W_enc, b_enc, b_dec, W_dec = (torch.randn(*s, generator=gen, dtype=torch.float64).to(device) * c
                                     for s, c in (((B, d), 1.0), ((d, F), 0.15), ((F,), 0.1), ((d,), 0.1),
                                                  ((F, d), 0.15)))
    results = []
    for routing in ROUTINGS:
        param = routing_param(routing, k, None, None, B, F)
        ours = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
        acts = sae_encode(*ours[:4], routing, **{"topk": {"k": param}, "feature_choice": {"m": param},
                                                 "mutual_choice": {"budget": param}}[routing])
        sparse_decode(acts, ours[4], ours[3]).pow(2).sum().backward()
        refs = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
        dense = _reference.encode(*refs[:4], routing, param)
        _reference.decode(dense, refs[4], refs[3]).pow(2).sum().backward()
        err = max(((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-300)).item() for a, b in zip(ours, refs))
        results.append(Check(f"sae step routing={routing}", err, 1e-9))
    return results
