"""Fuzz cases: double backward, stale caches, index lists, optimizer state and error messages."""
from __future__ import annotations

import math


import torch

import fusedtrain
from fusedtrain import mining as fm
from fusedtrain import sae as S

from framework import Raises, Returns, case
from inputs import sparse

# ---------------------------------------------------------------------------------------------
# Double backward: refused (the kernels' gradients carry no graph), never silently wrong.

DOUBLE = "double backward"


@case("double_backward/linear_spherical_loss", Raises((NotImplementedError,), DOUBLE))
def _dd_linear():
    h = torch.randn(5, 4, requires_grad=True)
    loss = fusedtrain.linear_spherical_loss(h, torch.randn(9, 4), torch.randint(0, 9, (5,)))
    return torch.autograd.grad(loss, h, create_graph=True)


@case("double_backward/sae_encode", Raises((NotImplementedError,), DOUBLE))
def _dd_encode():
    x = torch.randn(6, 5, requires_grad=True)
    acts = S.sae_encode(x, torch.randn(5, 12), torch.zeros(12), torch.zeros(5), "topk", 3)
    return torch.autograd.grad(acts.value.sum(), x, create_graph=True)


@case("double_backward/sparse_decode", Raises((NotImplementedError,), DOUBLE))
def _dd_decode():
    W = torch.randn(32, 16, requires_grad=True)
    return torch.autograd.grad(S.sparse_decode(sparse(), W).sum(), W, create_graph=True)


# ---------------------------------------------------------------------------------------------
# Stale caches: SphericalHead's cached statistics follow a `.data` write of its weight.

@case("stale_cache/SphericalHead_data_write", Returns())
def _head_data_write():
    head = fusedtrain.nn.SphericalHead(4, 9)
    h, t = torch.randn(5, 4), torch.randint(0, 9, (5,))
    head(h, t)
    head.weight.data.mul_(3)
    loss = head(h, t)
    truth = fusedtrain.linear_spherical_loss(h, head.weight.detach(), t, linear_bias=head.bias.detach())
    torch.testing.assert_close(loss, truth)
    return loss


@case("stale_cache/SphericalHead_data_assignment", Returns())
def _head_data_assign():
    head = fusedtrain.nn.SphericalHead(4, 9)
    h, t = torch.randn(5, 4), torch.randint(0, 9, (5,))
    head(h, t)
    head.weight.data = torch.randn(9, 4)
    loss = head(h, t)
    truth = fusedtrain.linear_spherical_loss(h, head.weight.detach(), t, linear_bias=head.bias.detach())
    torch.testing.assert_close(loss, truth)
    return loss


# ---------------------------------------------------------------------------------------------
# Index lists and masks handed to the PML-compatible classes.

def _ms_pairs(a1, p, a2, n):
    x = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    return fm.MultiSimilarityLoss()(x, labels, tuple(torch.tensor(v) for v in (a1, p, a2, n)))


@case("index_lists/MultiSimilarityLoss/out_of_range", Raises((ValueError, IndexError), "indices_tuple"))
def _pairs_out_of_range():
    return _ms_pairs([0, 2], [1, 9], [0, 1], [2, 3])


@case("index_lists/MultiSimilarityLoss/negative", Raises((ValueError, IndexError), "indices_tuple"))
def _pairs_negative():
    return _ms_pairs([0, 2], [1, -1], [0, 1], [2, 3])


@case("index_lists/CrossBatchMemory/int_enqueue_mask", Raises((TypeError, ValueError), "enqueue_mask"))
def _cbm_int_mask():
    cbm = fm.CrossBatchMemory(fm.MultiSimilarityLoss(), 4, memory_size=16)
    return cbm(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]), enqueue_mask=torch.tensor([0, 1, 0, 1, 1, 0]))


@case("index_lists/CrossBatchMemory/short_labels", Raises((ValueError,), "labels"))
def _cbm_short_labels():
    cbm = fm.CrossBatchMemory(fm.MultiSimilarityLoss(), 4, memory_size=16)
    return cbm(torch.randn(6, 4), torch.tensor([0, 0, 1]))


# ---------------------------------------------------------------------------------------------
# Optimizer state handed to FRUGAL.load_state_dict.

def _frugal_with_state(change):
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = fusedtrain.optim.FRUGAL([p], lr=0.1, seed=0)
    p.grad = torch.randn(8, 8)
    opt.step()
    state = opt.state_dict()
    change(state)
    opt.load_state_dict(state)
    p.grad = torch.randn(8, 8)
    opt.step()
    return p


for _key, _value in (("density", 7), ("proj", "bogus"), ("update_gap", 0), ("lr", -1.0), ("betas", (0.9,))):
    def _bad_group(key=_key, value=_value):
        return _frugal_with_state(lambda s: s["param_groups"][0].__setitem__(key, value))
    case(f"optimizer_state/FRUGAL/{_key}", Raises((ValueError,), _key.rstrip("s")))(_bad_group)


@case("optimizer_state/FRUGAL/adamw_state_dict", Raises((ValueError,), "FRUGAL|proj|density"))
def _adamw_state():
    p = torch.nn.Parameter(torch.randn(8, 8))
    adamw = torch.optim.AdamW([p])
    p.grad = torch.randn(8, 8)
    adamw.step()
    opt = fusedtrain.optim.FRUGAL([p], seed=0)
    opt.load_state_dict(adamw.state_dict())
    opt.step()
    return p


# ---------------------------------------------------------------------------------------------
# Clear messages: every error names the user's argument.

@case("messages/spherical_loss/ignore_index_2**64", Raises((ValueError, TypeError, OverflowError), "ignore_index"))
def _ignore_overflow():
    return fusedtrain.spherical_loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), ignore_index=2**64)


@case("messages/mutual_choice_route/budget_2**64", Raises((ValueError, TypeError, OverflowError), "budget"))
def _budget_overflow():
    return S.mutual_choice_route(torch.randn(4, 5), 2**64)


@case("messages/topk_route/k_2**64", Raises((ValueError, TypeError, OverflowError), r"\bk\b"))
def _k_overflow():
    return S.topk_route(torch.randn(4, 5), 2**64)


@case("messages/linear_spherical_loss/d_0", Returns())
def _linear_d0():
    """d = 0 is allowed (the logits are the bias): the loss equals the reference's."""
    h, W, b, t = torch.randn(5, 0), torch.randn(9, 0), torch.randn(9), torch.randint(0, 9, (5,))
    loss = fusedtrain.linear_spherical_loss(h, W, t, linear_bias=b)
    truth = fusedtrain.reference.linear_spherical.linear_spherical_loss(h.double(), W.double(), t,
                                                                        linear_bias=b.double())
    assert math.isclose(float(loss), float(truth), rel_tol=1e-5), (float(loss), float(truth))
    return loss


@case("messages/linear_spherical_loss/stats_shape", Raises((ValueError, TypeError), "stats"))
def _linear_stats_shape():
    return fusedtrain.linear_spherical_loss(torch.randn(5, 4), torch.randn(9, 4), torch.randint(0, 9, (5,)),
                                            stats=(torch.randn(3, 3), torch.randn(3)))


@case("messages/linear_spherical_loss/stats_type", Raises((ValueError, TypeError), "stats"))
def _linear_stats_type():
    return fusedtrain.linear_spherical_loss(torch.randn(5, 4), torch.randn(9, 4), torch.randint(0, 9, (5,)),
                                            stats="gram")


@case("messages/SparseAutoencoder/input_width", Raises((ValueError,), r"\bx\b"))
def _sae_width():
    return S.SparseAutoencoder(8, 32, k=4)(torch.randn(5, 7))


@case("messages/SparseAutoencoder/k_aux_negative", Raises((ValueError,), "k_aux"))
def _sae_k_aux():
    return S.SparseAutoencoder(8, 32, k=4, k_aux=-1)


@case("messages/SparseAutoencoder/from_saelens_missing_key", Raises((KeyError, ValueError), "W_dec"))
def _sae_saelens_key():
    return S.SparseAutoencoder.from_saelens_state_dict({"W_enc": torch.randn(8, 32), "b_enc": torch.zeros(32),
                                                        "b_dec": torch.zeros(8)})


@case("messages/FRUGAL/sparse_grad", Raises((RuntimeError, ValueError), "sparse"))
def _frugal_sparse():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = fusedtrain.optim.FRUGAL([p], seed=0)
    p.grad = torch.randn(8, 8).to_sparse()
    opt.step()
    return p


@case("messages/FRUGAL/unknown_keyword", Raises((TypeError,), r"^(?!.*(FRUGALBase|FRUGALReference)).*momentum"))
def _frugal_kwarg():
    return fusedtrain.optim.FRUGAL([torch.nn.Parameter(torch.randn(4, 4))], momentum=0.9)


