"""PML's reducer and embedding-regularizer protocol, duck-typed (PML need not be installed).

A PML loss builds a loss dict — `{"loss": {"losses": ..., "indices": ..., "reduction_type": ...}}`,
plus `"embedding_reg_loss"` when an `embedding_regularizer` is set — and hands it to its reducer
(`reducer(loss_dict, embeddings, labels)`). With more than one entry, PML gives each entry its own
copy of the reducer and sums the results (its MultipleReducers), except that a MultipleReducers or
DoNothingReducer given by the user receives the whole dict. We build the same dicts and call the
user's objects the same way, so any PML reducer (Mean, Sum, AvgNonZero, Threshold, PerAnchor,
ClassWeighted, ...) and any regularizer (a callable on the embeddings) means what it means in PML.
No reducer, or a `MeanReducer`, with no regularizer, is the mean: the fused kernels' own reduction.
"""
from __future__ import annotations

import copy

import torch

_WHOLE_DICT = ("MultipleReducers", "DoNothingReducer")


def is_plain_mean(reducer) -> bool:
    """True for PML's default reduction: no reducer, or a MeanReducer (not a subclass)."""
    return reducer is None or type(reducer).__name__ == "MeanReducer"


def check_reducer(reducer, owner: str):
    if reducer is not None and not callable(reducer):
        raise TypeError(f"{owner}: reducer must be a PML-style reducer, called as reducer(loss_dict, embeddings, "
                        f"labels), or None for the mean; got {type(reducer).__name__}")
    return reducer


def check_regularizer(regularizer, weight, owner: str):
    if regularizer is not None and not callable(regularizer):
        raise TypeError(f"{owner}: embedding_regularizer must be callable on the embeddings (a PML regularizer), "
                        f"got {type(regularizer).__name__}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"{owner}: embedding_reg_weight must be a number, got {type(weight).__name__}")
    return regularizer, weight


def element_losses(losses: torch.Tensor) -> dict:
    """PML's entry for one loss per anchor (MultiSimilarityLoss)."""
    return {"losses": losses, "indices": torch.arange(losses.shape[0], device=losses.device),
            "reduction_type": "element"}


def already_reduced(loss) -> dict:
    """PML's entry for a scalar loss (TCM, a regularizer); `0` is PML's "zero loss" marker."""
    return {"losses": loss, "indices": None, "reduction_type": "already_reduced"}


def reduce(reducer, regularizer, reg_weight, loss_entry: dict, embeddings, labels):
    """PML's `reducer(loss_dict, embeddings, labels)` with the regularizer's entry added as PML adds it."""
    loss_dict = {"loss": loss_entry}
    if regularizer is not None:
        loss_dict["embedding_reg_loss"] = already_reduced(regularizer(embeddings) * reg_weight)
    if reducer is not None and type(reducer).__name__ in _WHOLE_DICT:
        return reducer(loss_dict, embeddings, labels)
    total = None
    for name, entry in loss_dict.items():
        value = _reduce_one(reducer if len(loss_dict) == 1 else copy.deepcopy(reducer), name, entry, embeddings,
                            labels)
        total = value if total is None else total + value
    return total


def _reduce_one(reducer, name, entry, embeddings, labels):
    if reducer is not None:
        return reducer({name: entry}, embeddings, labels)
    losses = entry["losses"]  # the mean, as PML's MeanReducer
    if not torch.is_tensor(losses) and losses == 0:
        return torch.sum(embeddings * 0)
    return losses if entry["reduction_type"] == "already_reduced" else torch.mean(losses)
