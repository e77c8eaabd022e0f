"""Pure-PyTorch, float64-capable references: one module per op family."""
from . import frugal, sae, spherical

__all__ = ["frugal", "sae", "spherical"]
