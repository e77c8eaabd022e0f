"""Pure-PyTorch, float64-capable references: one module per op family."""
from . import frugal, linear_spherical, mining, sae, spherical

__all__ = ["frugal", "linear_spherical", "mining", "sae", "spherical"]
