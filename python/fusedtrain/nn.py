"""`torch.nn` modules over the functional ops (`fusedtrain.nn.*`)."""
from __future__ import annotations

from .spherical.modules import LinearSphericalLoss, SphericalHead, SphericalLoss

__all__ = ["SphericalLoss", "LinearSphericalLoss", "SphericalHead"]
