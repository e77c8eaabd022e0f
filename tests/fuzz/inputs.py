"""Inputs shared by the fuzz cases."""
from __future__ import annotations

import torch

import fusedtrain
from fusedtrain import sae as S

OPS = torch.ops.fusedtrain
NAN, INF = float("nan"), float("inf")
META = torch.device("meta")


def sparse(B: int = 8, F: int = 32, k: int = 3) -> S.SparseActs:
    """Valid SAE activations to corrupt: TopK of random pre-activations, CSR by token."""
    return S.topk_route(torch.randn(B, F), k)


def z_loss_fp64(row: torch.Tensor, c: int, a: float = 0.05, b: float = 20.0) -> float:
    """The float64 reference Z-loss of one row against class c."""
    return float(fusedtrain.reference.spherical.spherical_loss(row[None].double(), torch.tensor([c]), "z",
                                                                a=a, b=b))
