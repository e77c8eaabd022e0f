"""Pure-PyTorch references of the mining family (docs/mining.md), float64-capable.

These build the full B×M similarity matrix and boolean masks (the very thing the fused ops avoid):
they define the semantics the kernels are tested against and serve as the fallback without a build.
`ref_emb=None` means the reference set is the batch itself, self pairs excluded. `self_index` (B,)
names each anchor's own column in `ref_emb` (cross-batch memory): it counts for the mining thresholds
but is dropped from the loss's positives afterwards, as PML's CrossBatchMemory does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity(embeddings: torch.Tensor, ref_emb: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity S = normalize(E)·normalize(R)ᵀ (F.normalize, eps 1e-12), B×M."""
    q = F.normalize(embeddings, dim=1)
    r = q if ref_emb is None else F.normalize(ref_emb, dim=1)
    return q @ r.t()


def pair_masks(labels: torch.Tensor, ref_labels: torch.Tensor | None = None):
    """Positive and negative masks (B×M); in-batch (ref_labels None) the diagonal is neither."""
    in_batch = ref_labels is None
    ref = labels if in_batch else ref_labels
    pos = labels[:, None] == ref[None, :]
    if in_batch:
        pos.fill_diagonal_(False)
    neg = labels[:, None] != ref[None, :]
    return pos, neg


def _row_min(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    filled = x.masked_fill(~mask, float("inf"))
    return filled.amin(1) if x.shape[1] else torch.full(x.shape[:1], float("inf"), dtype=x.dtype)


def _row_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    filled = x.masked_fill(~mask, float("-inf"))
    return filled.amax(1) if x.shape[1] else torch.full(x.shape[:1], float("-inf"), dtype=x.dtype)


def multi_similarity_masks(S: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, epsilon: float):
    """Mined positives/negatives: strict comparisons of S ∓ ε with the row's hardest opposite pair."""
    S = S.detach()
    min_pos = _row_min(S, pos).to(S.device)
    max_neg = _row_max(S, neg).to(S.device)
    keep_pos = pos & ((S - epsilon) < max_neg[:, None])
    keep_neg = neg & ((S + epsilon) > min_pos[:, None])
    return keep_pos, keep_neg


def similarity_masks(embeddings, labels, ref_emb, ref_labels):
    S = similarity(embeddings, ref_emb)
    pos, neg = pair_masks(labels, None if ref_emb is None else ref_labels)
    return S, pos, neg


def _as_tuple(keep_pos, keep_neg):
    a1, p = torch.where(keep_pos)
    a2, n = torch.where(keep_neg)
    return a1, p, a2, n


@torch.no_grad()
def multi_similarity_mine(embeddings, labels, ref_emb=None, ref_labels=None, *, epsilon=0.1):
    """PML MultiSimilarityMiner(epsilon): (a1, p, a2, n)."""
    S, pos, neg = similarity_masks(embeddings, labels, ref_emb, ref_labels)
    return _as_tuple(*multi_similarity_masks(S, pos, neg, epsilon))


@torch.no_grad()
def pair_margin_mine(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin=0.2,
                     neg_margin=0.8):
    """PML PairMarginMiner with cosine similarity: positives S < pos_margin, negatives S > neg_margin."""
    S, pos, neg = similarity_masks(embeddings, labels, ref_emb, ref_labels)
    return _as_tuple(pos & (S < pos_margin), neg & (S > neg_margin))


@torch.no_grad()
def batch_hard_mine(embeddings, labels, ref_emb=None, ref_labels=None):
    """PML BatchHardMiner with cosine similarity: (a, p, n), lowest-S positive, highest-S negative."""
    S, pos, neg = similarity_masks(embeddings, labels, ref_emb, ref_labels)
    B = S.shape[0]
    if S.shape[1] == 0:
        empty = torch.empty(0, dtype=torch.long, device=S.device)
        return empty, empty.clone(), empty.clone()
    p = S.masked_fill(~pos, float("inf")).min(1).indices
    n = S.masked_fill(~neg, float("-inf")).max(1).indices
    keep = pos.any(1) & neg.any(1)
    a = torch.arange(B, device=S.device)
    return a[keep], p[keep], n[keep]


def _log1p_sum_exp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(1 + Σ_{mask} exp(x)) per row (0 for an empty row)."""
    x = x.masked_fill(~mask, float("-inf"))
    zeros = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)
    return torch.logsumexp(torch.cat([x, zeros], dim=1), dim=1)


def multi_similarity_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, alpha=2.0, beta=50.0,
                          base=0.5, epsilon=0.1, mine=True, self_index=None):
    """PML MultiSimilarityLoss(alpha, beta, base) over MultiSimilarityMiner(epsilon)'s pairs (all
    pairs when mine=False); the mean of the per-anchor losses over all B anchors (0 for B = 0)."""
    S, pos, neg = similarity_masks(embeddings, labels, ref_emb, ref_labels)
    keep_pos, keep_neg = multi_similarity_masks(S, pos, neg, epsilon) if mine else (pos, neg)
    if self_index is not None:
        rows = torch.arange(S.shape[0], device=S.device)
        valid = (self_index >= 0) & (self_index < S.shape[1])
        keep_pos = keep_pos.clone()
        keep_pos[rows[valid], self_index[valid]] = False
    pos_loss = _log1p_sum_exp(-alpha * (S - base), keep_pos) / alpha
    neg_loss = _log1p_sum_exp(beta * (S - base), keep_neg) / beta
    if S.shape[0] == 0:
        return (pos_loss.sum() + neg_loss.sum()) * 0
    return (pos_loss + neg_loss).mean()


def tcm_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, lambda_plus=1.0, lambda_minus=1.0,
             margin_plus=0.9, margin_minus=0.5):
    """Threshold-consistent margin regularizer over all positive / negative pairs (inclusive)."""
    S, pos, neg = similarity_masks(embeddings, labels, ref_emb, ref_labels)
    act_pos = pos & (S <= margin_plus)
    act_neg = neg & (S >= margin_minus)
    zero = S.sum() * 0
    n_pos, n_neg = act_pos.sum(), act_neg.sum()
    pos_term = torch.where(n_pos > 0, ((margin_plus - S) * act_pos).sum() / n_pos.clamp_min(1), zero)
    neg_term = torch.where(n_neg > 0, ((S - margin_minus) * act_neg).sum() / n_neg.clamp_min(1), zero)
    return lambda_plus * pos_term + lambda_minus * neg_term
