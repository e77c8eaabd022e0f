"""Optimizers (`fusedtrain.optim.*`): FRUGAL and its fused multi-tensor step (maths: docs/frugal.md)."""
from . import registration  # noqa: F401  (attaches the fake kernel to the compiled step)
from .frugal import FRUGAL
from .step import frugal_step_
from .subspace import BLOCK_ORDERS, FREE_UPDATES, PROJECTIONS

__all__ = ["FRUGAL", "frugal_step_", "PROJECTIONS", "FREE_UPDATES", "BLOCK_ORDERS"]
