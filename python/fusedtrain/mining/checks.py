"""Argument checks of the mining family: embeddings, labels, the reference set and the
Multi-Similarity hyperparameters (the C++ ops check again)."""
from __future__ import annotations

import torch

from .._core.checks import check_finite, check_float_tensor, check_tensor

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
    if ref_emb.dtype != embeddings.dtype:
        raise TypeError(f"ref_emb must have the dtype of embeddings ({embeddings.dtype}), got {ref_emb.dtype}")
    if ref_emb.device != embeddings.device:
        raise ValueError(f"ref_emb is on {ref_emb.device} but embeddings is on {embeddings.device}")
    ref_labels = check_labels("ref_labels", ref_labels, ref_emb.shape[0], "ref_emb", embeddings.device)
    return embeddings, labels, ref_emb, ref_labels


def ms_hyperparameters(alpha, beta, base, epsilon):
    alpha, beta = check_finite("alpha", alpha), check_finite("beta", beta)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return alpha, beta, check_finite("base", base), check_finite("epsilon", epsilon)
