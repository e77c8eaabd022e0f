"""The distances the PML-compatible classes accept, duck-typed (PML need not be installed).

PML's miners and losses take a `distance=` object. We honour exactly two kinds, whether they are
PML's objects or ours (`fusedtrain.mining.CosineSimilarity`, `fusedtrain.mining.LpDistance`, which
carry the same attributes), recognised by class name and attributes:

* `CosineSimilarity()`: S = normalize(E)·normalize(R)ᵀ, larger = more similar (`is_inverted`).
* `LpDistance(p=2, power=1 or 2, normalize_embeddings=True or False)`: D = ‖e − r‖₂ (power 2:
  squared), after L2-normalizing the rows when `normalize_embeddings`; smaller = more similar.

Anything else (DotProductSimilarity, SNRDistance, p ≠ 2, other powers, a subclass that may
override the maths) raises a TypeError naming what is supported, instead of silently computing
something else.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED = ("CosineSimilarity() or LpDistance(p=2, power=1 or 2, normalize_embeddings=True/False) "
             "(pytorch-metric-learning's or fusedtrain.mining's)")


@dataclass(frozen=True)
class DistanceSpec:
    """What a distance object means: `cosine`, or `lp` (p = 2) with `normalize` and `power`."""
    kind: str
    normalize: bool = True
    power: int = 1

    @property
    def is_inverted(self) -> bool:
        """PML's flag: larger means more similar (a similarity, not a distance)."""
        return self.kind == "cosine"


COSINE = DistanceSpec("cosine")
LP = DistanceSpec("lp")


def distance_spec(distance, owner: str) -> DistanceSpec:
    """The DistanceSpec of a PML-style distance object; TypeError (naming `owner`) if unsupported."""
    name = type(distance).__name__
    power = getattr(distance, "power", 1)
    normalize = getattr(distance, "normalize_embeddings", True)
    if name == "CosineSimilarity" and power == 1 and normalize is True and getattr(distance, "is_inverted", True):
        return COSINE
    if (name == "LpDistance" and getattr(distance, "p", 2) == 2 and power in (1, 2) and isinstance(normalize, bool)
            and not getattr(distance, "is_inverted", False)):
        return DistanceSpec("lp", normalize, int(power))
    detail = {k: getattr(distance, k) for k in ("p", "power", "normalize_embeddings") if hasattr(distance, k)}
    raise TypeError(f"{owner}: distance {name}({detail}) is not supported; supported: {SUPPORTED}")


class _Distance(torch.nn.Module):
    """Our stand-ins for PML's distance classes: the same attributes, and called on (query, ref)
    they return PML's full B×M matrix (a convenience; the miners and losses never build it)."""

    def __init__(self, normalize_embeddings: bool, p: int, power: int, is_inverted: bool):
        super().__init__()
        self.normalize_embeddings, self.p, self.power, self.is_inverted = normalize_embeddings, p, power, is_inverted

    def forward(self, query_emb: torch.Tensor, ref_emb: torch.Tensor | None = None) -> torch.Tensor:
        spec = distance_spec(self, type(self).__name__)
        q, r = prepared(query_emb, ref_emb, spec)
        return matrix_tile(q, r, spec, cdist_mode(q.shape[0], r.shape[0]))


class CosineSimilarity(_Distance):
    """PML's `CosineSimilarity()`: normalized dot products, larger = more similar."""

    def __init__(self):
        super().__init__(normalize_embeddings=True, p=2, power=1, is_inverted=True)


class LpDistance(_Distance):
    """PML's `LpDistance(normalize_embeddings=True, p=2, power=1)`; only p = 2 and power 1 or 2."""

    def __init__(self, normalize_embeddings: bool = True, p: int = 2, power: int = 1):
        super().__init__(normalize_embeddings=normalize_embeddings, p=p, power=power, is_inverted=False)
        distance_spec(self, "LpDistance")  # refuse p != 2 or other powers at construction


def prepared(embeddings: torch.Tensor, ref_emb: torch.Tensor | None, spec: DistanceSpec):
    """(q, r): the rows as the distance sees them (L2-normalized when the spec says so, as PML's
    F.normalize); r is q itself for the batch. bf16/fp16 are computed in fp32 (docs/mining.md)."""
    def prep(x):
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(x, p=2, dim=1) if spec.normalize else x
    q = prep(embeddings)
    return q, (q if ref_emb is None else prep(ref_emb))


def cdist_mode(B: int, M: int) -> str:
    """torch.cdist's own choice for the whole B×M matrix (the matmul form beyond 25 rows on either
    side), fixed so that a tile of rows gets the values PML's one cdist call gets."""
    return "use_mm_for_euclid_dist" if B > 25 or M > 25 else "donot_use_mm_for_euclid_dist"


def matrix_tile(q_rows: torch.Tensor, r: torch.Tensor, spec: DistanceSpec, mode: str) -> torch.Tensor:
    """PML's matrix entries for these rows: cosine as q·rᵀ, Lp as torch.cdist (then **power)."""
    if spec.kind == "cosine":
        return q_rows @ r.t()
    d = torch.cdist(q_rows, r, p=2, compute_mode=mode)
    return d if spec.power == 1 else d ** spec.power
