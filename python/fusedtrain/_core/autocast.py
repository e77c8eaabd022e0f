"""What every op does inside `torch.autocast`: one policy table, applied at two levels.

torch gives each of its own ops an autocast policy: GEMM-like ops run in the autocast dtype
(`F.linear`, "lower precision"), ops whose accuracy needs it run in float32 (`cross_entropy`,
`cosine_similarity`), the rest run in their inputs' dtypes. Ours follow the same rules (each family's
doc says which op has which):

  LOWER   GEMM-like ops (the fused linear loss, the SAE encoder and decoder, linear_topk): the float
          tensor arguments named by the op are cast to the autocast dtype, as F.linear casts; the
          kernels then run their bf16/fp16 paths, which accumulate in fp32.
  FP32    the mining ops: float tensors cast to float32, as cosine_similarity's are.
  NATIVE  ops that already read low-precision input with fp32 arithmetic (spherical_loss over
          logits, the SAE routings, the optimizer step): nothing is cast, so a bf16 logits matrix
          is read as it is instead of through an fp32 copy.
A loss computed under autocast comes back as float32, as torch's float32-policy losses do: the loss
ops return their loss in the accumulate type (fp32 for fp32/bf16/fp16, fp64 for fp64) and `policy`
gives it the input's dtype outside autocast, keeps it inside (no round trip through bf16).
float64 tensors are never cast, as in torch.

The two levels: the public functions (`policy` decorator: they check arguments and may run the
pure-PyTorch reference, whose matmuls autocast would otherwise recast), and the raw
`torch.ops.fusedtrain.*` ops (`register_raw`, called by `_core.registry.register_op`: an Autocast
kernel that casts by the policy and runs the op with autocast excluded, so that the C++ drivers'
own at::mm calls are never recast behind the kernels' back).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

LOWER, FP32, NATIVE = "lower", "fp32", "native"
POLICIES = (LOWER, FP32, NATIVE)
DEVICE_TYPES = ("cpu", "cuda")  # the devices with kernels; both have autocast
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)  # never float64, as torch's autocast


def autocast_dtype(device) -> torch.dtype | None:
    """The autocast dtype when autocast is on for `device`'s type (a device or "cpu"/"cuda"), else None."""
    device_type = device if isinstance(device, str) else device.type
    if device_type not in DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def policy_dtype(policy: str, device) -> torch.dtype | None:
    """The dtype `policy` casts to on `device` now: None when autocast is off there or for NATIVE."""
    amp = autocast_dtype(device)
    if amp is None or policy == NATIVE:
        return None
    return amp if policy == LOWER else torch.float32


def cast(x, dtype: torch.dtype | None):
    """x with its fp16/bf16/fp32 tensors cast to `dtype` (None: unchanged); tuples (named ones, such as
    SparseActs, included) and lists are cast element by element, integer tensors are left alone."""
    if dtype is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.dtype in _CASTABLE and x.dtype != dtype else x
    if isinstance(x, tuple):
        items = [cast(v, dtype) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    if isinstance(x, list):
        return [cast(v, dtype) for v in x]
    return x


def widen(x):
    """A loss computed under autocast, as float32: fp16/bf16 tensors widened, others unchanged."""
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def suspended(device) -> torch.autocast:
    """Autocast off for `device`'s type, for the body of an op that has applied its policy."""
    return torch.autocast(device if isinstance(device, str) else device.type, enabled=False)


def policy(kind: str, *, device: str, cast_args: tuple[str, ...] = (), loss: bool = False) -> Callable:
    """Decorate a public op with its autocast policy. Outside autocast (on the device of argument
    `device`) the op runs as it is. Inside, the arguments named in `cast_args` are cast by `kind`
    (`cast`) and the op runs with autocast suspended. Tensor arguments not named (targets,
    thresholds, cached statistics) are never cast.
    loss: the op returns a loss tensor in the accumulate type (or in its inputs' dtype, from the
      reference); it is given the dtype of argument `device` outside autocast, as torch's losses
      have their input's dtype, and comes back as at least float32 inside (`widen`)."""
    if kind not in POLICIES:
        raise ValueError(f"kind must be one of {POLICIES}, got {kind!r}")

    def decorate(fn: Callable) -> Callable:
        names = list(inspect.signature(fn).parameters)
        position = {name: names.index(name) for name in (device,) + tuple(cast_args)}

        def argument(args, kwargs, name):
            return args[position[name]] if position[name] < len(args) else kwargs.get(name)

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            anchor = argument(args, kwargs, device)
            if not isinstance(anchor, torch.Tensor) or autocast_dtype(anchor.device) is None:
                out = fn(*args, **kwargs)  # (a non-tensor anchor: the op's own check names it)
                if loss and isinstance(out, torch.Tensor) and out.dtype != anchor.dtype:
                    out = out.to(anchor.dtype)
                return out
            dtype = policy_dtype(kind, anchor.device)
            args = list(args)
            # One cast per object: an argument passed twice (mining's `ref_emb is embeddings`, "the
            # batch itself") stays one object, so identity-based meanings survive the cast.
            casts: dict[int, object] = {}

            def cast_once(x):
                if id(x) not in casts:
                    casts[id(x)] = cast(x, dtype)
                return casts[id(x)]
            for name in cast_args:
                if position[name] < len(args):
                    args[position[name]] = cast_once(args[position[name]])
                elif name in kwargs:
                    kwargs[name] = cast_once(kwargs[name])
            with suspended(anchor.device):
                out = fn(*args, **kwargs)
            return widen(out) if loss else out
        return wrapped
    return decorate


# -- the raw ops ------------------------------------------------------------------------------------

_LIBRARY: torch.library.Library | None = None


def _library(namespace: str) -> torch.library.Library:
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library(namespace, "IMPL")
    return _LIBRARY


def register_raw(namespace: str, name: str, kind: str) -> None:
    """An Autocast kernel (CPU and CUDA) for `namespace::name`: floating tensor arguments cast by
    `kind` (LOWER casts every one of them, so only ops whose float arguments are all data may use
    it), then the op redispatched with that autocast key excluded."""
    if kind not in POLICIES:
        raise ValueError(f"kind must be one of {POLICIES}, got {kind!r}")
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type in DEVICE_TYPES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

        def kernel(_keyset, *args, _device_type=device_type, _excluded=excluded, **kwargs):
            dtype = policy_dtype(kind, _device_type) if kind != NATIVE else None
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                return op(*[cast(a, dtype) for a in args], **{k: cast(v, dtype) for k, v in kwargs.items()})

        _library(namespace).impl(name, kernel, key_name, with_keyset=True)
