"""Fuzz cases: memory safety of the raw ops given index tensors no routing would produce."""
from __future__ import annotations


import torch

import fusedtrain
from fusedtrain import sae as S

from framework import Raises, Safe, case
from inputs import OPS, sparse

# ---------------------------------------------------------------------------------------------
# Memory safety: raw ops given index tensors no routing would produce. Either a bound or an error.

HOSTILE_ROW_PTRS = {
    "overlapping": lambda nnz, B: torch.tensor([0] + [nnz, 0] * (B // 2)),
    "decreasing": lambda nnz, B: torch.arange(B + 1).flip(0) * 3,
    "negative": lambda nnz, B: torch.full((B + 1,), -5),
    "huge": lambda nnz, B: torch.full((B + 1,), 2**40),
    "short": lambda nnz, B: torch.tensor([0, nnz]),
}
for _name, _make in HOSTILE_ROW_PTRS.items():
    def _csc(make=_make):
        a = sparse()
        return OPS._sae_csc(make(a.feature.numel(), 8), a.feature, 32)

    def _gather(make=_make):
        a = sparse()
        return OPS.sae_gather_rows(make(a.feature.numel(), 8), a.feature, a.value, torch.randn(32, 16), None)

    def _sampled(make=_make):
        a = sparse()
        return OPS._sae_sampled_dot(make(a.feature.numel(), 8), a.feature, torch.randn(8, 16), torch.randn(32, 16))

    def _decode_backward(make=_make):
        a = sparse()
        v = a.value.clone().requires_grad_()
        W = torch.randn(32, 16, requires_grad=True)
        out = S.sparse_decode(S.SparseActs(make(a.feature.numel(), 8), a.feature, v), W, check_indices=False)
        out.sum().backward()
        return out, v.grad, W.grad

    case(f"memory/_sae_csc/row_ptr_{_name}", Safe("row_ptr"))(_csc)
    case(f"memory/sae_gather_rows/row_ptr_{_name}", Safe("row_ptr"))(_gather)
    case(f"memory/_sae_sampled_dot/row_ptr_{_name}", Safe("row_ptr|grad"))(_sampled)
    case(f"memory/sparse_decode_unchecked_backward/row_ptr_{_name}", Safe("row_ptr"))(_decode_backward)

HOSTILE_FEATURES = {"negative": -3, "past_end": 32, "huge": 2**40}
for _name, _value in HOSTILE_FEATURES.items():
    def _csc_feature(value=_value):
        a = sparse()
        feature = a.feature.clone()
        feature[1] = value
        return OPS._sae_csc(a.row_ptr, feature, 32)

    def _gather_feature(value=_value):
        a = sparse()
        feature = a.feature.clone()
        feature[1] = value
        return OPS.sae_gather_rows(a.row_ptr, feature, a.value, torch.randn(32, 16), None)

    def _decode_feature(value=_value):
        a = sparse()
        feature = a.feature.clone()
        feature[1] = value
        v = a.value.clone().requires_grad_()
        W = torch.randn(32, 16, requires_grad=True)
        S.sparse_decode(S.SparseActs(a.row_ptr, feature, v), W, check_indices=False).sum().backward()
        return v.grad, W.grad

    case(f"memory/_sae_csc/feature_{_name}", Safe("feature"))(_csc_feature)
    case(f"memory/sae_gather_rows/feature_{_name}", Safe("feature"))(_gather_feature)
    case(f"memory/sparse_decode_unchecked_backward/feature_{_name}", Safe("feature"))(_decode_feature)


@case("memory/_sae_csc/negative_num_cols", Raises((RuntimeError, ValueError), "num_cols"))
def _csc_negative_cols():
    a = sparse()
    return OPS._sae_csc(a.row_ptr, a.feature, -4)


@case("memory/_sae_segment_sum/hostile_col_ptr", Safe("col_ptr|perm|token"))
def _segment_sum_col_ptr():
    a = sparse()
    col_ptr, perm, token = OPS._sae_csc(a.row_ptr, a.feature, 32)
    col_ptr = torch.tensor([0] + [perm.numel(), 0] * 16)
    return OPS._sae_segment_sum(col_ptr, perm, token, a.value, torch.randn(8, 16))


@case("memory/_sae_segment_sum/hostile_perm_token", Safe("perm|token"))
def _segment_sum_perm():
    a = sparse()
    col_ptr, perm, token = OPS._sae_csc(a.row_ptr, a.feature, 32)
    return OPS._sae_segment_sum(col_ptr, perm * 1000 - 7, token + 2**33, a.value, torch.randn(8, 16))


@case("memory/frugal_step_/column_indices_out_of_range", Safe("indices"))
def _frugal_indices():
    p, g = torch.randn(4, 6), torch.randn(4, 6)
    m, v = torch.zeros(4, 2), torch.zeros(4, 2)
    idx = torch.tensor([1, 9], dtype=torch.int32)
    fusedtrain.frugal_step_([p], [g], [m], [v], [idx], [1], [1], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                            weight_decay=0.0)
    return p


