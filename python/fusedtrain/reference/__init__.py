"""Pure-PyTorch, float64-capable references: one module per op family."""
from . import sae, spherical

__all__ = ["sae", "spherical"]
