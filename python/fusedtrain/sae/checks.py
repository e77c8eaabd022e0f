"""Argument checks of the SAE family (the C++ ops check again; these name the Python-level argument)."""
from __future__ import annotations

import torch

from .._core.checks import INT64_MAX, check_float_tensor, check_int, check_like, check_same_dtype, check_tensor
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
        raise ValueError(f"W_enc must have shape (d, F) with d = {d} the width of x (x has shape "
                         f"{tuple(x.shape)}), got {tuple(W_enc.shape)}")
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


# -- the raw ops' checks (what csrc/sae/sae.cpp checks), for the fake kernels -----------------------

def _check_index_vector(t, name: str) -> None:
    check_tensor(t, name)
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be torch.int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


def check_raw_route(pre, routing, k, theta) -> None:
    """`torch.ops.fusedtrain.sae_route(pre, routing, k, theta)` (k: the routing's int parameter)."""
    check_float_tensor(pre, "pre", 2)
    if routing not in ROUTINGS + ("threshold",):
        raise ValueError(f"routing must be one of {ROUTINGS + ('threshold',)}, got {routing!r}")
    F = pre.shape[1]
    if routing == "topk" and not 1 <= k <= F:
        raise ValueError(f"k must be in [1, F] = [1, {F}] for pre of shape {tuple(pre.shape)}, got k = {k}")
    if routing in ("feature_choice", "mutual_choice") and k < 0:
        raise ValueError(f"{'m' if routing == 'feature_choice' else 'budget'} must be >= 0, got {k}")
    if routing == "threshold":
        if theta is None:
            raise ValueError("threshold routing needs theta")
        check_float_tensor(theta, "theta")
        if not (theta.dim() <= 1 if theta.numel() == 1 else tuple(theta.shape) == (F,)):
            raise ValueError(f"theta must have shape (F,) = ({F},) or be a single value, got shape "
                             f"{tuple(theta.shape)}")


def check_raw_csr(row_ptr, feature, value, value_name: str = "value") -> None:
    _check_index_vector(row_ptr, "row_ptr")
    _check_index_vector(feature, "feature")
    if row_ptr.shape[0] < 1:
        raise ValueError("row_ptr must have B + 1 >= 1 entries")
    check_float_tensor(value, value_name, None)
    if value.dim() != 1 or value.shape[0] != feature.shape[0]:
        raise ValueError(f"{value_name} must have shape (nnz,) = ({feature.shape[0]},), got {tuple(value.shape)}")


def check_raw_table(table, ref, name: str, ref_name: str) -> None:
    check_tensor(table, name)
    if table.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(table.shape)}")
    check_same_dtype(table, ref, name, ref_name)


def check_raw_gather(row_ptr, feature, value, table, bias) -> None:
    """`torch.ops.fusedtrain.sae_gather_rows` (the decoder: table W_dec, bias b_dec)."""
    check_raw_csr(row_ptr, feature, value)
    check_raw_table(table, value, "W_dec", "value")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != table.shape[1]:
            raise ValueError(f"b_dec must have shape ({table.shape[1]},), got {tuple(bias.shape)}")
        check_same_dtype(bias, value, "b_dec", "value")


def check_raw_sampled_dot(row_ptr, feature, grad, table) -> None:
    _check_index_vector(row_ptr, "row_ptr")
    _check_index_vector(feature, "feature")
    check_float_tensor(grad, "grad", 2)
    check_raw_table(table, grad, "table", "grad")
    if grad.shape[0] != row_ptr.shape[0] - 1 or grad.shape[1] != table.shape[1]:
        raise ValueError(f"grad must have shape (B, d) = ({row_ptr.shape[0] - 1}, {table.shape[1]}), got "
                         f"{tuple(grad.shape)}")


def check_raw_csc(row_ptr, feature, num_cols) -> None:
    _check_index_vector(row_ptr, "row_ptr")
    _check_index_vector(feature, "feature")
    if num_cols < 0:
        raise ValueError(f"num_cols must be >= 0, got {num_cols}")


def check_raw_segment_sum(col_ptr, perm, token, coef, src) -> None:
    for name, t in (("col_ptr", col_ptr), ("perm", perm), ("token", token)):
        _check_index_vector(t, name)
    check_float_tensor(coef, "coef")
    if coef.dim() != 1 or coef.shape[0] != perm.shape[0] or token.shape[0] != perm.shape[0]:
        raise ValueError(f"perm, token and coef must all have nnz = {perm.shape[0]} entries")
    check_raw_table(src, coef, "src", "coef")
    if col_ptr.shape[0] < 1:
        raise ValueError("col_ptr must have F + 1 >= 1 entries")
