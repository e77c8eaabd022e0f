"""The mining family's functional ops (maths: docs/mining.md): the fused Multi-Similarity loss,
Multi-Similarity / pair-margin / batch-hard mining and the TCM regularizer, never holding B×M.

Every op normalizes the rows (F.normalize) and walks the batch in row chunks: one at::mm gives a tile
of S = Ê·R̂ᵀ (bounded rows × all M reference columns) that a C++/CUDA kernel reduces per row
(thresholds, log-sum-exps, counts). When a gradient will be wanted, the Multi-Similarity forward
turns each tile into dL/dS right after its rows' statistics and multiplies it into the gradients
(backward only scales them); otherwise, and for TCM, backward recomputes the tiles. Extra memory: the
normalized copies, one tile (8 MiB of fp32 on CPU, 16 MiB on CUDA), the gradients, O(B) statistics.

Reference set: `ref_emb=None` (or `ref_emb is embeddings`) means the batch itself, self pairs
excluded. bfloat16/float16 inputs are computed in float32 (S included) and the loss returned in the
input dtype; float32 and float64 are computed in their own precision, as PML does.
"""
from __future__ import annotations

import torch

from .._core import backend
from . import reference as _reference
from .checks import check_finite, check_labels, ms_hyperparameters, operands, tcm_hyperparameters
from .precision import fp32_loss, fp32_mining


@fp32_loss
def multi_similarity_loss(embeddings: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor | None = None,
                          ref_labels: torch.Tensor | None = None, *, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5, epsilon: float = 0.1, mine: bool = True,
                          self_index: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-Similarity loss over Multi-Similarity-mined pairs, fused, never holding B×M.

    Equals PML's `MultiSimilarityLoss(alpha, beta, base)(emb, labels,
    MultiSimilarityMiner(epsilon)(emb, labels, ref_emb, ref_labels), ref_emb, ref_labels)` (without
    PML's "0 when every index list has at most one pair" quirk, which the PML-compatible class keeps).
    mine=False: all pairs (PML's loss without a miner). Gradients flow to `embeddings` and, when it
    requires grad, to `ref_emb`. self_index (B,) int64: each anchor's own column in `ref_emb`
    (cross-batch memory); it counts for the mining thresholds but is dropped from the positives.
    """
    embeddings, labels, ref_emb, ref_labels = operands(embeddings, labels, ref_emb, ref_labels)
    alpha, beta, base, epsilon = ms_hyperparameters(alpha, beta, base, epsilon)
    if self_index is not None:
        if ref_emb is None:
            raise ValueError("self_index needs ref_emb (it names each anchor's column in ref_emb)")
        self_index = check_labels("self_index", self_index, embeddings.shape[0], "embeddings",
                                   embeddings.device)
    if not backend.use_kernel("multi_similarity_loss", embeddings.device):
        return _reference.multi_similarity_loss(embeddings, labels, ref_emb, ref_labels, alpha=alpha,
                                                beta=beta, base=base, epsilon=epsilon, mine=bool(mine),
                                                self_index=self_index)
    loss, _, _, _ = torch.ops.fusedtrain.multi_similarity_loss(embeddings, labels, ref_emb, ref_labels, self_index,
                                                               alpha, beta, base, epsilon, bool(mine),
                                                               *_grad_flags(embeddings, ref_emb))
    return loss


def _grad_flags(embeddings, ref_emb) -> tuple[bool, bool]:
    """(compute_grad, ref_grad): when a gradient will be wanted, the forward computes it from its own
    tiles of S (backward then only scales it), saving the recomputation of S."""
    ref_grad = torch.is_grad_enabled() and ref_emb is not None and ref_emb.requires_grad
    return (torch.is_grad_enabled() and embeddings.requires_grad) or ref_grad, ref_grad


@fp32_mining
def multi_similarity_loss_with_stats(embeddings, labels, ref_emb=None, ref_labels=None, **kw):
    """(loss, row_stats) of the compiled op; row_stats (B, STAT_COUNT) holds per anchor the columns
    named by `stats.MsStat` (thresholds, the two log(1 + Σ exp), the numbers of mined positives and
    negatives). Needs the compiled kernels."""
    embeddings, labels, ref_emb, ref_labels = operands(embeddings, labels, ref_emb, ref_labels)
    alpha, beta, base, epsilon = ms_hyperparameters(kw.get("alpha", 2.0), kw.get("beta", 50.0), kw.get("base", 0.5),
                                           kw.get("epsilon", 0.1))
    loss, stats, _, _ = torch.ops.fusedtrain.multi_similarity_loss(
        embeddings, labels, ref_emb, ref_labels, kw.get("self_index"), alpha, beta, base, epsilon,
        bool(kw.get("mine", True)), *_grad_flags(embeddings, ref_emb))
    return loss, stats


@fp32_mining
def _mine(rule: str, embeddings, labels, ref_emb, ref_labels, epsilon=0.1, pos_margin=0.2, neg_margin=0.8):
    embeddings, labels, ref_emb, ref_labels = operands(embeddings, labels, ref_emb, ref_labels)
    epsilon = check_finite("epsilon", epsilon)
    pos_margin, neg_margin = check_finite("pos_margin", pos_margin), check_finite("neg_margin", neg_margin)
    with torch.no_grad():
        if not backend.use_kernel("mine_pairs", embeddings.device):
            if rule == "multi_similarity":
                return _reference.multi_similarity_mine(embeddings, labels, ref_emb, ref_labels, epsilon=epsilon)
            return _reference.pair_margin_mine(embeddings, labels, ref_emb, ref_labels,
                                               pos_margin=pos_margin, neg_margin=neg_margin)
        return tuple(torch.ops.fusedtrain.mine_pairs(embeddings, labels, ref_emb, ref_labels, rule, epsilon,
                                                     pos_margin, neg_margin))


def multi_similarity_mine(embeddings, labels, ref_emb=None, ref_labels=None, *, epsilon: float = 0.1):
    """Multi-Similarity mining (PML MultiSimilarityMiner): int64 `(a1, p, a2, n)`; anchors index
    `embeddings`, p/n the reference set. Order within the tuple is unspecified (compare as sets)."""
    return _mine("multi_similarity", embeddings, labels, ref_emb, ref_labels, epsilon=epsilon)


def pair_margin_mine(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin: float = 0.2,
                     neg_margin: float = 0.8):
    """Pair-margin mining with cosine similarity (PML PairMarginMiner(distance=CosineSimilarity());
    the class defaults to LpDistance, as PML): positives with S < pos_margin,
    negatives with S > neg_margin. int64 `(a1, p, a2, n)`."""
    return _mine("pair_margin", embeddings, labels, ref_emb, ref_labels, pos_margin=pos_margin,
                 neg_margin=neg_margin)


@fp32_mining
def batch_hard_mine(embeddings, labels, ref_emb=None, ref_labels=None):
    """Batch-hard mining (PML BatchHardMiner(distance=CosineSimilarity())): int64 `(a, p, n)`, per anchor the lowest-S
    positive and highest-S negative (first index on ties); anchors lacking either are dropped."""
    embeddings, labels, ref_emb, ref_labels = operands(embeddings, labels, ref_emb, ref_labels)
    with torch.no_grad():
        if not backend.use_kernel("batch_hard_mine", embeddings.device):
            return _reference.batch_hard_mine(embeddings, labels, ref_emb, ref_labels)
        return tuple(torch.ops.fusedtrain.batch_hard_mine(embeddings, labels, ref_emb, ref_labels))


@fp32_loss
def tcm_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, lambda_plus: float = 1.0,
             lambda_minus: float = 1.0, margin_plus: float = 0.9, margin_minus: float = 0.5) -> torch.Tensor:
    """Threshold-consistent margin regularizer (PML ThresholdConsistentMarginLoss), fused:
    λ⁺·mean_{s∈S⁺, s<=m⁺}(m⁺ − s) + λ⁻·mean_{s∈S⁻, s>=m⁻}(s − m⁻) over all pairs. Unlike PML 2.9.0,
    `ref_emb` is honoured."""
    embeddings, labels, ref_emb, ref_labels = operands(embeddings, labels, ref_emb, ref_labels)
    hyper = tcm_hyperparameters(lambda_plus, lambda_minus, margin_plus, margin_minus)
    if not backend.use_kernel("tcm_loss", embeddings.device):
        return _reference.tcm_loss(embeddings, labels, ref_emb, ref_labels, lambda_plus=hyper[0],
                                   lambda_minus=hyper[1], margin_plus=hyper[2], margin_minus=hyper[3])
    loss, _ = torch.ops.fusedtrain.tcm_loss(embeddings, labels, ref_emb, ref_labels, *hyper)
    return loss
