"""`fusedtrain.linear_spherical`: the fused linear spherical loss, kept at this path for existing
imports; it lives in `fusedtrain.spherical` (linear.py, modules.py)."""
from __future__ import annotations

from .spherical.linear import LinearStats, TopK, linear_spherical_loss, linear_spherical_stats, linear_topk
from .spherical.modules import LinearSphericalLoss, SphericalHead

__all__ = ["LinearStats", "linear_spherical_stats", "linear_spherical_loss", "linear_topk",
           "LinearSphericalLoss", "SphericalHead", "TopK"]
