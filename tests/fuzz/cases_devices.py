"""Fuzz cases: CPU tensors mixed with meta ones, and meta tensors through the public API."""
from __future__ import annotations


import torch

import fusedtrain
from fusedtrain import sae as S

from framework import Raises, Returns, case
from inputs import META, OPS, sparse

# ---------------------------------------------------------------------------------------------
# Device mix: a CPU tensor with a meta one must raise as the CPU path does, never return the fake
# kernel's uninitialized memory. Public ops on meta tensors answer with shapes (fake kernels).

DEVICE_MIX = "device|meta|cpu"


@case("device_mix/spherical_loss", Raises((RuntimeError, ValueError), DEVICE_MIX))
def _mix_spherical():
    return OPS.spherical_loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long, device=META), "z", 0.05, 20.0,
                              1e-6, 1e-6, -100, "mean", False, True)


@case("device_mix/linear_spherical_loss", Raises((RuntimeError, ValueError), DEVICE_MIX))
def _mix_linear():
    W = torch.randn(7, 3)
    gram, colsum = OPS._linear_spherical_gram(W, None)
    return OPS.linear_spherical_loss(torch.randn(4, 3, device=META), W, None, torch.zeros(4, dtype=torch.long),
                                     gram, colsum, "z", 0.05, 20.0, 1e-6, 1e-6, -100, "mean", True)


@case("device_mix/multi_similarity_loss", Raises((RuntimeError, ValueError), DEVICE_MIX))
def _mix_ms():
    return OPS.multi_similarity_loss(torch.randn(6, 4), torch.zeros(6, dtype=torch.long, device=META), None, None,
                                     None, 2.0, 50.0, 0.5, 0.1, True, False, False)


@case("device_mix/tcm_loss", Raises((RuntimeError, ValueError), DEVICE_MIX))
def _mix_tcm():
    return OPS.tcm_loss(torch.randn(6, 4, device=META), torch.zeros(6, dtype=torch.long), None, None,
                        1.0, 1.0, 0.9, 0.5)


@case("device_mix/sae_gather_rows", Raises((RuntimeError, ValueError), DEVICE_MIX))
def _mix_gather():
    a = sparse()
    return OPS.sae_gather_rows(a.row_ptr, a.feature, a.value, torch.randn(32, 16, device=META), None)


@case("device_mix/_scale_grad_", Raises((RuntimeError, ValueError), DEVICE_MIX))
def _mix_scale():
    grad = torch.randn(4, 5)
    OPS._scale_grad_(grad, torch.ones((), device=META))
    return grad


@case("device_mix/frugal_step_raw", Raises((RuntimeError, ValueError), DEVICE_MIX))
def _mix_frugal_raw():
    p = torch.randn(4, 6)
    e = torch.empty(0)
    OPS.frugal_step_([p], [torch.randn(4, 6, device=META)], [torch.zeros(4, 6)], [torch.zeros(4, 6)],
                     [torch.empty(0, dtype=torch.int32)], [e], [e], [0], [1], 0.1, 0.9, 0.99, 1e-8, 0.0, "signsgd", 1.0)
    return p


@case("device_mix/frugal_step_public", Raises((RuntimeError, ValueError), DEVICE_MIX))
def _mix_frugal_public():
    p = torch.randn(4, 6)
    fusedtrain.frugal_step_([p], [torch.randn(4, 6, device=META)], [torch.zeros(4, 6)], [torch.zeros(4, 6)],
                            [torch.empty(0, dtype=torch.int32)], [0], [1], lr=0.1, beta1=0.9, beta2=0.99,
                            eps=1e-8, weight_decay=0.0)
    return p


def _meta_shape(fn, shape):
    out = fn()
    out = out[0] if isinstance(out, tuple) else out
    assert out.device.type == "meta" and tuple(out.shape) == shape, (out.device, out.shape)
    return out


@case("meta/spherical_loss", Returns())
def _meta_spherical():
    return _meta_shape(lambda: fusedtrain.spherical_loss(torch.randn(4, 5, device=META),
                                                         torch.zeros(4, dtype=torch.long, device=META),
                                                         reduction="none"), (4,))


@case("meta/multi_similarity_loss", Returns())
def _meta_ms():
    return _meta_shape(lambda: fusedtrain.multi_similarity_loss(torch.randn(6, 4, device=META),
                                                                torch.zeros(6, dtype=torch.long, device=META)), ())


@case("meta/sparse_decode", Returns())
def _meta_decode():
    acts = S.SparseActs(torch.zeros(9, dtype=torch.long, device=META), torch.zeros(24, dtype=torch.long, device=META),
                        torch.randn(24, device=META))
    return _meta_shape(lambda: S.sparse_decode(acts, torch.randn(32, 16, device=META), check_indices=False), (8, 16))


