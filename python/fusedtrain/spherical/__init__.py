"""Softmax-free spherical losses (maths: docs/spherical.md).

`spherical_loss` works on logits; `linear_spherical_loss` fuses the classifier's linear layer and never
forms the N x D logits (Gram-matrix form); `SphericalLoss`, `LinearSphericalLoss` and `SphericalHead`
are their modules (also in `fusedtrain.nn`).
"""
from . import registration  # noqa: F401  (attaches fake kernels and autograd to the compiled ops)
from .checks import DEFAULT_A, DEFAULT_B, DEFAULT_EPS, DEFAULT_VAR_EPS
from .linear import LinearStats, TopK, linear_spherical_loss, linear_spherical_stats, linear_topk
from .modules import LinearSphericalLoss, SphericalHead, SphericalLoss
from .ops import spherical_loss
from .reference import KINDS, REDUCTIONS

__all__ = ["spherical_loss", "linear_spherical_loss", "linear_spherical_stats", "linear_topk", "LinearStats",
           "TopK", "SphericalLoss", "LinearSphericalLoss", "SphericalHead", "KINDS", "REDUCTIONS",
           "DEFAULT_A", "DEFAULT_B", "DEFAULT_EPS", "DEFAULT_VAR_EPS"]
