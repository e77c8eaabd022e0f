"""Helpers shared by the SAE test files (test_sae.py, test_sae_routing.py)."""
from __future__ import annotations

import torch

from fusedtrain.reference import sae as ref


def reference_csr(pre, routing, param, theta=None):
    return ref.csr_from_dense(pre, ref.route_mask(pre, routing, param, theta))


def make_pre(B, F, device, dtype, ties=False):
    pre = torch.randn(B, F, dtype=torch.float64)
    if ties:  # few distinct values: ties at every cutoff
        pre = (pre * 2).round() / 2
    return pre.to(device=device, dtype=dtype)
