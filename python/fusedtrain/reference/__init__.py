"""Pure-PyTorch, float64-capable references: one module per op family."""
from . import frugal, spherical

__all__ = ["frugal", "spherical"]
