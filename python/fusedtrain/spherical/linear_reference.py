"""Pure-PyTorch reference of the fused linear spherical loss and of linear_topk.

It forms the N x D logits that the fused op exists to avoid: `spherical_loss(F.linear(x, W, b), t)`.
It is the float64 oracle of the tests and the fallback when no kernel is built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import spherical_loss


def linear_spherical_loss(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                          linear_bias: torch.Tensor | None = None, kind: str = "z", a: float = 0.05,
                          b: float = 20.0, eps: float = 1e-6, var_eps: float = 1e-6,
                          ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """spherical_loss of the logits `F.linear(input, linear_weight, linear_bias)`."""
    logits = F.linear(input, linear_weight, linear_bias)
    return spherical_loss(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), kind, a=a, b=b, eps=eps,
                          var_eps=var_eps, ignore_index=ignore_index,
                          reduction=reduction).reshape(target.shape if reduction == "none" else ())


def linear_topk(input: torch.Tensor, linear_weight: torch.Tensor, k: int, *,
                linear_bias: torch.Tensor | None = None):
    """Top-k of the full logits (values, indices), largest first."""
    return F.linear(input, linear_weight, linear_bias).topk(k, dim=-1)
