"""The one way a family attaches Python-side behaviour to its compiled ops.

`register_op("name", fake=..., backward=..., setup_context=...)` is called once per op at import of
the family's `registration.py`. It records which backends serve the op (the table `backend.use_kernel`
reads) and, when `_C` defines the op, registers its fake (meta) kernel for torch.compile / opcheck and
its autograd formula. The backward is wrapped so that `create_graph=True` raises instead of returning
a gradient without a graph of its own, which would make every second-order term silently zero.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

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
    (create_graph=True). Tracing runs backward with grad mode on, so traced calls pass through.
    `name` is what the user called (e.g. "fusedtrain.sae.sparse_decode")."""
    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        tensors = [g for g in grads if isinstance(g, torch.Tensor)]
        if tensors and torch.is_grad_enabled() and not is_traced(*tensors):
            raise NotImplementedError(f"{name} does not support double backward (create_graph=True); "
                                      f"use {reference}")
        return backward(ctx, *grads)
    return wrapped


def register_op(name: str, *, fake: Callable, backward: Callable | None = None,
                setup_context: Callable | None = None, api: str | None = None,
                reference: str = "fusedtrain.reference") -> None:
    """Declare `fusedtrain::<name>` and, when the build defines it, attach its fake kernel and autograd.

    api: the public function(s) that run the op, named in errors (default `fusedtrain.<name>`);
    reference: what to use instead for double backward.
    """
    backend.add_op(name)
    if not op_defined(name):
        return
    qualified = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qualified)(fake)
    if backward is not None:
        guarded = refuse_double_backward(api or f"fusedtrain.{name}", reference, backward)
        torch.library.register_autograd(qualified, guarded, setup_context=setup_context)
