"""Fake (meta) kernels and autograd of the mining family's compiled ops, through
`_core.registry.register_op` (registered only when `_C` defines the ops)."""
from __future__ import annotations

import torch

from .._core.autocast import FP32
from .._core.checks import check_finite
from .._core.dtypes import accumulate_dtype
from .._core.registry import register_op
from .checks import (check_raw_backward, check_raw_operands, check_rule, ms_hyperparameters,
                     tcm_hyperparameters)
from .stats import STAT_COUNT

# The fake kernels check what the C++ ops check (csrc/mining/mining.cpp), so that meta tensors raise
# the errors the real kernels raise; `register_op` has checked that every tensor is on one device.


def _outputs(embeddings):
    return embeddings.new_empty(()), embeddings.new_empty((embeddings.shape[0], STAT_COUNT),
                                                          dtype=accumulate_dtype(embeddings.dtype))


def _fake_tcm_loss(embeddings, labels, ref_emb, ref_labels, *hyper):
    tcm_hyperparameters(*hyper)
    check_raw_operands(embeddings, labels, ref_emb, ref_labels)
    return _outputs(embeddings)


def _fake_ms_loss(embeddings, labels, ref_emb, ref_labels, self_index, alpha, beta, base, epsilon, mine,
                  compute_grad, ref_grad):
    ms_hyperparameters(alpha, beta, base, epsilon)
    check_raw_operands(embeddings, labels, ref_emb, ref_labels, self_index)
    loss, stats = _outputs(embeddings)
    grad_x = embeddings.new_empty(embeddings.shape if compute_grad else (0,))
    grad_r = (ref_emb.new_empty(ref_emb.shape) if compute_grad and ref_grad and ref_emb is not None
              else embeddings.new_empty((0,)))
    return loss, stats, grad_x, grad_r


def _backward_outputs(embeddings, ref_emb, ref_grad):
    grad_ref = (ref_emb.new_empty(ref_emb.shape) if ref_grad and ref_emb is not None
                else embeddings.new_empty((0,)))
    return embeddings.new_empty(embeddings.shape), grad_ref


def _fake_ms_backward(grad_loss, embeddings, labels, ref_emb, ref_labels, self_index, row_stats, alpha, beta,
                      base, epsilon, mine, ref_grad):
    ms_hyperparameters(alpha, beta, base, epsilon)
    check_raw_operands(embeddings, labels, ref_emb, ref_labels, self_index)
    check_raw_backward(grad_loss, embeddings, row_stats, accumulate_dtype(embeddings.dtype))
    return _backward_outputs(embeddings, ref_emb, ref_grad)


def _fake_tcm_backward(grad_loss, embeddings, labels, ref_emb, ref_labels, row_stats, *rest):
    *hyper, ref_grad = rest
    tcm_hyperparameters(*hyper)
    check_raw_operands(embeddings, labels, ref_emb, ref_labels)
    check_raw_backward(grad_loss, embeddings, row_stats, accumulate_dtype(embeddings.dtype))
    return _backward_outputs(embeddings, ref_emb, ref_grad)


def _fake_mine(embeddings, labels, ref_emb, ref_labels, rule, epsilon, pos_margin, neg_margin):
    for name, value in (("epsilon", epsilon), ("pos_margin", pos_margin), ("neg_margin", neg_margin)):
        check_finite(name, value)
    check_raw_operands(embeddings, labels, ref_emb, ref_labels)
    check_rule(rule)
    ctx = torch.library.get_ctx()
    n_pos, n_neg = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    new = lambda n: labels.new_empty((n,), dtype=torch.long)  # noqa: E731
    return new(n_pos), new(n_pos), new(n_neg), new(n_neg)


def _fake_batch_hard(embeddings, labels, ref_emb, ref_labels):
    check_raw_operands(embeddings, labels, ref_emb, ref_labels)
    n = torch.library.get_ctx().new_dynamic_size()
    return tuple(labels.new_empty((n,), dtype=torch.long) for _ in range(3))


def _setup_ms(ctx, inputs, output):
    (embeddings, labels, ref_emb, ref_labels, self_index, alpha, beta, base, epsilon, mine, compute_grad,
     ref_grad) = inputs
    _, stats, grad_x, grad_r = output
    ctx.hyper = (alpha, beta, base, epsilon, mine)
    ctx.computed = (compute_grad, compute_grad and ref_grad and ref_emb is not None)
    ctx.mark_non_differentiable(stats, grad_x, grad_r)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(embeddings, labels, ref_emb, ref_labels, self_index, stats, grad_x, grad_r)


def _backward_ms(ctx, grad_loss, *_grads_of_non_differentiable):
    embeddings, labels, ref_emb, ref_labels, self_index, stats, grad_x, grad_r = ctx.saved_tensors
    need_x, need_r = ctx.needs_input_grad[0], ref_emb is not None and ctx.needs_input_grad[2]
    if grad_loss is None or not (need_x or need_r):
        return (None,) * 12
    if ctx.computed[0] and (ctx.computed[1] or not need_r):
        # The forward computed the gradients for an upstream gradient of 1: scale them.
        gx, gr = grad_x * grad_loss, (grad_r * grad_loss if need_r else None)
    else:
        gx, gr = torch.ops.fusedtrain._multi_similarity_loss_backward(
            grad_loss, embeddings, labels, ref_emb, ref_labels, self_index, stats, *ctx.hyper, need_r)
    return (gx if need_x else None, None, gr if need_r else None) + (None,) * 9


def _setup_tcm(ctx, inputs, output):
    embeddings, labels, ref_emb, ref_labels, *hyper = inputs
    _, stats = output
    ctx.hyper = tuple(hyper)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(embeddings, labels, ref_emb, ref_labels, stats)


def _backward_tcm(ctx, grad_loss, _grad_stats):
    embeddings, labels, ref_emb, ref_labels, stats = ctx.saved_tensors
    need_x, need_r = ctx.needs_input_grad[0], ref_emb is not None and ctx.needs_input_grad[2]
    if grad_loss is None or not (need_x or need_r):
        return (None,) * 8
    gx, gr = torch.ops.fusedtrain._tcm_loss_backward(grad_loss, embeddings, labels, ref_emb, ref_labels,
                                                     stats, *ctx.hyper, need_r)
    return (gx if need_x else None, None, gr if need_r else None) + (None,) * 5


# Under autocast the mining ops compute in float32, as torch's cosine_similarity does (_core.autocast).
register_op("multi_similarity_loss", fake=_fake_ms_loss, backward=_backward_ms, setup_context=_setup_ms,
            reference="fusedtrain.reference.mining.multi_similarity_loss", autocast=FP32)
register_op("_multi_similarity_loss_backward", fake=_fake_ms_backward, autocast=FP32)
register_op("tcm_loss", fake=_fake_tcm_loss, backward=_backward_tcm, setup_context=_setup_tcm,
            reference="fusedtrain.reference.mining.tcm_loss", autocast=FP32)
register_op("_tcm_loss_backward", fake=_fake_tcm_backward, autocast=FP32)
register_op("mine_pairs", fake=_fake_mine, autocast=FP32)
register_op("batch_hard_mine", fake=_fake_batch_hard, autocast=FP32)
