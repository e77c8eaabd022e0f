"""Shared fixtures: devices (CUDA ones marked `cuda` and skipped without a GPU), fresh seeds."""
from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

import fusedtrain

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # A different seed per test (stable across runs): fresh inputs everywhere, reproducible failures.
    # FUSEDTRAIN_TEST_SEED=k draws another set (to look for tolerances that only pass by luck).
    salt = os.environ.get("FUSEDTRAIN_TEST_SEED", "")
    torch.manual_seed(zlib.crc32((salt + request.node.nodeid).encode()))


def kernels_built(device: str, op: str = "spherical_loss") -> bool:
    """Whether a compiled kernel serves `op` on `device` (else the reference runs)."""
    key = "CUDA" if device == "cuda" else "CPU"
    return key in fusedtrain._core.backend.backends_for(op)


@pytest.fixture
def needs_kernels(device, request):
    """Skips unless a compiled kernel serves the test module's KERNEL_OP (default spherical_loss)."""
    op = getattr(request.module, "KERNEL_OP", "spherical_loss")
    if not kernels_built(device, op):
        pytest.skip(f"no compiled {device} kernel for {op} in this build")


def cpu_peak_extra_mib(fn) -> float:
    """Peak resident-set growth of the process during fn(), in MiB: the benchmark harness's
    measurement (benchmarks/harness.py), so tests and benchmarks report the same quantity."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        from benchmarks import harness
    finally:
        sys.path.pop(0)
    return harness._cpu_peak_extra_mib(fn)
