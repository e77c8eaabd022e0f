"""`DistributedLossWrapper`: metric learning over the batches of all ranks (docs/distributed.md).

Each rank holds its slice of the global batch. The wrapper all-gathers the embeddings (with autograd:
backward is a reduce-scatter) and the labels in rank order and computes the loss of this rank's
anchors against every rank's rows, self pairs excluded by global index. One DDP step on P ranks is
then the step of one process on the concatenated batch, `loss(emb, labels, miner(emb, labels))`.

Scaling. The single-process loss is a mean over the B global anchors, L = (1/B)·Σ_i L_i. Rank r
returns P·(1/B)·Σ_{i on rank r} L_i: the gather's backward sums every rank's share into the rows of
the rank that owns them, so the ranks' gradients add up to ∇L, and DDP, which averages over the P
ranks, needs the factor P. The mean over ranks of the returned values is L.

Self pairs. With the batch as its own reference set, anchor i's own row is in the gathered
reference set at global index offset + i. The fused op's `self_index` drops it from the positives
after mining, and it never is a negative. It still counts for the mining threshold min_{positives} S,
which only changes that threshold where the anchor has no other positive (S_ii is the largest
similarity); there the single process keeps no pair at all, so such anchors are left out of the op
(their loss is 0) while their rows stay references for everyone else.
"""
from __future__ import annotations

import torch

from .._core import backend
from .._core.distributed import (all_gather_rows, all_gather_sizes, group_rank, group_size, row_offset,
                                 sum_partials)
from . import ops as _ops
from . import reference as _reference
from .checks import check_embeddings, check_labels
from .distributed_tcm import tcm_share
from .pml import (BatchHardMiner, CrossBatchMemory, MultiSimilarityLoss, MultiSimilarityMiner,
                  PairMarginMiner, ThresholdConsistentMarginLoss)
from .pml_common import COSINE
from .reducers import is_plain_mean
from .stats import MsStat

_MINERS = (MultiSimilarityMiner, PairMarginMiner, BatchHardMiner)


def _split_exactly(loss, miner) -> bool:
    """Whether the per-rank split computes `loss` with `miner`: the fused op's meaning, that is cosine
    similarity, PML's mean and no embedding regularizer, with no miner or a cosine MS miner (other
    distances, reducers and regularizers change what the anchors' losses add up to)."""
    return (isinstance(loss, MultiSimilarityLoss) and loss.uses_kernels and loss.embedding_regularizer is None
            and (miner is None or (isinstance(miner, MultiSimilarityMiner) and miner.spec == COSINE)))


def _label_counts(labels: torch.Tensor, all_labels: torch.Tensor) -> torch.Tensor:
    """How often each of `labels` occurs in `all_labels` (every one of them does), without a B×B mask."""
    classes, counts = torch.unique(all_labels, return_counts=True)
    return counts[torch.searchsorted(classes, labels)]


def _ms_loss_and_counts(loss: MultiSimilarityLoss, embeddings, labels, ref_emb, ref_labels, self_index, miner):
    """The fused Multi-Similarity loss (mean over these anchors) and its mined pair counts
    (positives, negatives) as a float64 (2,) tensor, for PML's "at most one pair" rule."""
    mine = miner is not None
    kw = dict(alpha=loss.alpha, beta=loss.beta, base=loss.base, epsilon=miner.epsilon if mine else 0.0,
              mine=mine, self_index=self_index)
    if backend.use_kernel("multi_similarity_loss", embeddings.device):
        value, stats = _ops.multi_similarity_loss_with_stats(embeddings, labels, ref_emb, ref_labels, **kw)
        return value, stats[:, [MsStat.NUM_POS, MsStat.NUM_NEG]].sum(0).double()
    value = _ops.multi_similarity_loss(embeddings, labels, ref_emb, ref_labels, **kw)
    with torch.no_grad():  # the reference build: count from the dense masks of these rows
        S, pos, neg = _reference.similarity_masks(embeddings.detach(), labels, ref_emb.detach(), ref_labels)
        keep_pos, keep_neg = _reference.multi_similarity_masks(S, pos, neg, kw["epsilon"]) if mine else (pos, neg)
        if self_index is not None and S.shape[0]:
            keep_pos = keep_pos.clone()
            keep_pos[torch.arange(S.shape[0], device=S.device), self_index] = False
        return value, torch.stack([keep_pos.sum(), keep_neg.sum()]).double()


def _gather_labels(labels: torch.Tensor, group, sizes) -> torch.Tensor:
    with torch.no_grad():
        return all_gather_rows(labels, group, sizes)


class DistributedLossWrapper(torch.nn.Module):
    """PML's `DistributedLossWrapper`, exact: on P ranks, each with its slice of the batch, a DDP
    step takes the step of one process on the concatenated batch.

    `loss`: a `MultiSimilarityLoss`, a `ThresholdConsistentMarginLoss` (over all pairs: no miner,
    no `indices_tuple`) or a `CrossBatchMemory`; `miner` (optional): a `MultiSimilarityMiner`,
    `PairMarginMiner` or `BatchHardMiner`, applied to the local anchors against the gathered batch.
    `process_group`: the data-parallel group (default: the world).

    `forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, enqueue_mask=None)`
    returns this rank's loss, scaled for DDP's averaging (module docstring): its mean over the ranks
    is the single-process loss. An `indices_tuple` has anchors indexing this rank's rows and the
    other indices the gathered batch (or gathered `ref_emb`), in rank order. Under a
    `CrossBatchMemory`, every rank enqueues the gathered batch in rank order, so the memories agree.
    """

    def __init__(self, loss, miner=None, *, process_group=None):
        super().__init__()
        if not isinstance(loss, (MultiSimilarityLoss, ThresholdConsistentMarginLoss, CrossBatchMemory)):
            raise TypeError("loss must be a fusedtrain.mining.MultiSimilarityLoss, ThresholdConsistentMarginLoss or "
                            "CrossBatchMemory (losses whose mean the wrapper splits exactly over ranks), got "
                            f"{type(loss).__name__}")
        if isinstance(loss, ThresholdConsistentMarginLoss):
            if miner is not None:
                raise ValueError("miner: ThresholdConsistentMarginLoss is split over ranks over all pairs; a miner's "
                                 "pairs would change what its means are taken over")
            if not is_plain_mean(loss.reducer) or loss.embedding_regularizer is not None:
                raise ValueError("loss: DistributedLossWrapper splits ThresholdConsistentMarginLoss over ranks exactly "
                                 "with the mean reducer and no embedding_regularizer")
        if miner is not None and not isinstance(miner, _MINERS):
            raise TypeError(f"miner must be None or one of {[m.__name__ for m in _MINERS]}, got {type(miner).__name__}")
        if miner is not None and isinstance(loss, CrossBatchMemory):
            raise ValueError("miner: give it to CrossBatchMemory(loss, ..., miner=...), which mines against its memory")
        if isinstance(loss, MultiSimilarityLoss):
            own = miner if isinstance(miner, MultiSimilarityMiner) else (loss.miner if miner is None else None)
            if not _split_exactly(loss, own):
                raise ValueError("loss: DistributedLossWrapper splits the MultiSimilarityLoss over ranks exactly for cosine "
                                 "similarity, the mean reducer and no embedding_regularizer (with a cosine "
                                 "MultiSimilarityMiner); wrap a CrossBatchMemory, or run this loss in one process")
        self.loss, self.miner, self.process_group = loss, miner, process_group

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, enqueue_mask=None):
        check_embeddings("embeddings", embeddings)
        labels = check_labels("labels", labels, embeddings.shape[0], "embeddings", embeddings.device)
        if isinstance(self.loss, CrossBatchMemory):
            if ref_emb is not None or ref_labels is not None:
                raise ValueError("ref_emb/ref_labels: CrossBatchMemory's reference set is its memory")
            return self._cross_batch(embeddings, labels, indices_tuple, enqueue_mask)
        if enqueue_mask is not None:
            raise ValueError("enqueue_mask is only for a CrossBatchMemory loss")
        tcm = isinstance(self.loss, ThresholdConsistentMarginLoss)
        if tcm and indices_tuple is not None:
            raise ValueError("indices_tuple: ThresholdConsistentMarginLoss is split over ranks over all pairs")
        if group_size(self.process_group) == 1:
            if indices_tuple is None and self.miner is not None:
                indices_tuple = self.miner(embeddings, labels, ref_emb, ref_labels)
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        group, P, B_r = self.process_group, group_size(self.process_group), embeddings.shape[0]
        sizes = all_gather_sizes(B_r, group, embeddings.device)
        B = sum(sizes)
        E = all_gather_rows(embeddings, group, sizes)
        L = _gather_labels(labels, group, sizes)
        offset = row_offset(sizes, group_rank(group))  # this rank's first row in the gathered batch
        if ref_emb is None or ref_emb is embeddings:
            R, RL = E, L
            self_index = offset + torch.arange(B_r, device=embeddings.device)
        else:
            R, RL = self._gather_reference(embeddings, labels, ref_emb, ref_labels)
            self_index = None
        if tcm:  # a mean over active pairs, not over anchors: shares of sums over global counts
            if self_index is None:
                parts = [(R, RL)]
            else:  # the anchors' own rows as the batch itself (no self pair), the other ranks' rows as references
                others = torch.cat([E[:offset], E[offset + B_r:]]), torch.cat([L[:offset], L[offset + B_r:]])
                parts = [(None, None)] + ([others] if B > B_r else [])
            scaled = tcm_share(self.loss, embeddings, labels, parts, group) * P
        elif indices_tuple is None and (self.miner is None or isinstance(self.miner, MultiSimilarityMiner)):
            miner = self.miner if self.miner is not None else self.loss.miner
            scaled = self._fused_sum(embeddings, labels, R, RL, self_index, miner, L) * (P / max(B, 1))
        else:
            scaled = self._pairs_sum(embeddings, labels, R, RL, self_index, indices_tuple) * (P / max(B, 1))
        # An empty slice of the gathered rows keeps their gather (and its backward collective) in
        # every rank's graph, even where the loss is the constant 0.
        connected = E[:0].sum() + (R[:0].sum() if R is not E else 0)
        return scaled + connected

    def _gather_reference(self, embeddings, labels, ref_emb, ref_labels):
        check_embeddings("ref_emb", ref_emb)
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(f"ref_emb must have {embeddings.shape[1]} columns like embeddings, "
                             f"got {tuple(ref_emb.shape)}")
        ref_labels = check_labels("ref_labels", labels if ref_labels is None else ref_labels, ref_emb.shape[0],
                                  "ref_emb", embeddings.device)
        sizes = all_gather_sizes(ref_emb.shape[0], self.process_group, embeddings.device)
        return (all_gather_rows(ref_emb, self.process_group, sizes),
                _gather_labels(ref_labels, self.process_group, sizes))

    def _quirk_free(self, share, local_counts):
        """PML's rule on the global pair counts: the loss is 0 when every list has at most one pair."""
        total = sum_partials(local_counts, self.process_group)
        return torch.where((total <= 1).all(), torch.zeros_like(share), share)

    def _fused_sum(self, embeddings, labels, R, RL, self_index, miner, all_labels):
        """Σ_{local anchors} L_i by the fused op."""
        if miner is not None and self_index is not None:
            rows = (_label_counts(labels, all_labels) > 1).nonzero().squeeze(1)  # anchors with another positive
            embeddings, labels, self_index = embeddings[rows], labels[rows], self_index[rows]
        value, counts = _ms_loss_and_counts(self.loss, embeddings, labels, R, RL, self_index, miner)
        return self._quirk_free(value * embeddings.shape[0], counts)

    def _pairs_sum(self, embeddings, labels, R, RL, self_index, indices_tuple):
        """Σ_{local anchors} L_i over pair lists (a non-MS miner's, or the caller's)."""
        if indices_tuple is None:
            indices_tuple = tuple(self.miner(embeddings, labels, R, RL))
            if self_index is not None:  # drop the pairs (or triplets) whose positive is the anchor itself
                keep = indices_tuple[1] != self_index[indices_tuple[0]]
                indices_tuple = (tuple(t[keep] for t in indices_tuple) if len(indices_tuple) == 3 else
                                 (indices_tuple[0][keep], indices_tuple[1][keep], *indices_tuple[2:]))
        pairs = tuple(indices_tuple) if len(indices_tuple) == 4 else (
            (indices_tuple[0], indices_tuple[1], indices_tuple[0], indices_tuple[2]) if len(indices_tuple) == 3
            else tuple(indices_tuple))
        lengths = torch.tensor([len(t) for t in pairs], dtype=torch.float64, device=embeddings.device)
        if all(n <= 1 for n in lengths.tolist()):
            # The class would apply PML's rule to this rank's lists alone; repeated pairs count once,
            # so doubling the lists defers the rule to the global counts (`_quirk_free`).
            pairs = tuple(torch.cat([t, t]) for t in pairs)
        if embeddings.shape[0] == 0:
            share = embeddings.sum() * 0  # no anchors here (the class's mean over 0 anchors would be NaN)
        else:
            share = self.loss(embeddings, labels, pairs, R, RL) * embeddings.shape[0]
        return self._quirk_free(share, lengths)

    def _cross_batch(self, embeddings, labels, indices_tuple, enqueue_mask):
        cbm, group = self.loss, self.process_group
        P, B_r = group_size(group), embeddings.shape[0]
        if P == 1:
            return cbm(embeddings, labels, indices_tuple, enqueue_mask)
        sizes = all_gather_sizes(B_r, group, embeddings.device)
        B = sum(sizes)
        fusable = (indices_tuple is None and enqueue_mask is None
                   and _split_exactly(cbm.loss, cbm.miner if cbm.miner is not None else getattr(cbm.loss, "miner", None)))
        if not fusable:
            # Every rank computes the whole batch's loss (P times the work of the fused path below);
            # the gather's backward sums the P identical gradients, which DDP's average undoes.
            E = all_gather_rows(embeddings, group, sizes)
            mask = None
            if enqueue_mask is not None:
                if not isinstance(enqueue_mask, torch.Tensor) or tuple(enqueue_mask.shape) != (B_r,):
                    raise ValueError(f"enqueue_mask must be a bool tensor of shape ({B_r},)")
                mask = _gather_labels(enqueue_mask.to(embeddings.device, torch.uint8), group, sizes).bool()
            return cbm(E, _gather_labels(labels, group, sizes), indices_tuple, mask)
        if B > cbm.memory_size:
            raise ValueError(f"the gathered batch of {B} rows (all ranks) does not fit a memory of {cbm.memory_size}")
        with torch.no_grad():
            E = all_gather_rows(embeddings.detach(), group, sizes)
            L = all_gather_rows(labels, group, sizes)
        cbm.embedding_memory = cbm.embedding_memory.to(device=embeddings.device, dtype=embeddings.dtype)
        cbm.label_memory = cbm.label_memory.to(device=embeddings.device, dtype=labels.dtype)
        cbm.add_to_memory(E, L, B)  # the same rows in the same order on every rank: one memory
        end = cbm.memory_size if cbm.has_been_filled else cbm.queue_idx
        offset = row_offset(sizes, group_rank(group))
        self_index = cbm.curr_batch_idx[offset:offset + B_r]
        value, counts = _ms_loss_and_counts(cbm.loss, embeddings, labels, cbm.embedding_memory[:end],
                                            cbm.label_memory[:end], self_index, cbm.miner)
        return self._quirk_free(value * B_r, counts) * (P / B)
