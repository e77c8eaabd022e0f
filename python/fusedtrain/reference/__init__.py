"""Pure-PyTorch, float64-capable references: one module per op family."""
from . import spherical

__all__ = ["spherical"]
