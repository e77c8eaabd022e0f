"""Fake (meta) kernels and autograd of the SAE family's compiled ops, through
`_core.registry.register_op` (registered only when `_C` defines the ops).

The backward passes are sparse: only the kept entries carry gradient, aggregated per feature in a
fixed order (no float atomics), so no dense B x F gradient is ever made.
"""
from __future__ import annotations

import torch

from .._core.dtypes import accumulate_dtype
from .._core.registry import register_op
from . import reference as _reference
from .checks import (check_encoder, check_raw_csc, check_raw_gather, check_raw_route, check_raw_sampled_dot,
                     check_raw_segment_sum)

_ops = torch.ops.fusedtrain

# The fake kernels check what the C++ ops check (csrc/sae/sae.cpp), so that meta tensors raise the
# errors the real kernels raise; `register_op` has checked that every tensor is on one device.


def _fake_csr(pre_like: torch.Tensor, B: int, F: int, routing: str):
    nnz = torch.library.get_ctx().new_dynamic_size()
    cut = {"feature_choice": F, "mutual_choice": 1}.get(routing, 0)
    return (pre_like.new_empty(B + 1, dtype=torch.int64), pre_like.new_empty(nnz, dtype=torch.int64),
            pre_like.new_empty(nnz), pre_like.new_empty(cut, dtype=accumulate_dtype(pre_like.dtype)))


def _fake_route(pre, routing, k, theta):
    check_raw_route(pre, routing, k, theta)
    return _fake_csr(pre, pre.shape[0], pre.shape[1], routing)


def _fake_encode(x, W_enc, b_enc, b_dec, routing, k, theta):
    check_encoder(x, W_enc, b_enc, b_dec)
    check_raw_route(x.new_empty(0, W_enc.shape[1]), routing, k, theta)
    return _fake_csr(x, x.shape[0], W_enc.shape[1], routing)


def _fake_topk_select(pre, k):
    check_raw_route(pre, "topk", k, None)
    return pre.new_empty(pre.shape[0], k), pre.new_empty(pre.shape[0], k, dtype=torch.int64)


def _fake_gather_rows(row_ptr, feature, value, table, bias):
    check_raw_gather(row_ptr, feature, value, table, bias)
    return table.new_empty(row_ptr.shape[0] - 1, table.shape[1])


def _fake_sampled_dot(row_ptr, feature, grad, table):
    check_raw_sampled_dot(row_ptr, feature, grad, table)
    return grad.new_empty(feature.shape[0])


def _fake_csc(row_ptr, feature, num_cols):
    check_raw_csc(row_ptr, feature, num_cols)
    return (feature.new_empty(num_cols + 1), feature.new_empty(feature.shape[0]),
            feature.new_empty(feature.shape[0]))


def _fake_segment_sum(col_ptr, perm, token, coef, src):
    check_raw_segment_sum(col_ptr, perm, token, coef, src)
    F = col_ptr.shape[0] - 1
    return src.new_empty(F, src.shape[1]), coef.new_empty(F)


def _dense_grad_of_csr(row_ptr, feature, grad_value, shape):
    """d/dpre of values gathered at the stored entries: the upstream gradient scattered back."""
    return _reference.dense_from_csr(row_ptr, feature, grad_value, shape[1])


def _route_setup(ctx, inputs, output):
    pre = inputs[0]
    row_ptr, feature, _, cutoff = output
    ctx.mark_non_differentiable(row_ptr, feature, cutoff)
    ctx.set_materialize_grads(False)
    ctx.shape = pre.shape
    ctx.save_for_backward(row_ptr, feature)


def _route_backward(ctx, _g_row_ptr, _g_feature, grad_value, _g_cutoff):
    if grad_value is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    row_ptr, feature = ctx.saved_tensors
    return _dense_grad_of_csr(row_ptr, feature, grad_value, ctx.shape), None, None, None


def _topk_setup(ctx, inputs, output):
    pre = inputs[0]
    _, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)
    ctx.shape = pre.shape
    ctx.save_for_backward(indices)


def _topk_backward(ctx, grad_values, _g_indices):
    if grad_values is None or not ctx.needs_input_grad[0]:
        return None, None
    (indices,) = ctx.saved_tensors
    grad = grad_values.new_zeros(ctx.shape)
    return grad.scatter(1, indices, grad_values), None


def _encode_setup(ctx, inputs, output):
    x, W_enc, _, b_dec = inputs[:4]
    row_ptr, feature, _, cutoff = output
    ctx.mark_non_differentiable(row_ptr, feature, cutoff)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, W_enc, b_dec, row_ptr, feature)


def _encode_backward(ctx, _g_row_ptr, _g_feature, grad_value, _g_cutoff):
    """Sparse gradients of the fused encoder. dpre = dvalue at the kept entries (each kept
    pre-activation is > 0, so ReLU' = 1) and zero elsewhere:
    dW_enc[:, f] = Σ_b dpre_bf (x_b − b_dec)  (per feature, fixed order),  db_enc = Σ_b dpre_b,
    dx_b = Σ_f dpre_bf W_enc[:, f],  db_dec = −W_enc·db_enc."""
    none = (None,) * 7
    if grad_value is None:
        return none
    x, W_enc, b_dec, row_ptr, feature = ctx.saved_tensors
    need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
    grad_value = grad_value.contiguous()
    dx = dW_enc = db_enc = db_dec = None
    if need_w or need_be or need_bd:
        col_ptr, perm, token = _ops._sae_csc(row_ptr, feature, W_enc.shape[1])
        # dW_enc is built as its (F, d) transpose, rows written whole; returned as a (d, F) view,
        # which matches an encoder weight stored as (F, d) memory (SparseAutoencoder's layout).
        dW_enc_t, db_enc = _ops._sae_segment_sum(col_ptr, perm, token, grad_value, x - b_dec)
        dW_enc = dW_enc_t.t() if need_w else None
        if need_bd:
            db_dec = -(W_enc @ db_enc)
        if not need_be:
            db_enc = None
    if need_x:
        dx = _ops.sae_gather_rows(row_ptr, feature, grad_value, W_enc.t(), None)
    return dx, dW_enc, db_enc, db_dec, None, None, None


def _gather_setup(ctx, inputs, output):
    row_ptr, feature, value, table, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(row_ptr, feature, value, table)


def _gather_backward(ctx, grad_out):
    """dvalue_j = grad[b_j]·table[f_j] (dot products at the stored entries only);
    dtable[f] = Σ_{j in feature f} value_j·grad[b_j] (per feature, fixed order); dbias = Σ_b grad_b."""
    row_ptr, feature, value, table = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dvalue = dtable = dbias = None
    if ctx.needs_input_grad[2]:
        dvalue = _ops._sae_sampled_dot(row_ptr, feature, grad_out, table)
    if ctx.needs_input_grad[3]:
        col_ptr, perm, token = _ops._sae_csc(row_ptr, feature, table.shape[0])
        dtable = _ops._sae_segment_sum(col_ptr, perm, token, value, grad_out)[0]
    if ctx.has_bias and ctx.needs_input_grad[4]:
        dbias = grad_out.sum(0)
    return None, None, dvalue, dtable, dbias


register_op("sae_route", fake=_fake_route, backward=_route_backward, setup_context=_route_setup,
            api="fusedtrain.sae's routings", reference="fusedtrain.reference.sae.route_mask")
register_op("sae_topk_select", fake=_fake_topk_select, backward=_topk_backward, setup_context=_topk_setup,
            api="fusedtrain.sae.topk_route(dense=True)", reference="fusedtrain.reference.sae.topk_select")
register_op("sae_encode", fake=_fake_encode, backward=_encode_backward, setup_context=_encode_setup,
            api="fusedtrain.sae.sae_encode", reference="fusedtrain.reference.sae.encode")
register_op("sae_gather_rows", fake=_fake_gather_rows, backward=_gather_backward, setup_context=_gather_setup,
            api="fusedtrain.sae.sparse_decode", reference="fusedtrain.reference.sae.decode")
register_op("_sae_sampled_dot", fake=_fake_sampled_dot)
register_op("_sae_csc", fake=_fake_csc)
register_op("_sae_segment_sum", fake=_fake_segment_sum)
