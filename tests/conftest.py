"""Shared fixtures: devices (CUDA ones marked `cuda` and skipped without a GPU), fresh seeds."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

from utils import HAS_CUDA, kernels_built

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


@pytest.fixture
def needs_kernels(device, request):
    """Skips unless a compiled kernel serves the test module's KERNEL_OP (default spherical_loss)."""
    op = getattr(request.module, "KERNEL_OP", "spherical_loss")
    if not kernels_built(device, op):
        pytest.skip(f"no compiled {device} kernel for {op} in this build")


@pytest.fixture(params=[None, 97], ids=["one_tile", "small_tiles"])
def tiles(request):
    """Mining ops: default tiles, or tiles of 97 elements (one row a tile for M > 48), so that row
    chunk edges fall everywhere."""
    if request.param is None or not hasattr(torch.ops.fusedtrain, "_mining_tile_elements"):
        yield
        return
    previous = torch.ops.fusedtrain._mining_tile_elements(request.param)
    try:
        yield
    finally:
        torch.ops.fusedtrain._mining_tile_elements(previous)
