"""What the PML-compatible miners and losses share: PML's argument handling (reference set, labels,
index tuples), the keyword options PML's base classes take, and PML's statistics attributes."""
from __future__ import annotations

import sys

import torch

from .distances import COSINE, LP, CosineSimilarity, LpDistance, distance_spec
from .precision import fp32_loss, fp32_mining  # noqa: F401  (the PML classes' Python paths use them)


def no_extra_kwargs(cls_name: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{cls_name}: unsupported arguments {sorted(kwargs)} (supported beyond the class's own: "
                        "distance, reducer, embedding_regularizer, embedding_reg_weight, collect_stats)")


def default_distance(spec):
    """A fresh instance of PML's default distance object for a class whose default is `spec`."""
    return CosineSimilarity() if spec == COSINE else LpDistance()


def resolve_distance(distance, default_spec, owner: str):
    """(distance object, DistanceSpec): `distance` or, when None, PML's default for the class."""
    if distance is None:
        distance = default_distance(default_spec)
    return distance, distance_spec(distance, owner)


def collect_stats_flag(collect_stats) -> bool:
    """PML's `collect_stats`: the argument, or else PML's global default `COLLECT_STATS` when PML is
    already imported (never imported here), else False."""
    if collect_stats is not None:
        return bool(collect_stats)
    pml_functions = sys.modules.get("pytorch_metric_learning.utils.common_functions")
    return bool(getattr(pml_functions, "COLLECT_STATS", False))


class Recorder:
    """PML's recorded statistics: names declared as stats exist (reset to 0 on each call) only when
    collect_stats is on, as in PML; `num_pos_pairs` & co. are set after every mining regardless."""

    def _init_stats(self, collect_stats, names):
        self.collect_stats = collect_stats_flag(collect_stats)
        self._stat_names = list(names)
        self.reset_stats()

    def reset_stats(self):
        if self.collect_stats:
            for name in self._stat_names:
                setattr(self, name, 0)


def reference_set(embeddings, labels, ref_emb, ref_labels):
    """PML's set_ref_emb: (ref_emb or None for the batch itself, ref_labels)."""
    if ref_emb is None or ref_emb is embeddings:
        return None, None
    return ref_emb, (labels if ref_labels is None else ref_labels)


def labels_to(labels, embeddings):
    """PML moves the labels to the embeddings' device; meta tensors hold no values to move."""
    if isinstance(labels, torch.Tensor) and isinstance(embeddings, torch.Tensor):
        if labels.is_meta != embeddings.is_meta:
            raise ValueError(f"labels is on {labels.device} but embeddings is on {embeddings.device}")
        labels = labels.to(embeddings.device)
    return labels


def loss_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """A PML loss's argument handling: labels or a tuple is needed, labels move to the embeddings'
    device (as PML), and the reference set is resolved. Returns (labels, ref_emb, ref_labels)."""
    if labels is None and indices_tuple is None:
        raise ValueError("labels and indices_tuple cannot both be None")
    labels = labels_to(labels, embeddings)
    return (labels,) + reference_set(embeddings, labels, ref_emb, ref_labels)


def zero_loss(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.sum(embeddings * 0)


def convert_to_pairs(indices_tuple):
    if len(indices_tuple) == 4:
        return tuple(indices_tuple)
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        return a, p, a, n
    raise ValueError(f"indices_tuple must have 3 (a, p, n) or 4 (a1, p, a2, n) tensors, got {len(indices_tuple)}")


def convert_to_triplets(indices_tuple):
    """PML's `convert_to_triplets` of a tuple: a 3-tuple as it is; for `(a1, p, a2, n)` every
    `(a, p, n)` whose positive pair and negative pair share the anchor, in PML's order (the positive
    pairs in order, each with its anchor's negative pairs in order). PML builds a len(a1) x len(a2)
    match matrix; the matches come here from a stable sort of a2 instead (O((P + N)·log N) memory-light)."""
    if len(indices_tuple) == 3:
        return tuple(indices_tuple)
    a1, p, a2, n = indices_tuple
    order = torch.argsort(a2, stable=True)  # equal anchors keep their order: PML's column order
    sorted_a2 = a2[order]
    first = torch.searchsorted(sorted_a2, a1, side="left")
    counts = torch.searchsorted(sorted_a2, a1, side="right") - first
    rows = torch.repeat_interleave(torch.arange(len(a1), device=a1.device), counts)
    starts = torch.repeat_interleave(first - (torch.cumsum(counts, 0) - counts), counts)
    columns = order[starts + torch.arange(len(rows), device=a1.device)]
    return a1[rows], p[rows], n[columns]


def checked_pairs(indices_tuple, B: int, M: int, device):
    """`(a1, p, a2, n)` as int64 on `device`: 1-D integer tensors, anchors in [0, B), the others in
    [0, M), a1/p and a2/n of one length. Out-of-range or negative indices would otherwise pick
    other rows (negative ones wrap) or, once pairs are encoded as a·M + p, other pairs. Reads the
    values (a host sync on CUDA, as the pair-list path's torch.unique does anyway)."""
    if device.type == "meta":
        raise ValueError("embeddings is on meta: a loss over an indices_tuple reads the pair indices and "
                         "similarities (values meta tensors do not have)")
    pairs = convert_to_pairs(indices_tuple)
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


__all__ = ["fp32_mining", "fp32_loss", "COSINE", "LP", "no_extra_kwargs", "resolve_distance", "collect_stats_flag", "Recorder", "reference_set",
           "labels_to", "loss_inputs", "zero_loss", "convert_to_pairs", "convert_to_triplets", "checked_pairs"]
