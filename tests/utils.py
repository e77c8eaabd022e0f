"""Plain helpers shared by the test modules (fixtures live in conftest.py).

Imported as `from utils import ...`: pytest puts tests/ on sys.path (rootdir conftest, no
__init__.py), and so does running a script in tests/ (sanitizer_cases.py).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fusedtrain

HAS_CUDA = torch.cuda.is_available()


def kernels_built(device: str, op: str = "spherical_loss") -> bool:
    """Whether a compiled kernel serves `op` on `device` (else the reference runs)."""
    key = "CUDA" if device == "cuda" else "CPU"
    return key in fusedtrain._core.backend.backends_for(op)


def dtype_tolerances(fp32: float, fp64: float = 1e-10) -> list:
    """(dtype, tol) parameters, ids "fp64" and "fp32", for tests against a float64 oracle."""
    return [pytest.param(torch.float64, fp64, id="fp64"), pytest.param(torch.float32, fp32, id="fp32")]


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    """‖a − b‖ / max(‖b‖, floor) in float64; 0 for empty tensors. A floor of 1 turns it into an
    absolute error for results that cancel to ~0 (one class: the spherical and Taylor losses are
    log(x) − log(x) = 0)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item() if b.numel() else 0.0


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b| in float64 on the CPU (elementwise, not in norm); 0 for empty tensors."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


@contextlib.contextmanager
def nan_filled_allocations():
    """Every at::empty inside (the kernels' outputs included) comes back filled with NaN.

    torch fills uninitialized memory when deterministic algorithms are on (warn_only: this is about
    the fill, not about refusing ops that lack a deterministic kernel). An output element the
    kernel forgets to write then stays NaN instead of happening to be a harmless 0.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def assert_compiles_like_eager(fn, inputs, *args, backend: str = "aot_eager") -> list[torch.Tensor]:
    """torch.compile(fn, fullgraph=True) gives eager fn's scalar result and input gradients.

    fn(*inputs, *args): each run gets its own leaf copies of `inputs`. Returns the compiled run's
    gradients (for further checks against a reference).
    """
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    ours = [x.detach().clone().requires_grad_() for x in inputs]
    eager = [x.detach().clone().requires_grad_() for x in inputs]
    out, expected = compiled(*ours, *args), fn(*eager, *args)
    out.backward()
    expected.backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a.grad, b.grad)
    return [x.grad for x in ours]
