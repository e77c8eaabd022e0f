"""The Python-level tiled path of the PML-compatible classes: any supported distance (LpDistance
as well as cosine) and any PML reducer, never holding the B×M matrix.

The compiled kernels take cosine similarity and the mean. For an `LpDistance`, or a reducer that
needs one loss per anchor, the classes walk the rows in chunks instead: each chunk's tile of PML's
matrix (`distances.matrix_tile`: q·rᵀ, or torch.cdist with the compute mode PML's single call would
use, so the entries are PML's) is reduced per row right away. Losses run each chunk under
activation checkpointing, so backward recomputes the tile rather than keeping it: memory is one
tile (8 MiB of fp32) and its intermediates plus O(B·d), as in the kernels. A matrix of one tile
keeps its intermediates for backward instead (the same peak: a recomputation makes them too).
This is plain PyTorch (a GEMM or cdist per tile plus elementwise ops), slower than the kernels; see
docs/mining.md for the measured cost.

Everything here follows PML's formulas with PML's `is_inverted` convention: for a similarity,
larger = more similar; for a distance, smaller.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from . import reference as _reference
from .distances import DistanceSpec, cdist_mode, matrix_tile, prepared

_TILE_ELEMENTS = 1 << 21  # 8 MiB of fp32 per tile, as the CPU kernels


class Tiles:
    """Row chunks of PML's matrix for (embeddings, ref_emb) under `spec`, with the pair masks.
    `ref_emb=None` is the batch itself (self pairs excluded), as everywhere in the family."""

    def __init__(self, embeddings, labels, ref_emb, ref_labels, spec: DistanceSpec):
        self.spec = spec
        self.q, self.r = prepared(embeddings, ref_emb, spec)
        self.labels = labels
        self.ref_labels = labels if ref_emb is None else ref_labels
        self.in_batch = ref_emb is None
        self.B, self.M = self.q.shape[0], self.r.shape[0]
        self.mode = cdist_mode(self.B, self.M)

    def chunks(self):
        step = max(1, _TILE_ELEMENTS // max(self.M, 1))
        return [(b, min(self.B, b + step)) for b in range(0, self.B, step)]

    def tile(self, b: int, e: int, q=None, r=None) -> torch.Tensor:
        return matrix_tile((self.q if q is None else q)[b:e], self.r if r is None else r, self.spec, self.mode)

    def masks(self, b: int, e: int):
        """(positives, negatives) of rows [b, e), bool (e − b) × M; self pairs are neither."""
        same = self.labels[b:e, None] == self.ref_labels[None, :]
        pos, neg = same.clone(), ~same
        if self.in_batch:
            rows = torch.arange(e - b, device=same.device)
            pos[rows, rows + b] = False
            neg[rows, rows + b] = False
        return pos, neg


def _fill(x, mask, value):
    return x.masked_fill(~mask, value)


def _row_hardest(mat, pos, neg, inverted: bool):
    """Per row: the threshold values PML's Multi-Similarity miner compares with — the least similar
    positive and the most similar negative (±inf for an empty set)."""
    inf = float("inf")
    if inverted:
        return _fill(mat, pos, inf).amin(1, keepdim=True), _fill(mat, neg, -inf).amax(1, keepdim=True)
    return _fill(mat, pos, -inf).amax(1, keepdim=True), _fill(mat, neg, inf).amin(1, keepdim=True)


def ms_keep(mat, pos, neg, epsilon: float, inverted: bool):
    """PML MultiSimilarityMiner: keep a positive that is within ε of the hardest negative and a negative
    within ε of the hardest positive (strict; `x ± ε` computed first, as PML)."""
    if mat.shape[1] == 0:
        return pos, neg
    worst_pos, best_neg = _row_hardest(mat, pos, neg, inverted)
    if inverted:
        return pos & (mat - epsilon < best_neg), neg & (mat + epsilon > worst_pos)
    return pos & (mat + epsilon > best_neg), neg & (mat - epsilon < worst_pos)


def _where(mask, offset: int):
    a, o = torch.where(mask)
    return a + offset, o


def _cat(parts, device):
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)


@torch.no_grad()
def mine_pairs(tiles: Tiles, select):
    """(a1, p, a2, n) of the pairs `select(b, e, mat, pos, neg) -> (keep_pos, keep_neg)` keeps, in
    PML's row-major order."""
    parts = ([], [], [], [])
    for b, e in tiles.chunks():
        mat = tiles.tile(b, e)
        pos, neg = tiles.masks(b, e)
        keep_pos, keep_neg = select(b, e, mat, pos, neg)
        for i, part in enumerate(_where(keep_pos, b) + _where(keep_neg, b)):
            parts[i].append(part)
    device = tiles.labels.device
    return tuple(_cat(p, device) for p in parts)


@torch.no_grad()
def all_pair_values(tiles: Tiles):
    """(Σ and count of the matrix over all positive pairs, the same over negatives), float64."""
    sums = torch.zeros(4, dtype=torch.float64, device=tiles.labels.device)
    for b, e in tiles.chunks():
        mat = tiles.tile(b, e).double()
        pos, neg = tiles.masks(b, e)
        sums += torch.stack([(mat * pos).sum(), pos.sum(), (mat * neg).sum(), neg.sum()])
    return sums.tolist()


@torch.no_grad()
def batch_hard(tiles: Tiles):
    """PML BatchHardMiner: per anchor the hardest positive and hardest negative (torch.max/min over
    the masked row, as PML); anchors lacking either are dropped. Returns (a, p, n, pos_value,
    neg_value)."""
    inverted, inf = tiles.spec.is_inverted, float("inf")
    out = ([], [], [], [], [])
    for b, e in tiles.chunks():
        if tiles.M == 0:
            break
        mat = tiles.tile(b, e)
        pos, neg = tiles.masks(b, e)
        if inverted:  # similarity: hardest positive = least similar, hardest negative = most similar
            p_val, p_idx = torch.min(_fill(mat, pos, inf), dim=1)
            n_val, n_idx = torch.max(_fill(mat, neg, -inf), dim=1)
        else:
            p_val, p_idx = torch.max(_fill(mat, pos, -inf), dim=1)
            n_val, n_idx = torch.min(_fill(mat, neg, inf), dim=1)
        keep = torch.where(pos.any(1) & neg.any(1))[0]
        for part, x in zip(out, (keep + b, p_idx[keep], n_idx[keep], p_val[keep], n_val[keep])):
            part.append(x)
    device = tiles.labels.device
    a, p, n = (_cat(x, device) for x in out[:3])
    values = [torch.cat(x) if x else torch.empty(0, dtype=tiles.q.dtype, device=device) for x in out[3:]]
    return a, p, n, values[0], values[1]


class PairListSelect:
    """`select` for given pair lists: each tile's masks hold the listed pairs of its rows (a pair
    listed twice counts once, as PML's mask)."""

    def __init__(self, a1, p, a2, n, M: int):
        self.pos, self.neg = self._sorted(a1, p), self._sorted(a2, n)
        self.M = M

    @staticmethod
    def _sorted(anchors, others):
        order = torch.argsort(anchors, stable=True)
        return anchors[order], others[order]

    def rows(self, b: int, e: int, pairs, like):
        anchors, others = pairs
        lo, hi = torch.searchsorted(anchors, torch.tensor([b, e], device=anchors.device)).tolist()
        mask = torch.zeros(e - b, self.M, dtype=torch.bool, device=like.device)
        mask[anchors[lo:hi] - b, others[lo:hi]] = True
        return mask

    def __call__(self, b, e, mat, pos, neg):
        return self.rows(b, e, self.pos, mat), self.rows(b, e, self.neg, mat)


def ms_losses(tiles: Tiles, select, alpha: float, beta: float, base: float):
    """PML MultiSimilarityLoss's per-anchor losses (B,) over the pairs `select(b, e, mat, pos, neg)`
    keeps, and the numbers of kept positive and negative pairs (int tensors). Differentiable through
    the embeddings (and ref_emb); each chunk under checkpointing."""
    inverted = tiles.spec.is_inverted

    def chunk(q, r, b: int, e: int):
        mat = tiles.tile(b, e, q, r)
        with torch.no_grad():
            pos, neg = tiles.masks(b, e)
            keep_pos, keep_neg = select(b, e, mat.detach(), pos, neg)
        pos_exp = base - mat if inverted else mat - base  # PML: distance.margin(mat, base)
        neg_exp = mat - base if inverted else base - mat  # PML: distance.margin(base, mat)
        losses = (_reference._log1p_sum_exp(alpha * pos_exp, keep_pos) / alpha
                  + _reference._log1p_sum_exp(beta * neg_exp, keep_neg) / beta)
        return losses, torch.stack([keep_pos.sum(), keep_neg.sum()])

    needs_grad = torch.is_grad_enabled() and (tiles.q.requires_grad or tiles.r.requires_grad)
    chunks = tiles.chunks()
    # One chunk is the whole matrix, at most one tile's elements: keeping its few tile-sized
    # intermediates for backward costs about as much memory as PML's matrix and saves recomputing it.
    recompute = needs_grad and len(chunks) > 1
    losses, counts = [], torch.zeros(2, dtype=torch.long, device=tiles.labels.device)
    for b, e in chunks:
        if recompute:
            loss, count = checkpoint(chunk, tiles.q, tiles.r, b, e, use_reentrant=False)
        else:
            loss, count = chunk(tiles.q, tiles.r, b, e)
        losses.append(loss)
        counts += count
    out = torch.cat(losses) if losses else tiles.q.new_zeros(0)
    return out, counts[0], counts[1]
