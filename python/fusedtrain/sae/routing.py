"""SAE routings (maths: docs/sae.md): TopK (token choice), feature choice, mutual choice
(BatchTopK) and threshold routing, each returning :class:`SparseActs` (CSR by token) of the kept
entries, all with pre > 0. Ties: larger value first, then smaller index.
"""
from __future__ import annotations

import torch

from .._core import autocast, backend
from .._core.checks import check_float_tensor, check_int
from .._core.dtypes import accumulate_dtype
from . import reference as _reference
from .checks import check_theta
from .types import SparseActs, TopKOutput

_ops = torch.ops.fusedtrain


def route(pre: torch.Tensor, routing: str, param: int, theta=None) -> tuple[SparseActs, torch.Tensor]:
    if backend.use_kernel("sae_route", pre.device):
        row_ptr, feature, value, cutoff = _ops.sae_route(pre, routing, param, theta)
        return SparseActs(row_ptr, feature, value), cutoff
    mask = _reference.route_mask(pre.detach(), routing, param, theta)
    acts = SparseActs(*_reference.csr_from_dense(pre, mask))
    return acts, reference_cutoff(pre.detach(), routing, param)


def reference_cutoff(pre: torch.Tensor, routing: str, param: int) -> torch.Tensor:
    """The routing's cutoff as the kernels return it (docs/sae.md): the best positive value it
    rejected, 0 when it kept every positive entry; (F,) for feature choice, (1,) for mutual choice."""
    acc = accumulate_dtype(pre.dtype)
    if routing == "feature_choice":
        return _reference.feature_choice_cutoff(pre, param).to(acc)
    if routing == "mutual_choice":
        return _reference.mutual_choice_cutoff(pre, param).to(acc)
    return torch.empty(0, dtype=acc, device=pre.device)


# Autocast: a routing selects and copies values, in pre's own dtype whatever autocast says (as
# torch.topk does); NATIVE only suspends autocast around it.
_NATIVE = autocast.policy(autocast.NATIVE, device="pre")


@_NATIVE
def topk_route(pre: torch.Tensor, k: int, *, dense: bool = False):
    """Token choice: each row keeps its k largest positive pre-activations.

    Returns :class:`SparseActs`, or with `dense=True` a :class:`TopKOutput` of `(B, k)` rectified
    values and indices (best first; rows with fewer than k positive entries are padded with zero
    values at their best non-positive features). Ties: larger value first, then smaller index.
    """
    check_float_tensor(pre, "pre", 2)
    k = check_int(k, "k", 1, pre.shape[1])
    if dense:
        if backend.use_kernel("sae_topk_select", pre.device):
            values, indices = _ops.sae_topk_select(pre, k)
        else:
            values, indices = _reference.topk_select(pre, k)
        return TopKOutput(values.relu(), indices)
    return route(pre, "topk", k)[0]


@_NATIVE
def feature_choice_route(pre: torch.Tensor, m: int) -> SparseActs:
    """Feature choice: each feature (column) keeps its m largest positive tokens of the batch.
    m = 0 keeps nothing; m >= B keeps every positive entry. Ties: smaller token first."""
    check_float_tensor(pre, "pre", 2)
    return route(pre, "feature_choice", check_int(m, "m", 0))[0]


@_NATIVE
def mutual_choice_route(pre: torch.Tensor, budget: int) -> SparseActs:
    """Mutual choice (= BatchTopK): the `budget` largest positive entries of the whole (B, F)
    matrix. Ties: smaller flat index b·F + f first."""
    check_float_tensor(pre, "pre", 2)
    return route(pre, "mutual_choice", check_int(budget, "budget", 0))[0]


@_NATIVE
def threshold_route(pre: torch.Tensor, theta) -> SparseActs:
    """Threshold (inference for the batch-dependent routings): keep pre > θ_f (and pre > 0);
    `theta` is one value per feature `(F,)` or a single global value."""
    check_float_tensor(pre, "pre", 2)
    theta = check_theta(theta, pre)
    return route(pre, "threshold", 0, theta)[0]
