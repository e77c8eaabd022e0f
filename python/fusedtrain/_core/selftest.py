"""What a family's self-check returns: a named relative error next to its tolerance."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Check:
    name: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # NaN fails


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in norm, float64."""
    value, ref = value.double(), ref.double()
    return ((value - ref).norm() / ref.norm().clamp_min(1e-30)).item()
