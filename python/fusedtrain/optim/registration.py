"""Fake (meta) kernel of FRUGAL's compiled step, through `_core.registry.register_op`. The step is
an in-place optimizer update with no autograd: the fake kernel only checks the arguments."""
from __future__ import annotations

from .._core.registry import register_op
from .checks import check_raw_step


def _fake_frugal_step_(params, grads, exp_avgs, exp_avg_sqs, indices, residual_bases, dense_updates,
                       kinds, steps, lr, beta1, beta2, eps, weight_decay, free_update, free_lr_scale):
    # What the compiled step checks (`register_op` has checked that every tensor is on one device).
    check_raw_step(params, grads, exp_avgs, exp_avg_sqs, indices, residual_bases, dense_updates, kinds, steps,
                   lr, beta1, beta2, eps, weight_decay, free_update, free_lr_scale)
    return None


register_op("frugal_step_", fake=_fake_frugal_step_)
