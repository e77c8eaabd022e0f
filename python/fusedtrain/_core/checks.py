"""Argument checks shared by the families. Each error names the argument and what was expected, so a
user sees which input is wrong before anything reaches a kernel (the C++ ops check again)."""
from __future__ import annotations

import math

import torch

from .dtypes import FLOAT_DTYPES


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_tensor(t, name: str, dim: int | None = None) -> None:
    """A tensor of one of FLOAT_DTYPES, with `dim` dimensions when given."""
    check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_finite(name: str, value) -> float:
    """A finite real number (bool is not one); returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_int64(value, name: str) -> int:
    """An int (bool is not one) that fits in int64, as every op's int arguments must: a larger
    Python int would otherwise fail inside pybind/torch with a message that names no argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in int64 ([-2**63, 2**63 - 1]), got {value}")
    return value


def check_int(value, name: str, low: int, high: int | None = None) -> int:
    """An int (bool is not one) in [low, high] (or >= low) that fits in int64."""
    check_int64(value, name)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high if high is not None else '2**63 - 1'}], got {value}")
    return value


def check_same_device(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_same_dtype(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """Same dtype and device as `ref`."""
    check_same_dtype(t, ref, name, ref_name)
    check_same_device(t, ref, name, ref_name)
