"""Pure-PyTorch, float64-capable references: one module per op family."""
from . import frugal, mining, spherical

__all__ = ["frugal", "mining", "spherical"]
