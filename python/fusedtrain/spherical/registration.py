"""Fake (meta) kernels and autograd of the spherical family's compiled ops, through
`_core.registry.register_op` (registered only when `_C` defines the ops)."""
from __future__ import annotations

import torch

from .._core.checks import check_float_tensor
from .._core.dtypes import accumulate_dtype
from .._core.registry import is_traced, register_op
from .checks import (check_grad_loss, check_hyperparameters, check_raw_linear, check_raw_logits,
                     check_saved)

# The fake kernels check what the C++ ops check (csrc/spherical/*.cpp), so that meta tensors raise
# the errors the real kernels raise; `register_op` has checked that every tensor is on one device.


def _fake_spherical_loss(logits, target, kind, a, b, eps, var_eps, ignore_index, reduction,
                         compute_grad, check_target):
    check_raw_logits(logits, target)
    check_hyperparameters(kind, a, b, eps, var_eps, ignore_index, reduction)
    if compute_grad and reduction == "none":
        raise ValueError("compute_grad=True needs reduction 'mean' or 'sum', got reduction='none'")
    n = logits.shape[0]
    acc = accumulate_dtype(logits.dtype)
    loss = logits.new_empty((n,) if reduction == "none" else (), dtype=acc)  # the Python layer casts it
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    coef = logits.new_empty((n, 4), dtype=acc)
    return loss, grad, coef


def _fake_spherical_loss_backward(grad_loss, logits, target, coef, ignore_index):
    check_raw_logits(logits, target)
    check_saved(coef, "coef", (logits.shape[0], 4), accumulate_dtype(logits.dtype))
    check_grad_loss(grad_loss, logits.shape[0])
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_scale_grad_(grad, grad_loss):
    check_float_tensor(grad, "grad")
    check_float_tensor(grad_loss, "grad_loss")
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must hold one element, got shape {tuple(grad_loss.shape)}")
    if not grad.is_contiguous():
        raise ValueError("grad must be contiguous")
    return None


def _setup_spherical(ctx, inputs, output):
    logits, target, _, _, _, _, _, ignore_index, _, _, _ = inputs
    _, grad, coef = output
    ctx.ignore_index = ignore_index
    ctx.fused_grad_used = False
    ctx.mark_non_differentiable(grad, coef)
    # Without this, autograd hands backward N x D zeros for the (non-differentiable) gradient
    # output: a full extra write of the logits' size.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, grad, coef)


def _backward_spherical(ctx, grad_loss, _grad_of_grad, _grad_of_coef):
    logits, target, grad, coef = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return (None,) * 11
    fused = grad.numel() == logits.numel() and logits.numel() > 0
    if fused and not ctx.fused_grad_used and not is_traced(grad):
        # The forward already wrote dL/dlogits (reduction weight included): scale it by the
        # upstream scalar in place; the kernel skips the pass when that scalar is 1. The buffer is
        # handed to autograd, which may keep it as `.grad`: a second backward through the same
        # graph (retain_graph=True) rebuilds the gradient from the coefficients instead.
        ctx.fused_grad_used = True
        torch.ops.fusedtrain._scale_grad_(grad, grad_loss)
        grad_logits = grad
    else:
        grad_logits = torch.ops.fusedtrain._spherical_loss_backward(
            grad_loss, logits, target, coef, ctx.ignore_index)
    return (grad_logits,) + (None,) * 10


def _fake_gram(linear_weight, linear_bias):
    check_raw_linear(linear_weight.new_empty(0, linear_weight.shape[-1]), linear_weight, linear_bias,
                     linear_weight.new_empty(0, dtype=torch.int64))
    dp = linear_weight.shape[1] + (linear_bias is not None)
    acc = accumulate_dtype(linear_weight.dtype)
    return linear_weight.new_empty((dp, dp), dtype=acc), linear_weight.new_empty((dp,), dtype=acc)


def _fake_linear_loss(input, linear_weight, linear_bias, target, gram, colsum, kind, a, b, eps, var_eps,
                      ignore_index, reduction, check_target):
    check_raw_linear(input, linear_weight, linear_bias, target)
    check_hyperparameters(kind, a, b, eps, var_eps, ignore_index, reduction)
    n = input.shape[0]
    dp = input.shape[1] + (linear_bias is not None)
    acc = accumulate_dtype(input.dtype)
    check_saved(gram, "gram", (dp, dp), acc)
    check_saved(colsum, "colsum", (dp,), acc)
    loss = input.new_empty((n,) if reduction == "none" else (), dtype=acc)  # the Python layer casts it
    return loss, input.new_empty((n, 3), dtype=acc), input.new_empty((n, dp), dtype=acc)


def _fake_linear_backward(grad_loss, input, linear_weight, linear_bias, target, colsum, coef, proj,
                          ignore_index, output_mask):
    check_raw_linear(input, linear_weight, linear_bias, target)
    n, dp = input.shape[0], input.shape[1] + (linear_bias is not None)
    acc = accumulate_dtype(input.dtype)
    for name, t, shape in (("colsum", colsum, (dp,)), ("coef", coef, (n, 3)), ("proj", proj, (n, dp))):
        check_saved(t, name, shape, acc)
    check_grad_loss(grad_loss, n)
    def maybe(shape, wanted):
        return input.new_empty(shape if wanted else (0,))
    return (maybe(input.shape, output_mask[0]), maybe(linear_weight.shape, output_mask[1]),
            maybe((linear_weight.shape[0],), output_mask[2] and linear_bias is not None))


def _setup_linear(ctx, inputs, output):
    input, weight, bias, target, _gram, colsum = inputs[:6]
    _, coef, proj = output
    ctx.ignore_index = inputs[11]
    ctx.mark_non_differentiable(coef, proj)
    ctx.set_materialize_grads(False)  # no zeros for the non-differentiable outputs
    ctx.save_for_backward(input, weight, bias, target, colsum, coef, proj)


def _backward_linear(ctx, grad_loss, _grad_coef, _grad_proj):
    input, weight, bias, target, colsum, coef, proj = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
            bool(ctx.needs_input_grad[2]) and bias is not None]
    if grad_loss is None or not any(mask):
        return (None,) * 14
    grads = torch.ops.fusedtrain._linear_spherical_loss_backward(
        grad_loss, input, weight, bias, target, colsum, coef, proj, ctx.ignore_index, mask)
    return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,) * 11


register_op("spherical_loss", fake=_fake_spherical_loss, backward=_backward_spherical,
            setup_context=_setup_spherical, reference="fusedtrain.reference.spherical.spherical_loss")
register_op("_spherical_loss_backward", fake=_fake_spherical_loss_backward)
register_op("_scale_grad_", fake=_fake_scale_grad_)
register_op("linear_spherical_loss", fake=_fake_linear_loss, backward=_backward_linear,
            setup_context=_setup_linear,
            reference="fusedtrain.reference.linear_spherical.linear_spherical_loss")
register_op("_linear_spherical_gram", fake=_fake_gram)
register_op("_linear_spherical_loss_backward", fake=_fake_linear_backward)
