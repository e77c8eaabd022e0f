"""Which compiled backends are present, and the one place that decides kernel vs reference.

`fusedtrain._C` registers the `torch.ops.fusedtrain.*` schemas and the kernels it was built with. When
it is missing (a source checkout that was never built) every op runs its pure-PyTorch reference, and
one warning (for the whole process, not one per op) says so. When it is present but has no kernel for
a device (a CPU-only build given CUDA tensors), the op also runs the reference, with one warning per
device for a build without any kernel for it, else one per (op, device).
"""
from __future__ import annotations

import warnings

import torch

_EXTENSION_ERROR: str | None = None
try:
    from .. import _C  # noqa: F401  (importing it registers the ops)
except ImportError as exc:  # no build: references only
    _EXTENSION_ERROR = ("fusedtrain._C is not built" if isinstance(exc, ModuleNotFoundError)
                        or "cannot import name '_C'" in str(exc) else str(exc))

# What was warned about: ("*", "*") for a missing extension, ("*", device) for a device without any
# kernel in this build, (op, device) for one op missing on a device the build otherwise serves.
_warned: set[tuple[str, str]] = set()


def has_extension() -> bool:
    """True when the compiled `fusedtrain._C` was imported."""
    return _EXTENSION_ERROR is None


def extension_error() -> str | None:
    """Why `_C` could not be imported (None when it was)."""
    return _EXTENSION_ERROR


def _query_backends(op: str) -> list[str]:
    if not has_extension():
        return []
    name = f"fusedtrain::{op}"
    try:
        return [key for key in ("CPU", "CUDA")
                if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)]
    except RuntimeError:  # op not registered by this build
        return []


# op -> dispatch keys with a kernel. Filled by `add_op` when a family declares its ops (at import,
# before any tracing), so that torch.compile sees `use_kernel` as a plain dict lookup.
_BACKENDS: dict[str, list[str]] = {}
# Ops whose fake (meta) kernel is registered: on meta tensors they answer with shapes, no data.
_FAKE: set[str] = set()


def add_op(op: str, *, fake: bool = False) -> None:
    """Record which backends serve `fusedtrain::<op>` and whether it has a fake kernel (called by
    `_core.registry.register_op`)."""
    _BACKENDS[op] = _query_backends(op)
    if fake:
        _FAKE.add(op)


def ops() -> list[str]:
    """Every op the families declared, in declaration order."""
    return list(_BACKENDS)


def public_ops() -> list[str]:
    """The ops behind the public API (private ones, `_<name>`, serve them): what `info` lists."""
    return [op for op in _BACKENDS if not op.startswith("_")]


def backends_for(op: str) -> list[str]:
    """Dispatch keys ("CPU", "CUDA") that have a compiled kernel for `fusedtrain::<op>`."""
    try:
        return _BACKENDS[op]
    except KeyError:
        raise KeyError(f"fusedtrain has no op {op!r}; known ops: {', '.join(_BACKENDS)}") from None


def use_kernel(op: str, device: torch.device) -> bool:
    """Whether `op` on `device` runs a compiled kernel; when it cannot, warns once per cause (see
    `_warning_key`): one warning for a build-less checkout, not one per op.

    Meta tensors go to the op too, whose fake kernel checks the arguments as the real kernels do and
    answers with shapes (the references read values, which meta tensors do not have)."""
    if device.type == "meta" and op in _FAKE:
        return True
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if dispatch_key is not None and dispatch_key in backends_for(op):
        return True
    key = _warning_key(op, device.type)
    if key not in _warned:
        _warned.add(key)
        if not has_extension():
            why = (f"no compiled kernels ({_EXTENSION_ERROR}): every fusedtrain op runs its pure-PyTorch "
                   "reference, which is correct but slow")
        elif key[0] == "*":
            why = (f"this build of fusedtrain has no {device.type} kernels: every op on {device.type} "
                   "runs its pure-PyTorch reference, which is correct but slow")
        else:
            why = (f"this build of fusedtrain has no {device.type} kernel for {op}: using its pure-PyTorch "
                   f"reference on {device.type}, which is correct but slow")
        warnings.warn(f"{why}. Build with `pip install --no-build-isolation -e .`.",
                      RuntimeWarning, stacklevel=3)
    return False


def _warning_key(op: str, device_type: str) -> tuple[str, str]:
    """One warning per cause: the extension missing, a device missing, one op missing on a device."""
    if not has_extension():
        return ("*", "*")
    if not any(device_type.upper() in keys for keys in _BACKENDS.values()):
        return ("*", device_type)
    return (op, device_type)
