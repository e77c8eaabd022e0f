"""The op-registration helper (`fusedtrain._core.registry`): every compiled op with autograd refuses
double backward (its gradient carries no graph, so create_graph=True would otherwise return silently
zero second-order terms), and every op the families declare is in the backend table."""
from __future__ import annotations

import pytest
import torch

import fusedtrain
from fusedtrain import sae
from fusedtrain._core import backend

from utils import kernels_built


def _linear(device):
    h = torch.randn(6, 5, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, device=device, dtype=torch.float64)
    t = torch.randint(0, 9, (6,), device=device)
    return "linear_spherical_loss", h, fusedtrain.linear_spherical_loss(h, w, t)


def _encode(device):
    x = torch.randn(6, 5, device=device, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 12, device=device, dtype=torch.float64)
    acts = sae.sae_encode(x, W, torch.zeros(12, device=device, dtype=torch.float64),
                          torch.zeros(5, device=device, dtype=torch.float64), "topk", 3)
    return "sae_encode", x, acts.value.sum()


def _route(device):
    pre = torch.randn(6, 12, device=device, dtype=torch.float64, requires_grad=True)
    return "sae_route", pre, sae.topk_route(pre, 3).value.sum()


def _topk_dense(device):
    pre = torch.randn(6, 12, device=device, dtype=torch.float64, requires_grad=True)
    return "sae_topk_select", pre, sae.topk_route(pre, 3, dense=True).top_acts.sum()


def _decode(device):
    acts = sae.topk_route(torch.randn(6, 12, device=device, dtype=torch.float64), 3)
    W = torch.randn(12, 5, device=device, dtype=torch.float64, requires_grad=True)
    return "sae_gather_rows", W, sae.sparse_decode(acts, W).sum()


@pytest.mark.parametrize("case", [_linear, _encode, _route, _topk_dense, _decode],
                         ids=lambda f: f.__name__.strip("_"))
def test_double_backward_refused(device, case):
    op, x, out = case(device)
    if not kernels_built(device, op):
        pytest.skip(f"no compiled {device} kernel for {op} (the reference supports double backward)")
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out, x, create_graph=True)
    # A first-order backward of the same graph is unaffected.
    assert torch.autograd.grad(out, x)[0].shape == x.shape


def test_every_declared_op_is_in_the_backend_table():
    ops = backend.ops()
    assert {"spherical_loss", "linear_spherical_loss", "multi_similarity_loss", "tcm_loss", "mine_pairs",
            "batch_hard_mine", "sae_route", "sae_encode", "sae_topk_select", "sae_gather_rows",
            "frugal_step_"} <= set(ops)
    for op in ops:
        assert set(backend.backends_for(op)) <= {"CPU", "CUDA"}
    with pytest.raises(KeyError, match="no op 'not_an_op'"):
        backend.backends_for("not_an_op")
