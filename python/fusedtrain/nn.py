"""`torch.nn` modules over the functional ops (`fusedtrain.nn.*`)."""
from __future__ import annotations

import torch

from . import spherical as _spherical
from .linear_spherical import LinearSphericalLoss, SphericalHead

__all__ = ["SphericalLoss", "LinearSphericalLoss", "SphericalHead"]


class SphericalLoss(torch.nn.Module):
    """Module form of :func:`fusedtrain.spherical_loss`, a drop-in for `nn.CrossEntropyLoss`.

    >>> criterion = fusedtrain.nn.SphericalLoss("z", a=0.05, b=20.0)
    >>> loss = criterion(logits, target)
    """

    def __init__(self, kind: str = "z", *, a: float = _spherical.DEFAULT_A,
                 b: float = _spherical.DEFAULT_B, eps: float = _spherical.DEFAULT_EPS,
                 var_eps: float = _spherical.DEFAULT_VAR_EPS, ignore_index: int = -100,
                 reduction: str = "mean", check_target: bool = True) -> None:
        super().__init__()
        if kind not in _spherical.KINDS:
            raise ValueError(f"kind must be one of {_spherical.KINDS}, got {kind!r}")
        if reduction not in _spherical.REDUCTIONS:
            raise ValueError(f"reduction must be one of {_spherical.REDUCTIONS}, got {reduction!r}")
        self.kind, self.a, self.b, self.eps, self.var_eps = kind, a, b, eps, var_eps
        self.ignore_index, self.reduction, self.check_target = ignore_index, reduction, check_target

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _spherical.spherical_loss(logits, target, self.kind, a=self.a, b=self.b, eps=self.eps,
                                         var_eps=self.var_eps, ignore_index=self.ignore_index,
                                         reduction=self.reduction, check_target=self.check_target)

    def extra_repr(self) -> str:
        hyper = f"a={self.a}, b={self.b}, var_eps={self.var_eps}" if self.kind == "z" else f"eps={self.eps}"
        return f"kind={self.kind!r}, {hyper}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
