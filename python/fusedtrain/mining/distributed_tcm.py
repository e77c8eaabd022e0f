"""The threshold-consistent margin loss (TCM) split over ranks, for `DistributedLossWrapper`
(docs/distributed.md).

One process computes L = λ⁺·Σ⁺/N⁺ + λ⁻·Σ⁻/N⁻: Σ⁺ the sum of m⁺ − s over the active positive pairs
(s <= m⁺), N⁺ their number, likewise Σ⁻ (s − m⁻) and N⁻ over the negatives with s >= m⁻. Rank r
holds some of the anchors: it computes their sums Σ⁺_r, Σ⁻_r against every rank's rows, and the
global counts N± by one all-reduce of its own counts. Its share λ⁺·Σ⁺_r/N⁺ + λ⁻·Σ⁻_r/N⁻ is exact,
and the shares add up over the ranks to L (the counts are constants of the step, as in one process).

The gathered rows hold each anchor's own row, which one process never pairs with it. So the
anchors' own block runs as "the batch itself" (the op excludes self pairs) and the other ranks' rows
as a reference set: two calls of the fused op, whose counts and sums add up.

With the compiled kernels, the sums are the op's per-row statistics; its backward divides by the
counts of its own call, so it is called with λ± scaled by n±_call/N± (dL/dS = −λ⁺/N⁺ on the active
positives, +λ⁻/N⁻ on the active negatives, as in one process). Without them, the dense reference
masks give the sums and autograd the gradient.
"""
from __future__ import annotations

import torch

from .._core import autocast, backend
from .._core.distributed import sum_partials
from . import reference as _reference
from .stats import TcmStat

_COUNTS = [TcmStat.NUM_POS, TcmStat.NUM_NEG]


def _share(sums: torch.Tensor, counts: torch.Tensor, lambdas) -> torch.Tensor:
    """λ⁺·Σ⁺/N⁺ + λ⁻·Σ⁻/N⁻ with a side of no active pair (N = 0) contributing 0, as the op."""
    terms = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return lambdas[0] * terms[0] + lambdas[1] * terms[1]


# The family's float32 policy (precision.py), the reference sets included.
@autocast.policy(autocast.FP32, device="embeddings", cast_args=("embeddings", "parts"), loss=True)
def tcm_share(loss, embeddings: torch.Tensor, labels: torch.Tensor, parts, group) -> torch.Tensor:
    """This rank's share of the TCM loss `loss` (a ThresholdConsistentMarginLoss): its anchors
    (`embeddings`, `labels`) against each `(ref_emb, ref_labels)` of `parts` (None, None: the anchors
    themselves, self pairs excluded), the counts summed over `group`."""
    hyper = (loss.lambda_plus, loss.lambda_minus, loss.margin_plus, loss.margin_minus)
    if backend.use_kernel("tcm_loss", embeddings.device):
        flat = [t for part in parts for t in part]
        return _KernelShare.apply(embeddings, labels, hyper, group, *flat)
    sums, counts = [], []
    margin_plus, margin_minus = hyper[2], hyper[3]
    for ref_emb, ref_labels in parts:
        S, pos, neg = _reference.similarity_masks(embeddings, labels, ref_emb, ref_labels)
        active_pos, active_neg = pos & (S <= margin_plus), neg & (S >= margin_minus)
        sums.append(torch.stack([((margin_plus - S) * active_pos).sum(), ((S - margin_minus) * active_neg).sum()]))
        counts.append(torch.stack([active_pos.sum(), active_neg.sum()]))
    total = sum_partials(torch.stack(counts).sum(0).to(sums[0].dtype), group)
    return _share(torch.stack(sums).sum(0), total, hyper[:2])


class _KernelShare(torch.autograd.Function):
    """The share by the fused op: forward from its statistics, backward by its own backward with
    λ± rescaled to the global counts (module docstring)."""

    @staticmethod
    def forward(ctx, embeddings, labels, hyper, group, *flat):
        parts = list(zip(flat[0::2], flat[1::2]))
        stats = [torch.ops.fusedtrain.tcm_loss(embeddings, labels, ref, ref_labels, *hyper)[1]
                 for ref, ref_labels in parts]
        per_part = torch.stack([s.sum(0) for s in stats])  # SUM_POS, NUM_POS, SUM_NEG, NUM_NEG per call
        local = per_part.sum(0)
        total = sum_partials(local[_COUNTS].clone(), group)
        ctx.hyper, ctx.counts = hyper, (per_part[:, _COUNTS], total)
        ctx.save_for_backward(embeddings, labels, *flat, *stats)
        ctx.n_parts = len(parts)
        value = _share(local[[TcmStat.SUM_POS, TcmStat.SUM_NEG]], total, hyper[:2])
        return value.to(embeddings.dtype)

    @staticmethod
    def backward(ctx, grad):
        embeddings, labels, *rest = ctx.saved_tensors
        n = ctx.n_parts
        flat, stats = rest[:2 * n], rest[2 * n:]
        lambda_plus, lambda_minus, margin_plus, margin_minus = ctx.hyper
        # The backward op takes its λ as numbers: one host read of the counts per step.
        part_counts, total = (t.tolist() for t in ctx.counts)
        grad_emb, grad_flat = None, [None] * (2 * n)
        for i in range(n):
            ref, ref_labels = flat[2 * i], flat[2 * i + 1]
            own = part_counts[i]
            scaled = [lam * (c / t if t > 0 else 0.0) for lam, c, t in zip((lambda_plus, lambda_minus), own, total)]
            need_ref = ref is not None and ctx.needs_input_grad[4 + 2 * i]
            gx, gr = torch.ops.fusedtrain._tcm_loss_backward(grad, embeddings, labels, ref, ref_labels, stats[i],
                                                             scaled[0], scaled[1], margin_plus, margin_minus, need_ref)
            grad_emb = gx if grad_emb is None else grad_emb + gx
            if need_ref:
                grad_flat[2 * i] = gr
        return (grad_emb if ctx.needs_input_grad[0] else None, None, None, None, *grad_flat)
