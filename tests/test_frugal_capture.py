"""FRUGAL under CUDA graph capture: refused, by the class before its bookkeeping moves and by the raw
op in its CUDA driver (docs/frugal.md). A captured step would replay its first call's host values."""
from __future__ import annotations

import copy

import pytest
import torch

import fusedtrain
from fusedtrain.optim import FRUGAL
from fusedtrain.reference import frugal as ref

from utils import HAS_CUDA, kernels_built

KERNEL_OP = "frugal_step_"
HYPER = dict(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1, free_lr_scale=0.7)


def make_params(device):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, device=device)) for shape in [(24, 40), (40, 24), (33,)]]


def test_step_refuses_cuda_graph_capture_before_moving_anything(monkeypatch):
    """Step counters, subspaces and the fused step's hyperparameters are host values: a captured step
    would replay one step forever. The refusal comes first, leaving the optimizer as it was (the
    capture is simulated here; the real one is the `cuda` test below)."""
    params = make_params("cpu")
    for p in params:
        p.grad = torch.randn_like(p)
    opt = FRUGAL(params, lr=1e-2, seed=0)
    opt.step()
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="FRUGAL.step cannot be captured in a CUDA graph"):
        opt.step()
    monkeypatch.undo()
    after = opt.state_dict()
    assert [s["step"] for s in after["state"].values()] == [s["step"] for s in before[0]["state"].values()]
    assert all(torch.equal(p, q) for p, q in zip(params, before[1]))
    opt.step()  # and it still steps afterwards


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_capture_is_refused():
    """The class and the raw op refuse a real capture with a RuntimeError naming it (the raw op would
    otherwise record a copy from a pinned buffer that is no longer its own)."""
    if not kernels_built("cuda", KERNEL_OP):
        pytest.skip("no CUDA kernel in this build")
    p = torch.nn.Parameter(torch.randn(64, 32, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = FRUGAL([p], lr=1e-2, seed=0)
    opt.step()
    idx = torch.tensor([0, 5], dtype=torch.int32, device="cuda")
    m, v = torch.zeros(64, 2, device="cuda"), torch.zeros(64, 2, device="cuda")
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="FRUGAL.step cannot be captured in a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    with pytest.raises(RuntimeError, match="frugal_step_ cannot be captured in a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            fusedtrain.frugal_step_([p.detach()], [p.grad], [m], [v], [idx], [ref.COLUMNS], [1], **HYPER)
    opt.step()
    torch.cuda.synchronize()
    assert torch.isfinite(p).all()
