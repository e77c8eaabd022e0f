"""Fuzz cases: NaN/inf and huge values in, the right value or NaN/inf out; the routing cutoffs' edges."""
from __future__ import annotations

import math

import torch

import fusedtrain
from fusedtrain import sae as S

from framework import NonFinite, Returns, case
from inputs import INF, NAN, sparse, z_loss_fp64

# ---------------------------------------------------------------------------------------------
# Non-finite and huge values: NaN/inf in gives NaN/inf out; a huge finite input gives the right
# value or inf/NaN, never a wrong finite value.

for _kind in ("z", "spherical", "taylor", "mse"):
    for _bad in ("nan", "inf", "-inf"):
        def _spherical_nonfinite(kind=_kind, bad=_bad):
            logits = torch.randn(3, 6, requires_grad=True)
            with torch.no_grad():
                poisoned = logits.clone()
                poisoned[1, 2] = float(bad)
            poisoned.requires_grad_()
            loss = fusedtrain.spherical_loss(poisoned, torch.tensor([0, 1, 2]), kind, reduction="none")
            loss.sum().backward()
            return loss[1], poisoned.grad[1]
        case(f"nonfinite/spherical_loss/{_kind}_{_bad}", NonFinite())(_spherical_nonfinite)

for _big in (1e20, 1e30):
    def _z_huge(big=_big):
        row = torch.randn(64)
        row[5] = big
        loss = fusedtrain.spherical_loss(row[None].float(), torch.tensor([3]), "z")
        truth = z_loss_fp64(row, 3)
        assert not math.isfinite(float(loss)) or math.isclose(float(loss), truth, rel_tol=1e-3), (float(loss), truth)
        return torch.zeros(())
    case(f"huge/spherical_loss/z_{_big:g}", Returns())(_z_huge)


@case("nonfinite/linear_spherical_loss/inf_weight", NonFinite())
def _linear_inf_weight():
    W = torch.randn(9, 4)
    W[2, 1] = INF
    return fusedtrain.linear_spherical_loss(torch.randn(5, 4), W, torch.randint(0, 9, (5,)))


@case("nonfinite/linear_spherical_loss/nan_stats", NonFinite())
def _linear_nan_stats():
    W = torch.randn(9, 4)
    gram, colsum = fusedtrain.linear_spherical_stats(W)
    gram = gram.clone()
    gram[0, 0] = NAN
    return fusedtrain.linear_spherical_loss(torch.randn(5, 4), W, torch.randint(0, 9, (5,)),
                                            stats=(gram, colsum))


@case("huge/linear_spherical_loss/weight_1e30", Returns())
def _linear_huge_weight():
    W, h, t = torch.randn(9, 4), torch.randn(5, 4), torch.randint(0, 9, (5,))
    W[2, 1] = 1e30
    loss = fusedtrain.linear_spherical_loss(h, W, t)
    truth = float(fusedtrain.reference.linear_spherical.linear_spherical_loss(h.double(), W.double(), t))
    assert not math.isfinite(float(loss)) or math.isclose(float(loss), truth, rel_tol=1e-3), (float(loss), truth)
    return torch.zeros(())


for _bad in ("nan", "inf"):
    def _ms_nonfinite(bad=_bad):
        x = torch.randn(8, 4)
        x[3, 1] = float(bad)
        return fusedtrain.multi_similarity_loss(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))

    def _tcm_nonfinite(bad=_bad):
        x = torch.randn(8, 4)
        x[3, 1] = float(bad)
        return fusedtrain.tcm_loss(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))

    def _decode_nonfinite(bad=_bad):
        a = sparse()
        value = a.value.clone()
        value[0] = float(bad)
        return S.sparse_decode(S.SparseActs(a.row_ptr, a.feature, value), torch.randn(32, 16))

    def _frugal_nonfinite(bad=_bad):
        p = torch.nn.Parameter(torch.randn(8, 8))
        opt = fusedtrain.optim.FRUGAL([p], lr=0.1, density=0.25, seed=0)
        p.grad = torch.randn(8, 8)
        p.grad[:, :] = float(bad)  # every column: the state-free part sees it too
        opt.step()
        return p.detach()

    case(f"nonfinite/multi_similarity_loss/{_bad}", NonFinite())(_ms_nonfinite)
    case(f"nonfinite/tcm_loss/{_bad}", NonFinite())(_tcm_nonfinite)
    case(f"nonfinite/sparse_decode/{_bad}", NonFinite())(_decode_nonfinite)
    case(f"nonfinite/FRUGAL/{_bad}_grad", NonFinite())(_frugal_nonfinite)


@case("nonfinite/FRUGAL/nan_grad_state_free_part", NonFinite())
def _frugal_nan_signsgd():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = fusedtrain.optim.FRUGAL([p], lr=0.1, density=0.0, seed=0)  # all of it on signSGD
    p.grad = torch.randn(8, 8)
    p.grad[2, 3] = NAN
    opt.step()
    return p.detach()


# ---------------------------------------------------------------------------------------------
# One semantics on every device: the routing cutoffs at their edges equal the reference's.

def _cutoff_matches_reference(pre, routing, param):
    from fusedtrain.sae.routing import reference_cutoff, route
    _, cutoff = route(pre, routing, param)
    expected = reference_cutoff(pre, routing, param)
    torch.testing.assert_close(cutoff, expected.to(cutoff.dtype), rtol=0, atol=0)
    return cutoff


@case("edges/mutual_choice/exactly_budget_positives", Returns())
def _mc_exact():
    return _cutoff_matches_reference(torch.tensor([[1.0, -1.0, 2.0], [0.5, -3.0, -1.0]]), "mutual_choice", 3)


@case("edges/feature_choice/exactly_m_positives", Returns())
def _fc_exact():
    return _cutoff_matches_reference(torch.tensor([[1.0, -1.0], [0.5, 2.0], [-2.0, -1.0]]), "feature_choice", 2)
