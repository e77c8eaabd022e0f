"""The one way a family attaches Python-side behaviour to its compiled ops.

`register_op("name", fake=..., backward=..., setup_context=...)` is called once per op at import of
the family's `registration.py`. It records which backends serve the op (the table `backend.use_kernel`
reads) and, when `_C` defines the op, registers its fake (meta) kernel for torch.compile / opcheck and
its autograd formula. The fake kernel is what answers for meta tensors, and for any mix of devices
that includes meta (the dispatcher picks it over the CPU kernel): so before it runs, every tensor
argument is checked to be on one device, as the compiled ops check; each family's fake kernel checks
the rest (kinds, shapes, dtypes) with the family's checks of the raw op. The backward is wrapped so
that `create_graph=True` raises instead of returning a gradient without a graph of its own, which
would make every second-order term silently zero, and so that it runs with autocast off (a backward
called inside an autocast region would otherwise recast its matmuls: torch's own backward formulas
run in the forward's dtypes). Each op also gets its autocast policy (`_core.autocast`).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

from . import autocast as _autocast
from . import backend

NAMESPACE = "fusedtrain"


def op_defined(name: str) -> bool:
    """Whether this build's `_C` registered the schema `fusedtrain::<name>`."""
    return backend.has_extension() and hasattr(getattr(torch.ops, NAMESPACE), name)


def is_traced(*tensors) -> bool:
    """Whether we run under a tracer (torch.compile, opcheck's fake/functional tensors)."""
    return torch.compiler.is_compiling() or any(isinstance(t, torch.Tensor) and is_fake(t) for t in tensors)


def refuse_double_backward(name: str, reference: str, backward: Callable) -> Callable:
    """`backward`, raising NotImplementedError when autograd records a graph through it
    (create_graph=True), and run with autocast off. Tracing runs backward with grad mode on, so
    traced calls pass through. `name` is what the user called (e.g. "fusedtrain.sae.sparse_decode")."""
    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        tensors = [g for g in grads if isinstance(g, torch.Tensor)]
        if tensors and torch.is_grad_enabled() and not is_traced(*tensors):
            raise NotImplementedError(f"{name} does not support double backward (create_graph=True); "
                                      f"use {reference}")
        if _autocast.autocast_dtype("cpu") is None and _autocast.autocast_dtype("cuda") is None:
            return backward(ctx, *grads)
        with _autocast.suspended("cpu"), _autocast.suspended("cuda"):
            return backward(ctx, *grads)
    return wrapped


def _argument_names(name: str) -> list[str]:
    return [a.name for a in getattr(getattr(torch.ops, NAMESPACE), name).default._schema.arguments]


def check_one_device(name: str, arg_names: list[str], args, kwargs) -> None:
    """Every tensor argument of `fusedtrain::<name>` (tensors in lists included) on one device; the
    error names the first argument off that device and the first argument, as the compiled ops do."""
    first = None
    for arg, value in list(zip(arg_names, args)) + list(kwargs.items()):
        items = ([(f"{arg}[{i}]", t) for i, t in enumerate(value)] if isinstance(value, (list, tuple))
                 else [(arg, value)])
        for label, t in items:
            if not isinstance(t, torch.Tensor):
                continue
            if first is None:
                first = (label, t.device)
            elif t.device != first[1]:
                raise ValueError(f"{label} is on {t.device} but {first[0]} is on {first[1]} "
                                 f"(fusedtrain.{name} needs every tensor on one device)")


def checked_fake(name: str, fake: Callable) -> Callable:
    """`fake`, after the one-device check of its tensor arguments."""
    arg_names = _argument_names(name)

    @functools.wraps(fake)
    def wrapped(*args, **kwargs):
        check_one_device(name, arg_names, args, kwargs)
        return fake(*args, **kwargs)
    return wrapped


def register_op(name: str, *, fake: Callable, backward: Callable | None = None,
                setup_context: Callable | None = None, api: str | None = None,
                reference: str = "fusedtrain.reference", autocast: str = _autocast.NATIVE) -> None:
    """Declare `fusedtrain::<name>` and, when the build defines it, attach its fake kernel and autograd.

    api: the public function(s) that run the op, named in errors (default `fusedtrain.<name>`);
    reference: what to use instead for double backward.
    autocast: the raw op's policy inside `torch.autocast` (`_core.autocast`: NATIVE runs it on the
      dtypes it is given with autocast excluded; FP32 first casts its float tensors to float32).
    """
    if not op_defined(name):
        backend.add_op(name)
        return
    qualified = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qualified)(checked_fake(name, fake))
    backend.add_op(name, fake=True)
    _autocast.register_raw(NAMESPACE, name, autocast)
    if backward is not None:
        guarded = refuse_double_backward(api or f"fusedtrain.{name}", reference, backward)
        torch.library.register_autograd(qualified, guarded, setup_context=setup_context)
