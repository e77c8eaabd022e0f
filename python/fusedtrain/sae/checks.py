"""Argument checks of the SAE family (the C++ ops check again; these name the Python-level argument)."""
from __future__ import annotations

import torch

from .._core.checks import INT64_MAX, check_float_tensor, check_int, check_like
from .._core.dtypes import accumulate_dtype
from .types import SparseActs

ROUTINGS = ("topk", "feature_choice", "mutual_choice")


def routing_param(routing: str, k, m, budget, batch: int, num_latents: int) -> int:
    """The op's integer parameter: k (TopK), m (feature choice), budget (mutual choice)."""
    if routing == "topk":
        return check_int(k, "k", 1, num_latents)
    if routing == "feature_choice":
        if m is None:
            k = check_int(k, "k", 0)
            # Exact integer ceil; m >= B keeps every entry, so clamping to int64 changes nothing.
            return min(-(-k * batch // num_latents), INT64_MAX) if num_latents else 0
        return check_int(m, "m", 0)
    if routing == "mutual_choice":
        if budget is None:  # a budget >= B·F keeps every entry: clamping to int64 changes nothing
            return min(check_int(k, "k", 0) * batch, INT64_MAX)
        return check_int(budget, "budget", 0)
    raise ValueError(f"routing must be one of {ROUTINGS + ('threshold',)}, got {routing!r}")


def check_theta(theta, pre: torch.Tensor) -> torch.Tensor:
    if isinstance(theta, (int, float)) and not isinstance(theta, bool):
        # Not rounded to pre's dtype: the kernels compare in the accumulate type (fp32, fp64 for fp64).
        return torch.tensor(float(theta), dtype=accumulate_dtype(pre.dtype), device=pre.device)
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"theta must be a float or a tensor, got {type(theta).__name__}")
    F = pre.shape[1]
    if not (theta.numel() == 1 and theta.dim() <= 1) and tuple(theta.shape) != (F,):
        raise ValueError(f"theta must have shape ({F},) (one per feature) or be a single value, "
                         f"got shape {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor, got {theta.dtype}")
    if theta.device != pre.device:
        raise ValueError(f"theta is on {theta.device} but pre is on {pre.device}")
    return theta


def check_encoder(x, W_enc, b_enc, b_dec) -> None:
    check_float_tensor(x, "x", 2)
    check_float_tensor(W_enc, "W_enc", 2)
    d = x.shape[1]
    if W_enc.shape[0] != d:
        raise ValueError(f"W_enc must have shape (d, F) with d = {d}, got {tuple(W_enc.shape)}")
    F = W_enc.shape[1]
    for name, t, n in (("b_enc", b_enc, F), ("b_dec", b_dec, d)):
        check_float_tensor(t, name, 1)
        if t.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec)):
        check_like(t, x, name, "x")


def check_acts(acts, W_dec: torch.Tensor) -> SparseActs:
    if not isinstance(acts, tuple) or len(acts) != 3:
        raise TypeError("acts must be SparseActs(row_ptr, feature, value)")
    row_ptr, feature, value = acts
    for name, t in (("row_ptr", row_ptr), ("feature", feature)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise TypeError(f"acts.{name} must be a 1-D int64 tensor")
    check_float_tensor(value, "acts.value", 1)
    if row_ptr.numel() < 1 or value.shape[0] != feature.shape[0]:
        raise ValueError(f"acts must have row_ptr of B + 1 entries and value, feature of one length; got "
                         f"{row_ptr.numel()}, {value.shape[0]}, {feature.shape[0]}")
    check_like(W_dec, value, "W_dec", "acts.value")
    for name, t in (("row_ptr", row_ptr), ("feature", feature)):
        if t.device != value.device:
            raise ValueError(f"acts.{name} is on {t.device} but acts.value is on {value.device}")
    return SparseActs(row_ptr, feature, value)


def check_csr_indices(acts: SparseActs, num_latents: int) -> None:
    """Index ranges of a user-supplied CSR (reads values back: a sync on CUDA)."""
    row_ptr, feature, _ = acts
    nnz = feature.numel()
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((row_ptr.diff() < 0).any()):
        raise ValueError(f"acts.row_ptr must rise from 0 to nnz = {nnz}")
    if nnz and (int(feature.min()) < 0 or int(feature.max()) >= num_latents):
        raise ValueError(f"acts.feature must lie in [0, {num_latents})")
