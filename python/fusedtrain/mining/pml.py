"""pytorch-metric-learning-compatible miners and losses over the fused mining ops.

Same constructor and call signatures as PML 2.9.0 (cosine similarity, mean reduction), so a user swaps
the import. Differences from PML, all deliberate:

* Self pairs. PML excludes the diagonal by object identity, in two places that can disagree: the
  Multi-Similarity miner's thresholds when `ref_emb is embeddings`, the pair lists when
  `ref_labels is labels`. Here one rule holds for every class: the reference set is the batch itself
  (self pairs excluded everywhere) exactly when `ref_emb` is None or `ref_emb is embeddings`. The
  results agree with PML whenever PML's two tests agree (no ref_emb; ref_emb=embeddings with or
  without ref_labels; a copied ref_emb with its own ref_labels tensor).
* `ref_emb` without `ref_labels` uses `labels` as the reference labels (as PML does).
* Only PML's defaults are supported: cosine similarity, MeanReducer, no regularizers; other keyword
  arguments raise TypeError.
* Fusion: `MultiSimilarityMiner` returns a lazy `MinedPairs` tuple; PML's usual
  `loss(emb, labels, miner(emb, labels))` then runs one fused mining + loss op (no index lists), as
  does `MultiSimilarityLoss(miner=MultiSimilarityMiner(eps))(emb, labels)` (an addition). Any other
  tuple takes the pair-list path, as in PML.
* `ThresholdConsistentMarginLoss` honours `ref_emb` (PML 2.9.0 ignores it).

Kept PML quirk: `MultiSimilarityLoss` returns 0 (as `sum(embeddings * 0)`) when every index list of
the pairs it would use has at most one element.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._core import backend
from .._core.checks import check_finite
from . import ops as _ops
from . import reference as _reference
from .checks import ms_hyperparameters, operands
from .stats import MsStat


def _no_extra_kwargs(cls_name: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{cls_name}: unsupported arguments {sorted(kwargs)} (only cosine similarity and "
                        "PML's default mean reduction are implemented)")


def _reference_set(embeddings, labels, ref_emb, ref_labels):
    """PML's set_ref_emb: (ref_emb or None for the batch itself, ref_labels)."""
    if ref_emb is None or ref_emb is embeddings:
        return None, None
    return ref_emb, (labels if ref_labels is None else ref_labels)


def _loss_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """A PML loss's argument handling: labels or a tuple is needed, labels move to the embeddings'
    device (as PML), and the reference set is resolved. Returns (labels, ref_emb, ref_labels)."""
    if labels is None and indices_tuple is None:
        raise ValueError("labels and indices_tuple cannot both be None")
    labels = _labels_to(labels, embeddings)
    return (labels,) + _reference_set(embeddings, labels, ref_emb, ref_labels)


def _labels_to(labels, embeddings):
    """PML moves the labels to the embeddings' device; meta tensors hold no values to move."""
    if isinstance(labels, torch.Tensor) and isinstance(embeddings, torch.Tensor):
        if labels.is_meta != embeddings.is_meta:
            raise ValueError(f"labels is on {labels.device} but embeddings is on {embeddings.device}")
        labels = labels.to(embeddings.device)
    return labels


def _zero_loss(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.sum(embeddings * 0)


class _Miner(torch.nn.Module):
    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        ref_emb, ref_labels = _reference_set(embeddings, labels, ref_emb, ref_labels)
        labels = _labels_to(labels, embeddings)
        return self.mine(embeddings, labels, ref_emb, ref_labels)


class MinedPairs(Sequence):
    """What `MultiSimilarityMiner` returns: the `(a1, p, a2, n)` int64 tuple, mined on first access.

    It behaves as PML's tuple (len 4, indexing, slicing, unpacking). Handed unread to
    `MultiSimilarityLoss` with the same embeddings/labels/reference objects it was mined from — PML's
    usual `loss(emb, labels, miner(emb, labels))` — the loss runs the fused mining + loss op and the
    B·M-sized index lists are never built. Mining reads the embeddings' values at first access.
    """

    def __init__(self, miner, embeddings, labels, ref_emb, ref_labels):
        self.miner, self._source = miner, (embeddings, labels, ref_emb, ref_labels)
        self._pairs = None

    def _get(self) -> tuple:
        if self._pairs is None:
            embeddings, labels, ref_emb, ref_labels = self._source
            self._pairs = _ops.multi_similarity_mine(embeddings, labels, ref_emb, ref_labels,
                                                     epsilon=self.miner.epsilon)
        return self._pairs

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index):
        return self._get()[index]

    def __iter__(self):
        return iter(self._get())

    def __repr__(self) -> str:
        return f"MinedPairs({'unread' if self._pairs is None else self._pairs})"

    def mined_from(self, embeddings, labels, ref_emb, ref_labels) -> bool:
        return all(a is b for a, b in zip(self._source, (embeddings, labels, ref_emb, ref_labels)))


class MultiSimilarityMiner(_Miner):
    """PML `MultiSimilarityMiner(epsilon)`: returns `(a1, p, a2, n)` (int64) as a `MinedPairs`."""

    def __init__(self, epsilon: float = 0.1, **kwargs):
        super().__init__()
        _no_extra_kwargs("MultiSimilarityMiner", kwargs)
        self.epsilon = check_finite("epsilon", epsilon)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        operands(embeddings, labels, ref_emb, ref_labels)  # bad input fails here, not later
        return MinedPairs(self, embeddings, labels, ref_emb, ref_labels)


class PairMarginMiner(_Miner):
    """PML `PairMarginMiner(pos_margin, neg_margin)` with cosine similarity: positives with
    S < pos_margin, negatives with S > neg_margin. Returns `(a1, p, a2, n)`."""

    def __init__(self, pos_margin: float = 0.2, neg_margin: float = 0.8, **kwargs):
        super().__init__()
        _no_extra_kwargs("PairMarginMiner", kwargs)
        self.pos_margin = check_finite("pos_margin", pos_margin)
        self.neg_margin = check_finite("neg_margin", neg_margin)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        return _ops.pair_margin_mine(embeddings, labels, ref_emb, ref_labels, pos_margin=self.pos_margin,
                                     neg_margin=self.neg_margin)


class BatchHardMiner(_Miner):
    """PML `BatchHardMiner()` with cosine similarity: returns `(a, p, n)`."""

    def __init__(self, **kwargs):
        super().__init__()
        _no_extra_kwargs("BatchHardMiner", kwargs)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        return _ops.batch_hard_mine(embeddings, labels, ref_emb, ref_labels)


def _convert_to_pairs(indices_tuple):
    if len(indices_tuple) == 4:
        return tuple(indices_tuple)
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        return a, p, a, n
    raise ValueError(f"indices_tuple must have 3 (a, p, n) or 4 (a1, p, a2, n) tensors, got {len(indices_tuple)}")


def _checked_pairs(indices_tuple, B: int, M: int, device):
    """`(a1, p, a2, n)` as int64 on `device`: 1-D integer tensors, anchors in [0, B), the others in
    [0, M), a1/p and a2/n of one length. Out-of-range or negative indices would otherwise pick
    other rows (negative ones wrap) or, once pairs are encoded as a·M + p, other pairs. Reads the
    values (a host sync on CUDA, as the pair-list path's torch.unique does anyway)."""
    if device.type == "meta":
        raise ValueError("embeddings is on meta: a loss over an indices_tuple reads the pair indices and "
                         "similarities (values meta tensors do not have)")
    pairs = _convert_to_pairs(indices_tuple)
    # Each of (a1, p, a2, n) as the user named it: a 3-tuple's anchors serve both sides.
    names = [f"indices_tuple[{i}] ({n})" for i, n in
             (((0, "a"), (1, "p"), (0, "a"), (2, "n")) if len(indices_tuple) == 3
              else ((0, "a1"), (1, "p"), (2, "a2"), (3, "n")))]
    for name, t in zip(names, pairs):
        if not (isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() and not t.is_complex()
                and t.dtype != torch.bool):
            got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a 1-D integer tensor, got {got}")
        if t.is_meta:
            raise ValueError(f"{name} is on meta: the pair-list path reads the indices (pass no indices_tuple "
                             "for the fused op)")
    pairs = tuple(t.to(device=device, dtype=torch.long) for t in pairs)
    for i in (0, 2):
        if pairs[i].shape != pairs[i + 1].shape:
            raise ValueError(f"{names[i]} and {names[i + 1]} must have one length, got {pairs[i].shape[0]} "
                             f"and {pairs[i + 1].shape[0]}")
    for name, t, limit in zip(names, pairs, (B, M, B, M)):
        if t.numel() and bool(((t < 0) | (t >= limit)).any()):
            raise ValueError(f"{name} holds indices outside [0, {limit})")
    return pairs


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
    """Cosine similarity of the pairs (rows F.normalize'd as in PML's CosineSimilarity)."""
    q = F.normalize(embeddings, dim=1)
    r = q if ref_emb is None else F.normalize(ref_emb, dim=1)
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


class MultiSimilarityLoss(torch.nn.Module):
    """PML `MultiSimilarityLoss(alpha, beta, base)`; `miner=MultiSimilarityMiner(eps)` (optional)
    makes calls without an indices_tuple run the fused mining + loss op."""

    def __init__(self, alpha: float = 2, beta: float = 50, base: float = 0.5, miner=None, **kwargs):
        super().__init__()
        _no_extra_kwargs("MultiSimilarityLoss", kwargs)
        self.alpha, self.beta, self.base, _ = ms_hyperparameters(alpha, beta, base, 0.0)
        if miner is not None and not isinstance(miner, MultiSimilarityMiner):
            raise TypeError(f"miner must be a fusedtrain.mining.MultiSimilarityMiner, got {type(miner).__name__}")
        self.miner = miner

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        labels, ref_emb, ref_labels = _loss_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if indices_tuple is None:
            return self.fused(embeddings, labels, ref_emb, ref_labels)
        if isinstance(indices_tuple, MinedPairs) and indices_tuple.mined_from(embeddings, labels, ref_emb, ref_labels):
            return self.fused(embeddings, labels, ref_emb, ref_labels, miner=indices_tuple.miner)
        return self.from_pairs(embeddings, indices_tuple, ref_emb)

    def fused(self, embeddings, labels, ref_emb, ref_labels, self_index=None, miner=_OWN_MINER):
        """Mining (with `miner`, default this loss's own; None: all pairs) + loss in one op; PML's
        at-most-one-pair quirk applied."""
        miner = self.miner if miner is _OWN_MINER else miner
        mine, epsilon = miner is not None, (miner.epsilon if miner is not None else 0.0)
        kw = dict(alpha=self.alpha, beta=self.beta, base=self.base, epsilon=epsilon, mine=mine)
        if backend.use_kernel("multi_similarity_loss", embeddings.device):
            loss, stats = _ops.multi_similarity_loss_with_stats(embeddings, labels, ref_emb, ref_labels,
                                                                self_index=self_index, **kw)
            n_pos, n_neg = stats[:, MsStat.NUM_POS].sum(), stats[:, MsStat.NUM_NEG].sum()
        else:
            loss = _ops.multi_similarity_loss(embeddings, labels, ref_emb, ref_labels, self_index=self_index, **kw)
            n_pos, n_neg = self._reference_counts(embeddings, labels, ref_emb, ref_labels, self_index, mine, epsilon)
        # PML: 0 when every index list has at most one element (decided on the device, no sync).
        return torch.where((n_pos <= 1) & (n_neg <= 1), _zero_loss(embeddings).to(loss.dtype), loss)

    @staticmethod
    def _reference_counts(embeddings, labels, ref_emb, ref_labels, self_index, mine, epsilon):
        with torch.no_grad():
            S, pos, neg = _reference.similarity_masks(embeddings.detach(), labels.long(), ref_emb, ref_labels)
            keep_pos, keep_neg = _reference.multi_similarity_masks(S, pos, neg, epsilon) if mine else (pos, neg)
            n_pos = keep_pos.sum()
            if self_index is not None and S.shape[0]:
                rows = torch.arange(S.shape[0], device=S.device)
                valid = (self_index >= 0) & (self_index < S.shape[1])
                n_pos = n_pos - keep_pos[rows[valid], self_index[valid]].sum()
            return n_pos, keep_neg.sum()

    def from_pairs(self, embeddings, indices_tuple, ref_emb):
        """The loss over given pairs (PML's mat-based path, computed from the pair lists)."""
        B = embeddings.shape[0]
        M = B if ref_emb is None else ref_emb.shape[0]
        a1, p, a2, n = _checked_pairs(indices_tuple, B, M, embeddings.device)
        if all(len(x) <= 1 for x in (a1, p, a2, n)):
            return _zero_loss(embeddings)
        a1, p = _unique_pairs(a1, p, M)
        a2, n = _unique_pairs(a2, n, M)
        s_pos = _pair_similarities(embeddings, ref_emb, a1, p)
        s_neg = _pair_similarities(embeddings, ref_emb, a2, n)
        pos = _log1p_sum_exp_by_anchor(-self.alpha * (s_pos - self.base), a1, B) / self.alpha
        neg = _log1p_sum_exp_by_anchor(self.beta * (s_neg - self.base), a2, B) / self.beta
        return (pos + neg).mean()


class ThresholdConsistentMarginLoss(torch.nn.Module):
    """PML `ThresholdConsistentMarginLoss(lambda_plus, lambda_minus, margin_plus, margin_minus)`;
    without an indices_tuple it runs the fused op over all pairs (honouring ref_emb)."""

    def __init__(self, lambda_plus: float = 1.0, lambda_minus: float = 1.0, margin_plus: float = 0.9,
                 margin_minus: float = 0.5, **kwargs):
        super().__init__()
        _no_extra_kwargs("ThresholdConsistentMarginLoss", kwargs)
        self.lambda_plus = check_finite("lambda_plus", lambda_plus)
        self.lambda_minus = check_finite("lambda_minus", lambda_minus)
        self.margin_plus = check_finite("margin_plus", margin_plus)
        self.margin_minus = check_finite("margin_minus", margin_minus)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        labels, ref_emb, ref_labels = _loss_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if indices_tuple is None:
            return _ops.tcm_loss(embeddings, labels, ref_emb, ref_labels, lambda_plus=self.lambda_plus,
                                 lambda_minus=self.lambda_minus, margin_plus=self.margin_plus,
                                 margin_minus=self.margin_minus)
        B = embeddings.shape[0]
        ap, p, an, n = _checked_pairs(indices_tuple, B, B if ref_emb is None else ref_emb.shape[0], embeddings.device)
        pos = _pair_similarities(embeddings, ref_emb, ap, p)
        neg = _pair_similarities(embeddings, ref_emb, an, n)
        act_pos, act_neg = pos <= self.margin_plus, neg >= self.margin_minus
        zero = _zero_loss(embeddings)
        pos_term = torch.where(act_pos.any(), ((self.margin_plus - pos) * act_pos).sum() / act_pos.sum().clamp_min(1),
                               zero)
        neg_term = torch.where(act_neg.any(), ((neg - self.margin_minus) * act_neg).sum() / act_neg.sum().clamp_min(1),
                               zero)
        return self.lambda_plus * pos_term + self.lambda_minus * neg_term


class CrossBatchMemory(torch.nn.Module):
    """PML `CrossBatchMemory(loss, embedding_size, memory_size, miner)`: a ring buffer of past
    embeddings and labels used as the reference set. Each anchor's own slot (written this call) is
    removed from its positive pairs after mining (PML's self-comparison rule). With a
    `MultiSimilarityLoss` and no miner or a `MultiSimilarityMiner`, and no indices_tuple /
    enqueue_mask, the call is one fused op; otherwise the miner's pairs go to `loss`."""

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, miner=None, **kwargs):
        super().__init__()
        _no_extra_kwargs("CrossBatchMemory", kwargs)
        if int(memory_size) <= 0 or int(embedding_size) <= 0:
            raise ValueError(f"memory_size and embedding_size must be > 0, got {memory_size}, {embedding_size}")
        self.loss, self.miner = loss, miner
        self.embedding_size, self.memory_size = int(embedding_size), int(memory_size)
        self.reset_queue()

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
        labels = _labels_to(labels, embeddings)
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
        fusable = (isinstance(self.loss, MultiSimilarityLoss) and indices_tuple is None
                   and (self.miner is None or isinstance(self.miner, MultiSimilarityMiner)))
        if fusable:
            self_index = self.curr_batch_idx if remove_self else None
            return self.loss.fused(embeddings, labels, E_mem, L_mem, self_index=self_index, miner=self.miner)
        pairs = self._indices_tuple(embeddings, labels, E_mem, L_mem, indices_tuple, remove_self)
        return self.loss(embeddings, labels, pairs, E_mem, L_mem)

    def _indices_tuple(self, embeddings, labels, E_mem, L_mem, input_tuple, remove_self):
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
                input_tuple = _convert_to_pairs(input_tuple)
            elif len(input_tuple) == 4 and len(pairs) == 3:
                raise ValueError("a 4-tuple of pairs cannot be combined with a triplet miner's output")
            pairs = tuple(torch.cat([x, y.to(x.device)]) for x, y in zip(pairs, input_tuple))
        return pairs
