"""pytorch-metric-learning-compatible losses: `MultiSimilarityLoss`, `ThresholdConsistentMarginLoss`,
`CrossBatchMemory` (the miners are in pml_miners.py; maths and every difference from PML:
docs/mining.md).

Same constructor and call signatures as PML 2.9.0, PML's `distance=`, `reducer=`,
`embedding_regularizer=` / `embedding_reg_weight=` and `collect_stats=` included, so a user swaps the
import. Paths:

* Cosine similarity with the mean (PML's defaults): the compiled fused ops. `MultiSimilarityMiner`
  returns a lazy `MinedPairs`; PML's usual `loss(emb, labels, miner(emb, labels))` then runs one
  fused mining + loss op (no index lists), as does `MultiSimilarityLoss(miner=MultiSimilarityMiner(eps))`
  (an addition). Any other tuple takes the pair-list path, as in PML.
* `LpDistance`, or a reducer other than the mean: the tiled PyTorch path (distance_tiles.py), which
  hands PML's per-anchor losses to the reducer exactly as PML does.

Deliberate differences: one self-pair rule (the reference set is the batch itself exactly when
`ref_emb` is None or `ref_emb is embeddings`); `ThresholdConsistentMarginLoss` honours `ref_emb`
(PML 2.9.0 ignores it); bf16/fp16 computed in fp32. Kept PML quirk: `MultiSimilarityLoss` returns
0 (as `sum(embeddings * 0)`) when every index list of the pairs it would use has at most one element.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._core import backend
from .._core.checks import check_finite
from . import distance_tiles as _tiles
from . import ops as _ops
from . import reference as _reference
from .checks import ms_hyperparameters, operands
from .distances import prepared
from .pml_common import (COSINE, checked_pairs, collect_stats_flag, convert_to_pairs, convert_to_triplets, fp32_loss,
                         labels_to, loss_inputs, no_extra_kwargs, resolve_distance, zero_loss)
from .pml_miners import BatchHardMiner, MinedPairs, MultiSimilarityMiner, PairMarginMiner  # noqa: F401
from .reducers import already_reduced, check_reducer, check_regularizer, element_losses, is_plain_mean, reduce
from .stats import MsStat


class _PmlLoss(torch.nn.Module):
    """PML's BaseMetricLossFunction options: distance, reducer, embedding regularizer, collect_stats."""

    def __init__(self, default_spec, distance, reducer, embedding_regularizer, embedding_reg_weight, collect_stats):
        super().__init__()
        owner = type(self).__name__
        self.distance, self.spec = resolve_distance(distance, default_spec, owner)
        self.reducer = check_reducer(reducer, owner)
        self.embedding_regularizer, self.embedding_reg_weight = check_regularizer(
            embedding_regularizer, embedding_reg_weight, owner)
        self.collect_stats = collect_stats_flag(collect_stats)

    def _reduce(self, entry: dict, embeddings, labels):
        """PML's reduction of the loss entry (plus the regularizer's entry when set)."""
        if is_plain_mean(self.reducer) and self.embedding_regularizer is None and torch.is_tensor(entry["losses"]):
            if entry["reduction_type"] == "already_reduced":
                return entry["losses"]
        return reduce(self.reducer, self.embedding_regularizer, self.embedding_reg_weight, entry, embeddings, labels)


class _PairCosine(torch.autograd.Function):
    """s_k = q̂[a_k]·r̂[o_k] over pair lists, in chunks: neither direction holds a (pairs × d)
    gather (mining can return B·M pairs: 16M pairs of 256 floats would be 16 GiB)."""

    @staticmethod
    def forward(ctx, q_hat, r_hat, anchors, others):
        ctx.save_for_backward(q_hat, r_hat, anchors, others)
        out = q_hat.new_empty(anchors.shape[0])
        for b, e in _chunks(anchors.shape[0], q_hat.shape[1]):
            out[b:e] = (q_hat[anchors[b:e]] * r_hat[others[b:e]]).sum(1)
        return out

    @staticmethod
    def backward(ctx, grad):
        q_hat, r_hat, anchors, others = ctx.saved_tensors
        gq = torch.zeros_like(q_hat) if ctx.needs_input_grad[0] else None
        gr = torch.zeros_like(r_hat) if ctx.needs_input_grad[1] else None
        for b, e in _chunks(anchors.shape[0], q_hat.shape[1]):
            g = grad[b:e, None]
            if gq is not None:
                gq.index_add_(0, anchors[b:e], g * r_hat[others[b:e]])
            if gr is not None:
                gr.index_add_(0, others[b:e], g * q_hat[anchors[b:e]])
        return gq, gr, None, None


def _chunks(n: int, d: int, elements: int = 1 << 22):
    step = max(1, elements // max(d, 1))
    return [(b, min(n, b + step)) for b in range(0, n, step)]


def _pair_similarities(embeddings, ref_emb, anchors, others):
    """Cosine similarity of the pairs (rows F.normalize'd as in PML's CosineSimilarity); bf16/fp16
    rows in fp32, as the fused ops (so both paths round the loss once, from fp32)."""
    q, r = prepared(embeddings, ref_emb, COSINE)
    return _PairCosine.apply(q, r, anchors.to(q.device).long(), others.to(q.device).long())


def _log1p_sum_exp_by_anchor(x: torch.Tensor, anchors: torch.Tensor, B: int) -> torch.Tensor:
    """Per anchor log(1 + Σ exp(x)) over its pairs (0 for an anchor without pairs)."""
    top = torch.zeros(B, dtype=x.dtype, device=x.device)  # 0: the "+1" term's exponent
    top = top.scatter_reduce(0, anchors, x.detach(), reduce="amax", include_self=True)
    total = torch.exp(-top).index_add(0, anchors, torch.exp(x - top[anchors]))
    return top + torch.log(total)


def _unique_pairs(anchors, others, M):
    """Drop repeated pairs (PML marks pairs in a B×M mask, so repeats count once)."""
    if anchors.numel() == 0:
        return anchors, others
    key = torch.unique(anchors * max(M, 1) + others)
    return key // max(M, 1), key % max(M, 1)


_OWN_MINER = object()  # MultiSimilarityLoss.fused's default: the loss's own miner


class MultiSimilarityLoss(_PmlLoss):
    """PML `MultiSimilarityLoss(alpha, beta, base, distance=CosineSimilarity(), reducer=MeanReducer())`;
    `miner=MultiSimilarityMiner(eps)` (optional) makes calls without an indices_tuple mine first,
    fused with the loss when both use one distance."""

    def __init__(self, alpha: float = 2, beta: float = 50, base: float = 0.5, miner=None, distance=None,
                 reducer=None, embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None, **kwargs):
        no_extra_kwargs("MultiSimilarityLoss", kwargs)
        super().__init__(COSINE, distance, reducer, embedding_regularizer, embedding_reg_weight, collect_stats)
        self.alpha, self.beta, self.base, _ = ms_hyperparameters(alpha, beta, base, 0.0)
        if miner is not None and not isinstance(miner, MultiSimilarityMiner):
            raise TypeError(f"miner must be a fusedtrain.mining.MultiSimilarityMiner, got {type(miner).__name__}")
        self.miner = miner

    @property
    def uses_kernels(self) -> bool:
        """Cosine with the mean: the compiled fused op (else the tiled path)."""
        return self.spec == COSINE and is_plain_mean(self.reducer)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        labels, ref_emb, ref_labels = loss_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if indices_tuple is None:
            return self.fused(embeddings, labels, ref_emb, ref_labels)
        if (isinstance(indices_tuple, MinedPairs) and indices_tuple.miner.spec == self.spec
                and indices_tuple.mined_from(embeddings, labels, ref_emb, ref_labels)):
            return self.fused(embeddings, labels, ref_emb, ref_labels, miner=indices_tuple.miner, record=indices_tuple)
        return self.from_pairs(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def fused(self, embeddings, labels, ref_emb, ref_labels, self_index=None, miner=_OWN_MINER, record=None):
        """Mining (with `miner`, default this loss's own; None: all pairs) + loss, without index lists
        when the miner's distance is the loss's; PML's at-most-one-pair quirk applied. `record`: a
        MinedPairs that gets the mined counts."""
        miner = self.miner if miner is _OWN_MINER else miner
        if miner is not None and miner.spec != self.spec:  # two distances: PML's two steps
            return self.from_pairs(embeddings, labels, miner(embeddings, labels, ref_emb, ref_labels), ref_emb,
                                   ref_labels)
        mine, epsilon = miner is not None, (miner.epsilon if miner is not None else 0.0)
        if not self.uses_kernels:
            return self._tiled(embeddings, labels, ref_emb, ref_labels, epsilon if mine else None, record)
        kw = dict(alpha=self.alpha, beta=self.beta, base=self.base, epsilon=epsilon, mine=mine)
        if backend.use_kernel("multi_similarity_loss", embeddings.device):
            loss, stats = _ops.multi_similarity_loss_with_stats(embeddings, labels, ref_emb, ref_labels,
                                                                self_index=self_index, **kw)
            n_pos, n_neg = stats[:, MsStat.NUM_POS].sum(), stats[:, MsStat.NUM_NEG].sum()
            n_self = self._self_pairs_mined(embeddings, ref_emb, self_index, stats, epsilon) if mine else 0
        else:
            loss = _ops.multi_similarity_loss(embeddings, labels, ref_emb, ref_labels, self_index=self_index, **kw)
            n_pos, n_self, n_neg = self._reference_counts(embeddings, labels, ref_emb, ref_labels, self_index, mine,
                                                          epsilon)
        if record is not None:
            record._counts = (n_pos, n_neg)
        if self_index is not None and mine:
            miner.record_counts(n_pos + n_self, n_neg)  # PML's miner saw the self pairs
        # PML: 0 when every index list has at most one element (decided on the device, no sync).
        loss = torch.where((n_pos <= 1) & (n_neg <= 1), zero_loss(embeddings).to(loss.dtype), loss)
        return self._reduce(already_reduced(loss), embeddings, labels)

    @staticmethod
    def _self_pairs_mined(embeddings, ref_emb, self_index, stats, epsilon):
        """How many anchors' own memory slots (self_index) the miner kept as positives: the kernel
        counts loss pairs, which exclude them. s − ε < hardest negative, as the miner decides."""
        if self_index is None:
            return 0
        with torch.no_grad():
            valid = (self_index >= 0) & (self_index < ref_emb.shape[0])
            q = F.normalize(embeddings.detach()[valid].float(), dim=1)
            r = F.normalize(ref_emb.detach()[self_index[valid]].float(), dim=1)
            s_self = (q * r).sum(1)
            return ((s_self - epsilon) < stats[valid, MsStat.MAX_NEG].float()).sum()

    @staticmethod
    def _reference_counts(embeddings, labels, ref_emb, ref_labels, self_index, mine, epsilon):
        """(loss positives, self slots among the mined positives, negatives) from the reference masks."""
        with torch.no_grad():
            S, pos, neg = _reference.similarity_masks(embeddings.detach(), labels.long(), ref_emb, ref_labels)
            keep_pos, keep_neg = _reference.multi_similarity_masks(S, pos, neg, epsilon) if mine else (pos, neg)
            n_pos, n_self = keep_pos.sum(), keep_pos.sum() * 0
            if self_index is not None and S.shape[0]:
                rows = torch.arange(S.shape[0], device=S.device)
                valid = (self_index >= 0) & (self_index < S.shape[1])
                n_self = keep_pos[rows[valid], self_index[valid]].sum()
                n_pos = n_pos - n_self
            return n_pos, n_self, keep_neg.sum()

    @fp32_loss
    def _tiled(self, embeddings, labels, ref_emb, ref_labels, epsilon, record):
        """Any distance or reducer, mining (epsilon not None) or all pairs, without B×M."""
        tiles = _tiles.Tiles(*operands(embeddings, labels, ref_emb, ref_labels), self.spec)
        inverted = self.spec.is_inverted
        if epsilon is None:
            def select(b, e, mat, pos, neg):
                return pos, neg
        else:
            def select(b, e, mat, pos, neg):
                return _tiles.ms_keep(mat, pos, neg, epsilon, inverted)
        losses, n_pos, n_neg = _tiles.ms_losses(tiles, select, self.alpha, self.beta, self.base)
        if record is not None:
            record._counts = (n_pos, n_neg)
        return self._reduce_per_anchor(losses, int(n_pos) <= 1 and int(n_neg) <= 1, embeddings, labels)

    def _reduce_per_anchor(self, losses, quirk_zero: bool, embeddings, labels):
        entry = already_reduced(0) if quirk_zero else element_losses(losses.to(embeddings.dtype))
        return self._reduce(entry, embeddings, labels)

    @fp32_loss
    def from_pairs(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """The loss over given pairs (PML's mat-based path: a pair listed twice counts once)."""
        B = embeddings.shape[0]
        M = B if ref_emb is None else ref_emb.shape[0]
        a1, p, a2, n = checked_pairs(indices_tuple, B, M, embeddings.device)
        if all(len(x) <= 1 for x in (a1, p, a2, n)):
            return self._reduce(already_reduced(0), embeddings, labels)
        if not self.uses_kernels:
            tiles = _tiles.Tiles(*operands(embeddings, labels, ref_emb, ref_labels), self.spec)
            losses, _, _ = _tiles.ms_losses(tiles, _tiles.PairListSelect(a1, p, a2, n, M), self.alpha, self.beta,
                                            self.base)
            return self._reduce_per_anchor(losses, False, embeddings, labels)
        a1, p = _unique_pairs(a1, p, M)
        a2, n = _unique_pairs(a2, n, M)
        s_pos = _pair_similarities(embeddings, ref_emb, a1, p)
        s_neg = _pair_similarities(embeddings, ref_emb, a2, n)
        pos = _log1p_sum_exp_by_anchor(-self.alpha * (s_pos - self.base), a1, B) / self.alpha
        neg = _log1p_sum_exp_by_anchor(self.beta * (s_neg - self.base), a2, B) / self.beta
        return self._reduce(already_reduced((pos + neg).mean().to(embeddings.dtype)), embeddings, labels)


class ThresholdConsistentMarginLoss(_PmlLoss):
    """PML `ThresholdConsistentMarginLoss(lambda_plus, lambda_minus, margin_plus, margin_minus)`
    (cosine only, as PML); without an indices_tuple it runs the fused op over all pairs (honouring
    ref_emb). The loss is one number, which PML's reducers pass through."""

    def __init__(self, lambda_plus: float = 1.0, lambda_minus: float = 1.0, margin_plus: float = 0.9,
                 margin_minus: float = 0.5, distance=None, reducer=None, embedding_regularizer=None,
                 embedding_reg_weight=1, collect_stats=None, **kwargs):
        no_extra_kwargs("ThresholdConsistentMarginLoss", kwargs)
        super().__init__(COSINE, distance, reducer, embedding_regularizer, embedding_reg_weight, collect_stats)
        if self.spec != COSINE:
            raise TypeError("ThresholdConsistentMarginLoss: distance must be CosineSimilarity() (as in PML), got "
                            f"{type(self.distance).__name__}")
        self.lambda_plus = check_finite("lambda_plus", lambda_plus)
        self.lambda_minus = check_finite("lambda_minus", lambda_minus)
        self.margin_plus = check_finite("margin_plus", margin_plus)
        self.margin_minus = check_finite("margin_minus", margin_minus)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        labels, ref_emb, ref_labels = loss_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return self._reduce(already_reduced(self._loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)),
                            embeddings, labels)

    def _loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if indices_tuple is None:
            return _ops.tcm_loss(embeddings, labels, ref_emb, ref_labels, lambda_plus=self.lambda_plus,
                                 lambda_minus=self.lambda_minus, margin_plus=self.margin_plus,
                                 margin_minus=self.margin_minus)
        B = embeddings.shape[0]
        ap, p, an, n = checked_pairs(indices_tuple, B, B if ref_emb is None else ref_emb.shape[0], embeddings.device)
        pos = _pair_similarities(embeddings, ref_emb, ap, p)
        neg = _pair_similarities(embeddings, ref_emb, an, n)
        act_pos, act_neg = pos <= self.margin_plus, neg >= self.margin_minus
        zero = zero_loss(embeddings)
        pos_term = torch.where(act_pos.any(), ((self.margin_plus - pos) * act_pos).sum() / act_pos.sum().clamp_min(1),
                               zero)
        neg_term = torch.where(act_neg.any(), ((neg - self.margin_minus) * act_neg).sum() / act_neg.sum().clamp_min(1),
                               zero)
        return (self.lambda_plus * pos_term + self.lambda_minus * neg_term).to(embeddings.dtype)


class CrossBatchMemory(torch.nn.Module):
    """PML `CrossBatchMemory(loss, embedding_size, memory_size, miner)`: a ring buffer of past
    embeddings and labels used as the reference set. Each anchor's own slot (written this call) is
    removed from its positive pairs after mining (PML's self-comparison rule). With a
    `MultiSimilarityLoss` and no miner or a `MultiSimilarityMiner`, and no indices_tuple /
    enqueue_mask, the call is one fused op; otherwise the miner's pairs go to `loss`."""

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, miner=None, collect_stats=None,
                 **kwargs):
        super().__init__()
        no_extra_kwargs("CrossBatchMemory", kwargs)
        self.collect_stats = collect_stats_flag(collect_stats)
        if int(memory_size) <= 0 or int(embedding_size) <= 0:
            raise ValueError(f"memory_size and embedding_size must be > 0, got {memory_size}, {embedding_size}")
        self.loss, self.miner = loss, miner
        self.embedding_size, self.memory_size = int(embedding_size), int(memory_size)
        self.reset_queue()

    @staticmethod
    def supported_losses() -> list[str]:
        """PML's list of the losses CrossBatchMemory supports (by class name)."""
        return ["AngularLoss", "CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss", "IntraPairVarianceLoss",
                "LiftedStructureLoss", "MarginLoss", "MultiSimilarityLoss", "NCALoss", "NTXentLoss",
                "SignalToNoiseRatioContrastiveLoss", "SupConLoss", "TripletMarginLoss", "TupletMarginLoss"]

    @classmethod
    def check_loss_support(cls, loss_name: str) -> None:
        if loss_name not in cls.supported_losses():
            raise ValueError(f"CrossBatchMemory not supported for {loss_name}")

    def reset_queue(self):
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.has_been_filled = False
        self.queue_idx = 0

    def add_to_memory(self, embeddings, labels, batch_size):
        self.curr_batch_idx = torch.arange(self.queue_idx, self.queue_idx + batch_size,
                                           device=labels.device) % self.memory_size
        self.embedding_memory[self.curr_batch_idx] = embeddings.detach()
        self.label_memory[self.curr_batch_idx] = labels.detach()
        prev = self.queue_idx
        self.queue_idx = (self.queue_idx + batch_size) % self.memory_size
        if not self.has_been_filled and self.queue_idx <= prev:
            self.has_been_filled = True

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have shape (B, {self.embedding_size}), got {tuple(embeddings.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must have shape ({embeddings.shape[0]},) to match embeddings, got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if enqueue_mask is not None:
            # A bool mask, not row indices: an int tensor would index rows (and ~ flip its bits).
            if not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool:
                raise TypeError(f"enqueue_mask must be a bool tensor (True: enqueue that row), got "
                                f"{enqueue_mask.dtype if isinstance(enqueue_mask, torch.Tensor) else type(enqueue_mask).__name__}")
            if tuple(enqueue_mask.shape) != (len(embeddings),):
                raise ValueError(f"enqueue_mask must have shape ({len(embeddings)},), got {tuple(enqueue_mask.shape)}")
            enqueue_mask = enqueue_mask.to(embeddings.device)
        elif len(embeddings) > self.memory_size:
            raise ValueError(f"a batch of {len(embeddings)} does not fit a memory of {self.memory_size}")
        device = embeddings.device
        labels = labels_to(labels, embeddings)
        self.embedding_memory = self.embedding_memory.to(device=device, dtype=embeddings.dtype)
        self.label_memory = self.label_memory.to(device=device, dtype=labels.dtype)
        if enqueue_mask is not None:
            emb_q, lab_q = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            remove_self = False
        else:
            emb_q, lab_q = embeddings, labels
            remove_self = True
        self.add_to_memory(emb_q, lab_q, len(emb_q))
        end = self.memory_size if self.has_been_filled else self.queue_idx
        E_mem, L_mem = self.embedding_memory[:end], self.label_memory[:end]
        fusable = (isinstance(self.loss, MultiSimilarityLoss) and self.loss.uses_kernels and indices_tuple is None
                   and (self.miner is None or (isinstance(self.miner, MultiSimilarityMiner)
                                               and self.miner.spec == self.loss.spec)))
        if fusable:
            self_index = self.curr_batch_idx if remove_self else None
            return self.loss.fused(embeddings, labels, E_mem, L_mem, self_index=self_index, miner=self.miner)
        pairs = self.create_indices_tuple(embeddings, labels, E_mem, L_mem, indices_tuple, remove_self)
        return self.loss(embeddings, labels, pairs, E_mem, L_mem)

    def create_indices_tuple(self, embeddings, labels, E_mem, L_mem, input_indices_tuple, do_remove_self_comparisons):
        """PML's pairs for a call: the miner's (or all pairs), without each anchor's own memory slot
        (`curr_batch_idx`) when `do_remove_self_comparisons`, then `input_indices_tuple` appended."""
        input_tuple, remove_self = input_indices_tuple, do_remove_self_comparisons
        if self.miner is not None:
            pairs = self.miner(embeddings, labels, E_mem, L_mem)
        else:
            pos, neg = _reference.pair_masks(labels, L_mem)
            pairs = (*torch.where(pos), *torch.where(neg))
        if remove_self:
            anchors, others = pairs[0], pairs[1]
            keep = others != self.curr_batch_idx[anchors]
            pairs = (anchors[keep], others[keep], *[x[keep] for x in pairs[2:]]) if len(pairs) == 3 else \
                (anchors[keep], others[keep], pairs[2], pairs[3])
        if input_tuple is not None:
            if len(input_tuple) == 3 and len(pairs) == 4:
                input_tuple = convert_to_pairs(input_tuple)
            elif len(input_tuple) == 4 and len(pairs) == 3:
                input_tuple = convert_to_triplets(input_tuple)
            pairs = tuple(torch.cat([x, y.to(x.device)]) for x, y in zip(pairs, input_tuple))
        return pairs
