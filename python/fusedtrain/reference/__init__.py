"""Pure-PyTorch, float64-capable references: one module per op family."""
from . import linear_spherical, spherical

__all__ = ["linear_spherical", "spherical"]
