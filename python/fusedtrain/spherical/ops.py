"""The logits-level spherical loss `fusedtrain.spherical_loss` (maths: docs/spherical.md).

The compiled op `fusedtrain::spherical_loss` reads each row once for `s = Σo`, `q = Σo²` and `o_c`, and
turns them into the loss and the three gradient coefficients `(α, β, γ)` of
`∂L/∂o = α + β·o + γ·e_c`. When the logits need a gradient and the reduction is "mean" or "sum", the
same kernel also writes that gradient while the row is still on chip, so backward only scales it by
the upstream gradient (a no-op when that is 1, decided on the device, no host sync). For
reduction="none" the per-row upstream gradient is only known in backward, so backward writes the
gradient from the saved coefficients in one pass.
"""
from __future__ import annotations

import torch

from .._core import autocast, backend
from . import reference as _reference
from .checks import DEFAULT_A, DEFAULT_B, DEFAULT_EPS, DEFAULT_VAR_EPS, check_logits_arguments, class_indices


# Autocast: the kernel reads bf16/fp16 logits with fp32 arithmetic already, so they are not copied
# to fp32 first (F.cross_entropy's policy would); the loss comes back as float32 (docs/spherical.md).
@autocast.policy(autocast.NATIVE, device="logits", loss=True)
def spherical_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "z", *,
                   a: float = DEFAULT_A, b: float = DEFAULT_B, eps: float = DEFAULT_EPS,
                   var_eps: float = DEFAULT_VAR_EPS, ignore_index: int = -100,
                   reduction: str = "mean", check_target: bool = True) -> torch.Tensor:
    """Spherical-family loss of `logits` (N, D) against integer class indices `target` (N,).

    A drop-in for `F.cross_entropy(logits, target, ignore_index=..., reduction=...)` that needs no
    softmax: its cost is one read of the logits (plus one write of their gradient).

    kind: "z" (Z-loss, hyperparameters `a` > 0 and `b`; `var_eps` is added to the row variance),
      "spherical" (log-spherical softmax, `eps` > 0), "taylor" (log-Taylor softmax), "mse".
    logits (N, D, d1, ...) with target (N, d1, ...) is accepted like `F.cross_entropy` (via a
      transposed copy). float32, float64, bfloat16 and float16; statistics accumulate in fp32
      (fp64 for fp64 input); the loss has the logits' dtype, float32 under torch.autocast.
    target: int64, or any integer dtype int64 holds (int32, int16, int8, uint8, uint16, uint32).
    check_target: raise on class indices outside [0, D) that are not `ignore_index`. On CUDA this
      reads one flag back from the device (a sync); pass False to skip it (CUDA graphs), in which case
      such rows give NaN loss and NaN gradient instead of an exception.
    """
    check_logits_arguments(logits, target, kind, a, b, eps, var_eps, ignore_index, reduction)
    target = class_indices(target)
    if not backend.use_kernel("spherical_loss", logits.device):
        return _reference.spherical_loss(logits, target, kind, a=a, b=b, eps=eps, var_eps=var_eps,
                                         ignore_index=ignore_index, reduction=reduction)
    out_shape = target.shape
    if logits.dim() > 2:
        logits = logits.movedim(1, -1).reshape(-1, logits.shape[1])
        target = target.reshape(-1)
    # Under torch.compile the gradient is written in backward from the coefficients (the fused
    # path's in-place scaling of a saved output cannot be functionalized).
    compute_grad = (logits.requires_grad and torch.is_grad_enabled() and reduction != "none"
                    and not torch.compiler.is_compiling())
    loss, _, _ = torch.ops.fusedtrain.spherical_loss(
        logits, target, kind, float(a), float(b), float(eps), float(var_eps), int(ignore_index),
        reduction, compute_grad, bool(check_target))
    return loss.reshape(out_shape) if reduction == "none" else loss
