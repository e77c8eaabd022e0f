"""Fake (meta) kernel of FRUGAL's compiled step, through `_core.registry.register_op`. The step is
an in-place optimizer update with no autograd."""
from __future__ import annotations

from .._core.registry import register_op


def _fake_frugal_step_(params, grads, exp_avgs, exp_avg_sqs, indices, residual_bases, dense_updates,
                       kinds, steps, lr, beta1, beta2, eps, weight_decay, free_update, free_lr_scale):
    return None


register_op("frugal_step_", fake=_fake_frugal_step_)
