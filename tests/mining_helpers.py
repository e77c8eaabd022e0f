"""Helpers shared by the mining test files (test_mining.py, test_mining_pml.py)."""
from __future__ import annotations

import torch


def make_case(B, M, d, classes, device, dtype=torch.float64, *, with_ref=True):
    x = torch.randn(B, d, dtype=torch.float64).to(device=device, dtype=dtype)
    labels = torch.randint(0, classes, (B,), device=device)
    if not with_ref:
        return x, labels, None, None
    r = torch.randn(M, d, dtype=torch.float64).to(device=device, dtype=dtype)
    ref_labels = torch.randint(0, classes, (M,), device=device)
    return x, labels, r, ref_labels


def pairs(a, b):
    assert a.dtype == torch.long and b.dtype == torch.long and a.shape == b.shape
    return set(zip(a.tolist(), b.tolist()))
