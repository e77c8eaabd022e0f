"""The spherical family's hyperparameters, their defaults, and the argument checks shared by the
logits-level op and the fused linear op (the C++ ops check again)."""
from __future__ import annotations

import torch

from .._core.checks import check_finite, check_float_tensor, check_int64, check_tensor
from .reference import KINDS, REDUCTIONS

# Z-loss: small a and large b train best (measured table in docs/spherical.md).
DEFAULT_A = 0.05
DEFAULT_B = 20.0
DEFAULT_EPS = 1e-6
DEFAULT_VAR_EPS = 1e-6


def check_kind_and_reduction(kind, reduction) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_hyperparameters(kind, a, b, eps, var_eps, ignore_index, reduction) -> None:
    check_kind_and_reduction(kind, reduction)
    for name, value in (("a", a), ("b", b), ("eps", eps), ("var_eps", var_eps)):
        check_finite(name, value)
    check_int64(ignore_index, "ignore_index")
    if kind == "z" and a <= 0:
        raise ValueError(f"a must be > 0 for the Z-loss, got {a}")
    if kind == "z" and var_eps < 0:
        raise ValueError(f"var_eps must be >= 0, got {var_eps}")
    if kind == "spherical" and eps <= 0:
        raise ValueError(f"eps must be > 0 for the log-spherical softmax, got {eps}")


# Class indices of any integer dtype whose values int64 holds: torch's F.cross_entropy (2.14) takes
# only int64 and uint8, but int32 (tokenizers, numpy) and the others mean the same indices, widened
# exactly. bool is no index type; uint64 could hold values that int64 cannot.
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32)


def check_target_dtype(target: torch.Tensor, raw: bool = False) -> None:
    """Class indices: any of TARGET_DTYPES (`raw`: the compiled ops, which take int64 only)."""
    if raw and target.dtype != torch.int64:
        raise TypeError(f"target must be int64 class indices, got {target.dtype}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must be integer class indices (int64, int32, int16, int8, uint8, uint16 or "
                        f"uint32), got {target.dtype}")


def class_indices(target: torch.Tensor) -> torch.Tensor:
    """target as the int64 indices the compiled ops read (a copy of N integers when narrower)."""
    return target if target.dtype == torch.int64 else target.long()


def check_logits_arguments(logits, target, kind, a, b, eps, var_eps, ignore_index, reduction) -> None:
    """`spherical_loss`'s arguments: logits (N, D, d1, ...) and target (N, d1, ...)."""
    check_tensor(logits, "logits")
    check_tensor(target, "target")
    check_hyperparameters(kind, a, b, eps, var_eps, ignore_index, reduction)
    check_float_tensor(logits, "logits")
    check_target_dtype(target)
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


def check_linear_arguments(input, linear_weight, target, linear_bias, raw: bool = False) -> None:
    """The fused linear op's tensors, with torch's `F.linear_cross_entropy` argument names (`raw`:
    as the compiled op checks them: int64 target)."""
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        check_tensor(t, name)
    if linear_bias is not None and not isinstance(linear_bias, torch.Tensor):
        raise TypeError(f"linear_bias must be a torch.Tensor or None, got {type(linear_bias).__name__}")
    check_float_tensor(linear_weight, "linear_weight")
    if linear_weight.dim() != 2 or linear_weight.shape[0] == 0:
        raise ValueError(f"linear_weight must have shape (D, d) with D >= 1, got {tuple(linear_weight.shape)}")
    if input.dtype != linear_weight.dtype:
        # As F.linear outside autocast: mixed dtypes raise (inside autocast both are cast first).
        raise TypeError(f"input must have linear_weight's dtype {linear_weight.dtype}, got {input.dtype} "
                        f"(cast one of them, or call under torch.autocast)")
    if input.dim() < 1 or input.shape[-1] != linear_weight.shape[1]:
        raise ValueError(f"input must have shape (..., {linear_weight.shape[1]}) for linear_weight of shape "
                         f"{tuple(linear_weight.shape)}, got {tuple(input.shape)}")
    check_target_dtype(target, raw)
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if linear_bias is not None:
        if tuple(linear_bias.shape) != (linear_weight.shape[0],):
            raise ValueError(f"linear_bias must have shape ({linear_weight.shape[0]},), got "
                             f"{tuple(linear_bias.shape)}")
        if linear_bias.dtype != linear_weight.dtype:
            raise TypeError(f"linear_bias must have linear_weight's dtype {linear_weight.dtype}, got "
                            f"{linear_bias.dtype}")
    for name, t in (("input", input), ("target", target), ("linear_bias", linear_bias)):
        if t is not None and t.device != linear_weight.device:
            raise ValueError(f"{name} is on {t.device} but linear_weight is on {linear_weight.device}")


# -- the raw ops' checks (what csrc/spherical/*.cpp checks), for the fake kernels ------------------

def check_raw_logits(logits, target) -> None:
    """`torch.ops.fusedtrain.spherical_loss` / its backward: 2-D logits, (N,) int64 target."""
    check_float_tensor(logits, "logits", 2)
    check_target_dtype(target, raw=True)
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class (D >= 1), got shape {tuple(logits.shape)}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must have shape ({logits.shape[0]},) for logits of shape "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")


def check_grad_loss(grad_loss, n: int) -> None:
    """The upstream gradient of a loss over n rows: a scalar, or (n,) for reduction='none'."""
    if not (grad_loss.numel() == 1 or (grad_loss.dim() == 1 and grad_loss.shape[0] == n)):
        raise ValueError(f"grad_loss must be a scalar or have shape ({n},), got {tuple(grad_loss.shape)}")


def check_saved(t, name: str, shape: tuple, dtype: torch.dtype) -> None:
    """A tensor the forward saved for backward (coefficients, statistics): its shape and dtype."""
    check_tensor(t, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} (the accumulate type), got {t.dtype}")


def check_raw_linear(input, linear_weight, linear_bias, target) -> None:
    """`torch.ops.fusedtrain.linear_spherical_loss` and its backward: input 2-D (N, d)."""
    check_linear_arguments(input, linear_weight, target, linear_bias, raw=True)
    if input.dim() != 2:
        raise ValueError(f"input must be 2-D (N, d), got shape {tuple(input.shape)}")
