"""Softmax-free spherical losses (spec/spherical.md): functional API, autograd and fake kernels.

The compiled op `fusedtrain::spherical_loss` reads each row once for `s = Σo`, `q = Σo²` and `o_c`, and
turns them into the loss and the three gradient coefficients `(α, β, γ)` of
`∂L/∂o = α + β·o + γ·e_c`. When the logits need a gradient and the reduction is "mean" or "sum", the
same kernel also writes that gradient while the row is still on chip, so backward only scales it by
the upstream gradient (a no-op when that is 1, decided on the device, no host sync). For
reduction="none" the per-row upstream gradient is only known in backward, so backward writes the
gradient from the saved coefficients in one pass.
"""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

from . import _backend
from .reference import spherical as _reference

KINDS = _reference.KINDS
REDUCTIONS = _reference.REDUCTIONS

# Defaults of the spec. Z-loss: small a and large b train best (spec's measured table, see README).
DEFAULT_A = 0.05
DEFAULT_B = 20.0
DEFAULT_EPS = 1e-6
DEFAULT_VAR_EPS = 1e-6

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_arguments(logits, target, kind, a, b, eps, var_eps, ignore_index, reduction) -> None:
    """Python-side checks: clear errors before anything reaches a kernel (C++ checks again)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    _check_hyperparameters(kind, a, b, eps, var_eps, ignore_index, reduction)
    if logits.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"logits must be float32, float64, bfloat16 or float16, got {logits.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 class indices, got {target.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, D) or (N, D, d1, ...), got {tuple(logits.shape)}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target must have shape {expected} for logits of shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one class (D >= 1)")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits is on {logits.device}")


def _check_hyperparameters(kind, a, b, eps, var_eps, ignore_index, reduction) -> None:
    """Checks shared with the fused linear op (linear_spherical.py)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, value in (("a", a), ("b", b), ("eps", eps), ("var_eps", var_eps)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if kind == "z" and a <= 0:
        raise ValueError(f"a must be > 0 for the Z-loss, got {a}")
    if kind == "z" and var_eps < 0:
        raise ValueError(f"var_eps must be >= 0, got {var_eps}")
    if kind == "spherical" and eps <= 0:
        raise ValueError(f"eps must be > 0 for the log-spherical softmax, got {eps}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def spherical_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "z", *,
                   a: float = DEFAULT_A, b: float = DEFAULT_B, eps: float = DEFAULT_EPS,
                   var_eps: float = DEFAULT_VAR_EPS, ignore_index: int = -100,
                   reduction: str = "mean", check_target: bool = True) -> torch.Tensor:
    """Spherical-family loss of `logits` (N, D) against int64 class indices `target` (N,).

    A drop-in for `F.cross_entropy(logits, target, ignore_index=..., reduction=...)` that needs no
    softmax: its cost is one read of the logits (plus one write of their gradient).

    kind: "z" (Z-loss, hyperparameters `a` > 0 and `b`; `var_eps` is added to the row variance),
      "spherical" (log-spherical softmax, `eps` > 0), "taylor" (log-Taylor softmax), "mse".
    logits (N, D, d1, ...) with target (N, d1, ...) is accepted like `F.cross_entropy` (via a
      transposed copy). float32, float64, bfloat16 and float16; statistics accumulate in fp32
      (fp64 for fp64 input); the loss has the logits' dtype.
    check_target: raise on class indices outside [0, D) that are not `ignore_index`. On CUDA this
      reads one flag back from the device (a sync); pass False to skip it (CUDA graphs), in which case
      such rows give NaN loss and NaN gradient instead of an exception.
    """
    _check_arguments(logits, target, kind, a, b, eps, var_eps, ignore_index, reduction)
    if not _backend.use_kernel("spherical_loss", logits.device):
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


# ---------------------------------------------------------------------------------------------
# Autograd and fake (meta) kernels for the compiled op. Registered only when `_C` defines the op.

def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_spherical_loss(logits, target, kind, a, b, eps, var_eps, ignore_index, reduction,
                         compute_grad, check_target):
    if compute_grad and reduction == "none":
        raise ValueError("compute_grad=True needs reduction 'mean' or 'sum', got reduction='none'")
    n = logits.shape[0]
    loss = logits.new_empty((n,) if reduction == "none" else ())
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    coef = logits.new_empty((n, 4), dtype=_accumulate_dtype(logits.dtype))
    return loss, grad, coef


def _fake_spherical_loss_backward(grad_loss, logits, target, coef, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_scale_grad_(grad, grad_loss):
    return None


def _setup_context(ctx, inputs, output):
    logits, target, _, _, _, _, _, ignore_index, _, _, _ = inputs
    _, grad, coef = output
    ctx.ignore_index = ignore_index
    ctx.fused_grad_used = False
    ctx.mark_non_differentiable(grad, coef)
    # Without this, autograd hands backward N x D zeros for the (non-differentiable) gradient
    # output: a full extra write of the logits' size (measured: 0.65 ms of a 2.4 ms step on H100).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, grad, coef)


def _is_traced(t: torch.Tensor) -> bool:
    """Whether `t` is a tracing stand-in (fake/functional tensor of torch.compile or opcheck)."""
    return torch.compiler.is_compiling() or is_fake(t)


def _backward(ctx, grad_loss, _grad_of_grad, _grad_of_coef):
    logits, target, grad, coef = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return (None,) * 11
    if torch.is_grad_enabled() and not _is_traced(logits):
        # create_graph=True: the kernels' gradient has no graph of its own, and returning it
        # detached would make every second-order term silently zero.
        raise NotImplementedError("fusedtrain.spherical_loss does not support double backward "
                                  "(create_graph=True); use fusedtrain.reference.spherical_loss")
    fused = grad.numel() == logits.numel() and logits.numel() > 0
    if fused and not ctx.fused_grad_used and not _is_traced(grad):
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


def _register() -> None:
    if not _backend.has_extension() or not hasattr(torch.ops.fusedtrain, "spherical_loss"):
        return
    torch.library.register_fake("fusedtrain::spherical_loss")(_fake_spherical_loss)
    torch.library.register_fake("fusedtrain::_spherical_loss_backward")(_fake_spherical_loss_backward)
    torch.library.register_fake("fusedtrain::_scale_grad_")(_fake_scale_grad_)
    torch.library.register_autograd("fusedtrain::spherical_loss", _backward,
                                    setup_context=_setup_context)


_register()
