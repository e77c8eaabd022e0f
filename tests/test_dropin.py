"""Drop-in conventions (issue 14): integer targets of any width, SphericalHead(h) as logits,
SparseAutoencoder on (..., d) activations and with threshold routing, FRUGAL with torch.optim.AdamW's
flags and default weight decay. Each is compared with what the replaced torch code does."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fusedtrain
from fusedtrain import sae
from fusedtrain.optim import FRUGAL

from utils import max_rel_err

NARROW_TARGETS = [torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32]


# -- targets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", NARROW_TARGETS, ids=str)
def test_integer_targets_of_any_width(device, dtype):
    logits = torch.randn(2, 9, 7, device=device, requires_grad=True)  # (N, D, d1), as F.cross_entropy
    t64 = torch.randint(0, 9, (2, 7), device=device)
    h, W = torch.randn(6, 8, device=device), torch.randn(9, 8, device=device)
    t_rows = torch.randint(0, 9, (6,), device=device)
    t_rows[0] = 3
    head = fusedtrain.nn.SphericalHead(8, 9, device=device)
    for reduction in ("mean", "none"):
        wide = fusedtrain.spherical_loss(logits, t64, reduction=reduction)
        assert torch.equal(fusedtrain.spherical_loss(logits, t64.to(dtype), reduction=reduction), wide)
    grads = [torch.autograd.grad(fusedtrain.spherical_loss(logits, t.to(d)), logits)[0]
             for t, d in ((t64, torch.int64), (t64, dtype))]
    assert torch.equal(*grads)
    assert torch.equal(fusedtrain.linear_spherical_loss(h, W, t_rows.to(dtype)),
                       fusedtrain.linear_spherical_loss(h, W, t_rows))
    assert torch.equal(head(h, t_rows.to(dtype)), head(h, t_rows))
    assert torch.equal(fusedtrain.nn.SphericalLoss()(logits, t64.to(dtype)), fusedtrain.spherical_loss(logits, t64))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint64, torch.float32], ids=str)
def test_non_index_targets_raise(device, dtype):
    logits = torch.randn(4, 5, device=device)
    target = torch.zeros(4, device=device, dtype=dtype)
    with pytest.raises(TypeError, match=f"target must be integer class indices.*got {dtype}"):
        fusedtrain.spherical_loss(logits, target)
    with pytest.raises(TypeError, match="target must be integer class indices"):
        fusedtrain.linear_spherical_loss(torch.randn(4, 3, device=device), torch.randn(5, 3, device=device), target)


def test_ignore_index_with_narrow_targets(device):
    logits = torch.randn(6, 4, device=device)
    target = torch.tensor([0, 1, -100, 3, -100, 2], dtype=torch.int32, device=device)
    loss = fusedtrain.spherical_loss(logits, target)
    assert torch.equal(loss, fusedtrain.spherical_loss(logits, target.long()))
    assert torch.isfinite(loss)


# -- SphericalHead without a target ------------------------------------------------------------------

def test_spherical_head_without_target_returns_logits(device):
    head = fusedtrain.nn.SphericalHead(8, 11, device=device)
    h = torch.randn(2, 3, 8, device=device)
    assert torch.equal(head(h), F.linear(h, head.weight, head.bias))
    assert torch.equal(head(h), head.logits(h))
    assert torch.equal(head(h, None), head.logits(h))


# -- SparseAutoencoder: (..., d) activations and threshold routing ----------------------------------

@pytest.mark.parametrize("routing", ["topk", "feature_choice", "mutual_choice"])
def test_sparse_autoencoder_takes_any_leading_shape(device, routing):
    model = sae.SparseAutoencoder(16, 64, routing, 4, device=device)
    x = torch.randn(2, 5, 16, device=device)
    twin = copy.deepcopy(model)
    out = model(x)
    flat = twin(x.reshape(10, 16))
    assert out.sae_out.shape == (2, 5, 16)
    assert torch.equal(out.sae_out.reshape(10, 16), flat.sae_out)
    for a, b in zip(out.latent_acts, flat.latent_acts):  # row b·T + t is token (b, t)
        assert torch.equal(a, b)
    assert torch.equal(out.fvu, flat.fvu)
    assert torch.equal(model.num_tokens_since_fired, twin.num_tokens_since_fired)
    assert torch.equal(model.threshold, twin.threshold)
    assert torch.equal(model.decode(model.encode(x)), out.sae_out.reshape(10, 16))
    one = model(x[0, 0])  # a single token (d,)
    assert one.sae_out.shape == (16,)


def test_sparse_autoencoder_threshold_routing(device):
    theta = torch.rand(64, device=device) * 0.2
    model = sae.SparseAutoencoder(16, 64, "threshold", theta=theta, device=device)
    x = torch.randn(3, 4, 16, device=device, requires_grad=True)
    out = model(x)
    expected = sae.sae_encode(x.reshape(-1, 16), model.W_enc, model.b_enc, model.b_dec, "threshold", theta=theta)
    for a, b in zip(out.latent_acts, expected):
        assert torch.equal(a, b)
    # Every kept entry passes its latent's threshold, every dropped positive one does not.
    pre = ((x.reshape(-1, 16) - model.b_dec) @ model.W_enc + model.b_enc).detach()
    kept = out.latent_acts.to_dense(64) != 0
    assert torch.equal(kept, (pre > theta) & (pre > 0))
    out.loss.backward()
    assert model.W_enc.grad.abs().sum() > 0 and x.grad.shape == x.shape
    model.eval()  # the same thresholds in eval
    for a, b in zip(model.encode(x.detach()), out.latent_acts):
        assert torch.equal(a, b)
    # A single theta for every latent; it lives in the state dict's `threshold`.
    glob = sae.SparseAutoencoder(16, 64, "threshold", theta=0.1, device=device)
    assert torch.equal(glob.threshold, torch.full((64,), 0.1, device=device))
    copy_ = sae.SparseAutoencoder(16, 64, "threshold", theta=0.0, device=device)
    copy_.load_state_dict(model.state_dict())
    assert torch.equal(copy_.threshold, theta)


def test_sparse_autoencoder_threshold_arguments():
    with pytest.raises(ValueError, match="theta .* must be given for routing='threshold'"):
        sae.SparseAutoencoder(8, 16, "threshold")
    with pytest.raises(ValueError, match="and only for it"):
        sae.SparseAutoencoder(8, 16, "topk", theta=0.1)
    with pytest.raises(ValueError, match=r"theta must have shape \(16,\)"):
        sae.SparseAutoencoder(8, 16, "threshold", theta=torch.zeros(3))
    with pytest.raises(ValueError, match="routing must be one of"):
        sae.SparseAutoencoder(8, 16, "jumprelu")
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d_in\)"):
        sae.SparseAutoencoder(8, 16, "topk", 4)(torch.randn(2, 3, 7))


# -- FRUGAL and torch.optim.AdamW's flags --------------------------------------------------------------

def _train(params, opt, steps=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.device)
        opt.step()


def _pair(device):
    weights = [torch.randn(6, 10, device=device), torch.randn(10, device=device)]
    return ([torch.nn.Parameter(w.clone()) for w in weights], [torch.nn.Parameter(w.clone()) for w in weights])


@pytest.mark.parametrize("kw", [{}, {"maximize": True}, {"weight_decay": 0.1, "maximize": True}],
                         ids=["defaults", "maximize", "maximize_wd"])
def test_frugal_density_one_is_adamw_with_its_flags(device, kw):
    ours, theirs = _pair(device)
    _train(ours, FRUGAL(ours, lr=1e-2, density=1.0, seed=0, **kw))
    _train(theirs, torch.optim.AdamW(theirs, lr=1e-2, foreach=False, **kw))
    for a, b in zip(ours, theirs):
        assert max_rel_err(a, b) < 1e-5


def test_frugal_default_weight_decay_is_adamws():
    p = torch.nn.Parameter(torch.zeros(3))
    assert FRUGAL([p]).defaults["weight_decay"] == torch.optim.AdamW([p]).defaults["weight_decay"] == 1e-2


@pytest.mark.parametrize("flags", [{"foreach": False}, {"fused": False}], ids=["foreach_false", "fused_false"])
def test_frugal_foreach_fused_select_the_per_tensor_step(device, flags):
    ours, theirs = _pair(device)
    _train(ours, FRUGAL(ours, lr=1e-2, density=0.5, seed=3, **flags))
    _train(theirs, FRUGAL(theirs, lr=1e-2, density=0.5, seed=3, foreach=True))
    for a, b in zip(ours, theirs):
        assert max_rel_err(a, b) < 1e-5
    assert FRUGAL(ours, **flags).param_groups[0][next(iter(flags))] is False


def test_frugal_refuses_what_it_cannot_honour():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    for flag in ("amsgrad", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"FRUGAL does not support {flag}=True"):
            FRUGAL(p, **{flag: True})
        FRUGAL(p, **{flag: False})
    with pytest.raises(ValueError, match="`fused` and `foreach` cannot be `True` together"):
        FRUGAL(p, foreach=True, fused=True)
    with pytest.raises(ValueError, match="maximize must be a bool"):
        FRUGAL(p, maximize="yes")
    with pytest.raises(TypeError, match=r"FRUGAL got unexpected keyword arguments \['nesterov'\]"):
        FRUGAL(p, nesterov=True)


def test_frugal_loads_a_state_dict_without_the_flags():
    p = [torch.nn.Parameter(torch.randn(4, 6))]
    opt = FRUGAL(p, density=0.5, seed=0)
    _train(p, opt, steps=2)
    state = opt.state_dict()
    for group in state["param_groups"]:  # as saved before the flags existed
        for flag in ("maximize", "foreach", "fused"):
            del group[flag]
    fresh = FRUGAL(p, density=0.5, seed=0)
    fresh.load_state_dict(state)
    _train(p, fresh, steps=1)
