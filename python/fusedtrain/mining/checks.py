"""Argument checks of the mining family: embeddings, labels, the reference set and the
Multi-Similarity hyperparameters (the C++ ops check again)."""
from __future__ import annotations

import torch

from .._core.checks import check_finite, check_float_tensor, check_like, check_tensor
from .stats import STAT_COUNT

__all__ = ["check_finite", "check_labels", "check_embeddings", "operands", "ms_hyperparameters"]


def check_labels(name: str, labels, n: int, n_name: str, device) -> torch.Tensor:
    """Integer class labels of shape (n,) on `device`, returned as int64."""
    check_tensor(labels, name)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match {n_name}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but embeddings is on {device}")
    return labels.long()


def check_embeddings(name: str, x) -> None:
    check_float_tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")


def operands(embeddings, labels, ref_emb, ref_labels):
    """Checked (embeddings, labels, ref_emb, ref_labels); the reference is None for the batch itself."""
    check_embeddings("embeddings", embeddings)
    labels = check_labels("labels", labels, embeddings.shape[0], "embeddings", embeddings.device)
    if ref_emb is embeddings:  # PML's rule: the same object is the batch itself (self pairs excluded)
        if ref_labels is not None:
            check_labels("ref_labels", ref_labels, embeddings.shape[0], "ref_emb", embeddings.device)
        return embeddings, labels, None, None
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels was given without ref_emb")
        return embeddings, labels, None, None
    check_embeddings("ref_emb", ref_emb)
    if ref_labels is None:
        raise ValueError("ref_emb needs ref_labels (the labels of the reference embeddings)")
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(f"ref_emb must have {embeddings.shape[1]} columns like embeddings, "
                         f"got shape {tuple(ref_emb.shape)}")
    check_like(ref_emb, embeddings, "ref_emb", "embeddings")
    ref_labels = check_labels("ref_labels", ref_labels, ref_emb.shape[0], "ref_emb", embeddings.device)
    return embeddings, labels, ref_emb, ref_labels


def ms_hyperparameters(alpha, beta, base, epsilon):
    alpha, beta = check_finite("alpha", alpha), check_finite("beta", beta)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return alpha, beta, check_finite("base", base), check_finite("epsilon", epsilon)


# -- the raw ops' checks (what csrc/mining/mining.cpp checks), for the fake kernels ----------------

def _check_raw_labels(name: str, labels, n: int, of: str, shape) -> None:
    check_tensor(labels, name)
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must be torch.int64, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) for {of} of shape {tuple(shape)}, got {tuple(labels.shape)}")


def check_raw_operands(embeddings, labels, ref_emb, ref_labels, self_index=None) -> None:
    """The operands of `torch.ops.fusedtrain.{multi_similarity_loss, tcm_loss, mine_pairs,
    batch_hard_mine}` and their backwards: int64 labels, ref_emb and ref_labels together."""
    check_embeddings("embeddings", embeddings)
    _check_raw_labels("labels", labels, embeddings.shape[0], "embeddings", embeddings.shape)
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together (or both omitted)")
    if ref_emb is not None:
        check_embeddings("ref_emb", ref_emb)
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(f"ref_emb must have {embeddings.shape[1]} columns like embeddings, "
                             f"got shape {tuple(ref_emb.shape)}")
        if ref_emb.dtype != embeddings.dtype:
            raise TypeError(f"ref_emb must have the dtype of embeddings ({embeddings.dtype}), got {ref_emb.dtype}")
        _check_raw_labels("ref_labels", ref_labels, ref_emb.shape[0], "ref_emb", ref_emb.shape)
    if self_index is not None:
        if ref_emb is None:
            raise ValueError("self_index needs ref_emb (it names each anchor's column in it)")
        check_tensor(self_index, "self_index")
        if self_index.dtype != torch.int64:
            raise TypeError(f"self_index must be torch.int64, got {self_index.dtype}")
        if self_index.dim() != 1 or self_index.shape[0] != embeddings.shape[0]:
            raise ValueError(f"self_index must have shape ({embeddings.shape[0]},), got {tuple(self_index.shape)}")


def check_raw_backward(grad_loss, embeddings, stats, acc) -> None:
    """A mining loss's backward: a one-element upstream gradient and the forward's (B, 6) statistics."""
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must hold one element, got shape {tuple(grad_loss.shape)}")
    if tuple(stats.shape) != (embeddings.shape[0], STAT_COUNT) or stats.dtype != acc:
        raise ValueError(f"row_stats must be the (B, {STAT_COUNT}) statistics saved by the forward, got "
                         f"shape {tuple(stats.shape)} and dtype {stats.dtype}")


def tcm_hyperparameters(lambda_plus, lambda_minus, margin_plus, margin_minus) -> list[float]:
    return [check_finite(n, v) for n, v in (("lambda_plus", lambda_plus), ("lambda_minus", lambda_minus),
                                            ("margin_plus", margin_plus), ("margin_minus", margin_minus))]


RULES = ("multi_similarity", "pair_margin")


def check_rule(rule) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
