"""FRUGAL's subspace bookkeeping: the kinds of per-tensor update the fused step knows, the options,
and the subspace choice (random columns/rows/blocks, SVD or random semi-orthogonal bases). Shared by
`FRUGAL` and `FRUGALReference`, so the two draw the same subspaces from the same seed."""
from __future__ import annotations

import math

import torch

from .._core.dtypes import accumulate_dtype

# Kinds of per-tensor update of the fused op (csrc/frugal/frugal_math.h).
DENSE, COLUMNS, ROWS, FREE, RESIDUAL = range(5)

PROJECTIONS = ("columns", "rows", "block", "svd", "random")
FREE_UPDATES = ("signsgd", "sgd", "none")
BLOCK_ORDERS = ("random", "ascending", "descending")



def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """The (rows, cols) view of a tensor: dim >= 2 as (size(0), rest), 1-D as one row."""
    if p.dim() < 2:
        return 1, p.numel()
    return p.shape[0], math.prod(p.shape[1:])


def subspace_size(density: float, size: int) -> int:
    """round(density·size), halves rounded up (Python's round() would round them to even)."""
    return min(size, int(math.floor(density * size + 0.5)))


def select_indices(size: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct indices of [0, size), uniformly at random, sorted, int32 (on the CPU)."""
    return torch.randperm(size, generator=generator)[:k].sort().values.to(torch.int32)


def svd_basis(G: torch.Tensor, r: int, right: bool) -> torch.Tensor:
    """Top-r right (n×r) or left (m×r) singular vectors of G, in fp32 (fp64 for fp64)."""
    U, _, Vh = torch.linalg.svd(G.to(accumulate_dtype(G.dtype)), full_matrices=False)
    return Vh[:r].T.contiguous() if right else U[:, :r].contiguous()


def random_basis(size: int, r: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A random semi-orthogonal size×r matrix (Q of a Gaussian's QR), drawn on the CPU."""
    gauss = torch.randn(size, r, generator=generator, dtype=torch.float64)
    q, rr = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(rr)).where(torch.diagonal(rr) != 0, torch.ones(()))
    return q.to(dtype)


def block_selection(count: int, k: int, refresh: int, order: str, generator: torch.Generator) -> set[int]:
    """Which of `count` tensors are state-full after refresh number `refresh` (0, 1, ...).

    random: k drawn afresh; ascending/descending: the next k in (reverse) order, cycling (BAdam).
    """
    if count == 0 or k == 0:
        return set()
    if order == "random":
        return set(torch.randperm(count, generator=generator)[:k].tolist())
    chosen = {(refresh * k + i) % count for i in range(k)}
    return chosen if order == "ascending" else {count - 1 - c for c in chosen}
