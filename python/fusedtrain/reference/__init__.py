"""Pure-PyTorch, float64-capable references: one module per op family."""
from . import mining, spherical

__all__ = ["mining", "spherical"]
