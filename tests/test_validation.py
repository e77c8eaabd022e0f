"""Hardening of the Python layer (issue 13, items 3, 6-9): fake kernels check what the compiled ops
check (one device for every tensor, kinds, shapes, dtypes), so meta and mixed-device calls raise the
real ops' errors; public ops on meta tensors answer through the fake kernels; SphericalHead's cache
sees writes through `.data`; pair tuples, enqueue masks, FRUGAL state dicts and int arguments are
validated with errors that name the argument."""
from __future__ import annotations

import copy

import pytest
import torch

import fusedtrain
from fusedtrain import sae
from fusedtrain.mining import CrossBatchMemory, MultiSimilarityLoss, ThresholdConsistentMarginLoss
from fusedtrain.optim import FRUGAL

from utils import kernels_built

ops = torch.ops.fusedtrain
HYPER = (0.05, 20.0, 1e-6, 1e-6, -100)


def _meta(t):
    return t.to("meta")


# -- item 3: a mix of devices, and meta tensors -------------------------------------------------

def _raw_cases(dev):
    """(op, call(move)) where `move` is applied to one tensor argument (the one put on meta)."""
    x, t = torch.randn(4, 5, device=dev), torch.tensor([0, 1, 2, 3], device=dev)
    w = torch.randn(7, 5, device=dev)
    acts = sae.topk_route(torch.randn(4, 9, device=dev), 2)
    gram, colsum = fusedtrain.linear_spherical_stats(w)
    p = torch.randn(6, 4, device=dev)
    empty_i = torch.empty(0, dtype=torch.int32, device=dev)
    return {
        "spherical_loss": lambda m: ops.spherical_loss(x, m(t), "z", *HYPER, "mean", False, True),
        "_scale_grad_": lambda m: ops._scale_grad_(x.clone(), m(torch.tensor(2.0, device=dev))),
        "linear_spherical_loss": lambda m: ops.linear_spherical_loss(x, w, None, t, m(gram), colsum, "z", *HYPER,
                                                                     "mean", True),
        "multi_similarity_loss": lambda m: ops.multi_similarity_loss(x, m(t), None, None, None, 2.0, 50.0, 0.5,
                                                                     0.1, True, False, False),
        "tcm_loss": lambda m: ops.tcm_loss(m(x), t, None, None, 1.0, 1.0, 0.9, 0.5),
        "sae_gather_rows": lambda m: ops.sae_gather_rows(acts.row_ptr, acts.feature, acts.value,
                                                         m(torch.randn(9, 3, device=dev)), None),
        "frugal_step_": lambda m: ops.frugal_step_([p], [m(torch.randn_like(p))], [torch.zeros_like(p)],
                                                   [torch.zeros_like(p)], [empty_i], [p.new_empty(0)],
                                                   [p.new_empty(0)], [0], [1], 1e-3, 0.9, 0.99, 1e-8, 0.0,
                                                   "signsgd", 1.0),
        "public frugal_step_": lambda m: fusedtrain.frugal_step_(
            [p], [m(torch.randn_like(p))], [torch.zeros_like(p)], [torch.zeros_like(p)], [empty_i], [0], [1],
            lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0),
    }


@pytest.mark.parametrize("case", list(_raw_cases("cpu")))
def test_mixed_devices_raise(device, case):
    """A tensor on meta among `device` tensors: the fake kernel answers (dispatch prefers it), and it
    must raise as the compiled op does for two devices, not return uninitialized memory."""
    if not kernels_built(device, "spherical_loss"):
        pytest.skip("no compiled kernels")
    call = _raw_cases(device)[case]
    call(lambda t: t)  # the same call on one device runs
    with pytest.raises(ValueError, match=r"is on (meta|\w+) but \w+(\[0\])? is on .*one device") as info:
        call(_meta)
    assert "meta" in str(info.value) and device in str(info.value)


def _bad_raw_calls(dev):
    """Calls the compiled op refuses, with what the error must name."""
    x, t = torch.randn(4, 5, device=dev), torch.tensor([0, 1, 2, 3], device=dev)
    w = torch.randn(7, 5, device=dev)
    gram, colsum = fusedtrain.linear_spherical_stats(w)
    acts = sae.topk_route(torch.randn(4, 9, device=dev), 2)
    p = torch.randn(6, 4, device=dev)
    return [
        ("kind", lambda m: ops.spherical_loss(m(x), m(t), "bogus", *HYPER, "mean", False, True)),
        ("reduction", lambda m: ops.spherical_loss(m(x), m(t), "z", *HYPER, "bogus", False, True)),
        ("logits", lambda m: ops.spherical_loss(m(x[None]), m(t), "z", *HYPER, "mean", False, True)),
        ("target", lambda m: ops.spherical_loss(m(x), m(t.int()), "z", *HYPER, "mean", False, True)),
        ("gram", lambda m: ops.linear_spherical_loss(m(x), m(w), None, m(t), m(gram[:4, :4]), m(colsum), "z",
                                                     *HYPER, "mean", True)),
        ("reduction", lambda m: ops.linear_spherical_loss(m(x), m(w), None, m(t), m(gram), m(colsum), "z",
                                                          *HYPER, "bogus", True)),
        ("labels", lambda m: ops.multi_similarity_loss(m(x), m(t[:3]), None, None, None, 2.0, 50.0, 0.5, 0.1,
                                                       True, False, False)),
        ("alpha", lambda m: ops.multi_similarity_loss(m(x), m(t), None, None, None, -1.0, 50.0, 0.5, 0.1,
                                                      True, False, False)),
        ("ref_emb", lambda m: ops.tcm_loss(m(x), m(t), m(x.double()), m(t), 1.0, 1.0, 0.9, 0.5)),
        ("W_dec", lambda m: ops.sae_gather_rows(m(acts.row_ptr), m(acts.feature), m(acts.value),
                                                m(torch.randn(9, 3, device=dev).double()), None)),
        ("k", lambda m: ops.sae_topk_select(m(torch.randn(4, 9, device=dev)), 10)),
        ("routing", lambda m: ops.sae_route(m(torch.randn(4, 9, device=dev)), "bogus", 2, None)),
        ("kinds", lambda m: ops.frugal_step_([m(p)], [m(p)], [m(p)], [m(p)], [m(p.int())], [m(p)], [m(p)], [7],
                                             [1], 1e-3, 0.9, 0.99, 1e-8, 0.0, "signsgd", 1.0)),
        ("exp_avgs", lambda m: ops.frugal_step_([m(p)], [m(p)], [m(p[:2])], [m(p)], [m(p.int())], [m(p)],
                                                [m(p)], [0], [1], 1e-3, 0.9, 0.99, 1e-8, 0.0, "signsgd", 1.0)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_raw_calls("cpu"))),
                         ids=[name for name, _ in _bad_raw_calls("cpu")])
def test_meta_raises_what_the_kernel_raises(device, index):
    if not kernels_built(device, "spherical_loss"):
        pytest.skip("no compiled kernels")
    name, call = _bad_raw_calls(device)[index]
    with pytest.raises((ValueError, TypeError)) as real:
        call(lambda t: t)
    with pytest.raises(real.type, match=rf"\b{name}\b"):
        call(_meta)
    assert name in str(real.value)


def test_public_ops_on_meta_use_the_fake_kernels():
    """Meta tensors go to the ops (whose fake kernels answer with shapes), not to the references,
    which read values (torch.nonzero fails on meta)."""
    if not kernels_built("cpu", "spherical_loss"):
        pytest.skip("no compiled kernels")
    x, t, w = _meta(torch.randn(4, 5)), _meta(torch.tensor([0, 1, 2, 3])), _meta(torch.randn(7, 5))
    assert fusedtrain.spherical_loss(x, t).device.type == "meta"
    assert fusedtrain.spherical_loss(x, t, reduction="none").shape == (4,)
    assert fusedtrain.linear_spherical_loss(x, w, t).device.type == "meta"
    assert fusedtrain.multi_similarity_loss(x, t).device.type == "meta"
    assert fusedtrain.tcm_loss(x, t).device.type == "meta"
    with pytest.raises(ValueError, match="kind"):
        fusedtrain.linear_spherical_loss(x, w, t, kind="bogus")
    # Data-dependent output sizes: torch's meta error, which names the op.
    with pytest.raises(RuntimeError, match="mine_pairs"):
        fusedtrain.multi_similarity_mine(x, t)


# -- item 6: SphericalHead's cache ----------------------------------------------------------------

def test_spherical_head_cache_sees_writes_through_data(device, monkeypatch):
    head = fusedtrain.nn.SphericalHead(6, 11, device=device, dtype=torch.float64)
    h, t = torch.randn(8, 6, device=device, dtype=torch.float64), torch.randint(0, 11, (8,), device=device)
    calls = []
    real = fusedtrain.spherical.stats_cache.linear_spherical_stats
    monkeypatch.setattr(fusedtrain.spherical.stats_cache, "linear_spherical_stats", lambda *a: calls.append(1) or real(*a))

    def expected():
        return fusedtrain.linear_spherical_loss(h, head.weight, t, linear_bias=head.bias)

    head(h, t), head(h, t)
    assert len(calls) == 1  # micro-batches reuse the statistics
    head.weight.data.mul_(3)  # moves no version counter
    torch.testing.assert_close(head(h, t), expected())
    head.bias.data.add_(1)
    torch.testing.assert_close(head(h, t), expected())
    head.weight.data = torch.randn(11, 6, device=device, dtype=torch.float64)
    torch.testing.assert_close(head(h, t), expected())
    with torch.no_grad():
        head.weight.mul_(0.5)
    torch.testing.assert_close(head(h, t), expected())
    n = len(calls)
    head(h, t)
    assert len(calls) == n
    head.invalidate_stats()
    head(h, t)
    assert len(calls) == n + 1


def test_spherical_head_fingerprint_reads_a_sample_and_can_be_off(device, monkeypatch):
    """A large weight is fingerprinted from a few thousand entries; detect_data_writes=False keys the
    cache on storage and version only (a `.data` write then needs invalidate_stats())."""
    head = fusedtrain.nn.SphericalHead(64, 1000, device=device)
    h, t = torch.randn(8, 64, device=device), torch.randint(0, 1000, (8,), device=device)
    head(h, t)
    head.weight.data.mul_(3)
    torch.testing.assert_close(head(h, t), fusedtrain.linear_spherical_loss(h, head.weight, t, linear_bias=head.bias))
    quiet = fusedtrain.nn.SphericalHead(6, 11, device=device, detect_data_writes=False)
    calls = []
    real = fusedtrain.spherical.stats_cache.linear_spherical_stats
    monkeypatch.setattr(fusedtrain.spherical.stats_cache, "linear_spherical_stats", lambda *a: calls.append(1) or real(*a))
    x, y = torch.randn(8, 6, device=device), torch.randint(0, 11, (8,), device=device)
    quiet(x, y)
    quiet.weight.data.mul_(3)
    quiet(x, y)
    assert len(calls) == 1  # not seen, as documented
    quiet.invalidate_stats()
    torch.testing.assert_close(quiet(x, y), fusedtrain.linear_spherical_loss(x, quiet.weight, y, linear_bias=quiet.bias))
    assert len(calls) == 2


# -- item 7: index lists ----------------------------------------------------------------------------

def _pairs(device, **override):
    pairs = dict(a1=[0, 2], p=[1, 3], a2=[0, 1], n=[2, 4])
    pairs.update(override)
    return tuple(torch.tensor(pairs[k], device=device) for k in ("a1", "p", "a2", "n"))


@pytest.mark.parametrize("loss", [MultiSimilarityLoss, ThresholdConsistentMarginLoss])
@pytest.mark.parametrize("bad, name", [(dict(p=[6, 3]), r"indices_tuple\[1\] \(p\)"),
                                       (dict(a1=[-1, 2]), r"indices_tuple\[0\] \(a1\)"),
                                       (dict(n=[2, 7]), r"indices_tuple\[3\] \(n\)")])
def test_pair_tuples_out_of_range_raise(device, loss, bad, name):
    emb, labels = torch.randn(6, 4, device=device), torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    loss()(emb, labels, _pairs(device))  # in range: fine
    with pytest.raises(ValueError, match=name + r" holds indices outside \[0, 6\)"):
        loss()(emb, labels, _pairs(device, **bad))


def test_pair_tuples_with_ref_emb_and_bad_types(device):
    emb, labels = torch.randn(6, 4, device=device), torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    ref, ref_labels = torch.randn(3, 4, device=device), torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match=r"\(p\) holds indices outside \[0, 3\)"):
        MultiSimilarityLoss()(emb, labels, _pairs(device), ref, ref_labels)  # p = 3 is past M = 3
    with pytest.raises(ValueError, match=r"\(n\) holds indices outside \[0, 6\)"):
        MultiSimilarityLoss()(emb, labels, (torch.tensor([0], device=device), torch.tensor([1], device=device),
                                            torch.tensor([9], device=device)))
    with pytest.raises(TypeError, match=r"indices_tuple\[0\] \(a1\) must be a 1-D integer tensor"):
        MultiSimilarityLoss()(emb, labels, (torch.tensor([0.0, 2.0]),) + _pairs(device)[1:])
    with pytest.raises(ValueError, match="must have one length"):
        MultiSimilarityLoss()(emb, labels, _pairs(device, a1=[0, 2, 3]))


def test_cross_batch_memory_checks_mask_and_labels(device):
    emb, labels = torch.randn(6, 4, device=device), torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    memory = CrossBatchMemory(MultiSimilarityLoss(), 4, 16)
    with pytest.raises(TypeError, match="enqueue_mask must be a bool tensor"):
        memory(emb, labels, enqueue_mask=torch.tensor([1, 0, 1, 0, 1, 0], device=device))
    with pytest.raises(ValueError, match=r"enqueue_mask must have shape \(6,\)"):
        memory(emb, labels, enqueue_mask=torch.ones(5, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        memory(emb, labels[:3])
    assert memory.queue_idx == 0  # nothing was enqueued by the refused calls
    memory(emb, labels, enqueue_mask=torch.tensor([1, 0, 1, 0, 1, 0], device=device).bool())
    assert memory.queue_idx == 3


# -- item 8: FRUGAL state ---------------------------------------------------------------------------

def _frugal(device, **kw):
    params = [torch.nn.Parameter(torch.randn(8, 6, device=device)), torch.nn.Parameter(torch.randn(6, device=device))]
    return params, FRUGAL(params, **kw)


def _step(params, opt):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


@pytest.mark.parametrize("key, value, message", [("density", 7, "density must be a finite number in"),
                                                 ("proj", "bogus", "proj must be one of"),
                                                 ("update_gap", 0, "update_gap must be an int >= 1"),
                                                 ("lr", float("nan"), "lr must be a finite number")])
def test_frugal_load_state_dict_checks_groups(device, key, value, message):
    params, opt = _frugal(device)
    _step(params, opt)
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0][key] = value
    params2, opt2 = _frugal(device)
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match=message):
        opt2.load_state_dict(state)
    assert opt2.state_dict()["param_groups"] == before["param_groups"]  # left as it was
    _step(params2, opt2)


def test_frugal_load_state_dict_checks_state(device):
    params, opt = _frugal(device)
    _step(params, opt)
    aw_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    adamw = torch.optim.AdamW(aw_params)
    _step(aw_params, adamw)
    with pytest.raises(ValueError, match=r"lacks the FRUGAL options \['density', 'proj'"):
        opt.load_state_dict(adamw.state_dict())
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"state of param 0 .* exp_avg must have shape \(8, 2\)"):
        opt.load_state_dict(state)
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["indices"] = torch.tensor([4, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"indices must be sorted, unique and in \[0, 6\)"):
        opt.load_state_dict(state)
    state = copy.deepcopy(opt.state_dict())
    state["state"][1]["step"] = torch.tensor(1.0)  # AdamW's tensor step
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        opt.load_state_dict(state)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own state dict loads
    _step(params, opt)


def test_frugal_edited_group_and_arguments(device):
    params, opt = _frugal(device)
    opt.param_groups[0]["update_gap"] = 0
    with pytest.raises(ValueError, match="update_gap must be an int >= 1"):
        _step(params, opt)
    with pytest.raises(TypeError, match=r"FRUGAL got unexpected keyword arguments \['foo'\]") as info:
        FRUGAL(params, foo=1)
    assert "Base" not in str(info.value) and "Reference" not in str(info.value)
    from fusedtrain.reference.frugal import FRUGALReference
    with pytest.raises(TypeError) as info:
        FRUGALReference(params, foo=1)
    assert "Base" not in str(info.value) and "Reference" not in str(info.value)
    with pytest.raises(ValueError, match="seed must be in"):
        FRUGAL(params, seed=2**64)


# -- item 9: errors that name the argument ------------------------------------------------------------

def test_ints_that_overflow_int64_say_so(device):
    x, t = torch.randn(4, 5, device=device), torch.tensor([0, 1, 2, 3], device=device)
    w = torch.randn(7, 5, device=device)
    calls = [("ignore_index", lambda: fusedtrain.spherical_loss(x, t, ignore_index=2**64)),
             ("ignore_index", lambda: fusedtrain.linear_spherical_loss(x, w, t, ignore_index=-(2**63) - 1)),
             ("ignore_index", lambda: fusedtrain.nn.SphericalLoss(ignore_index=2**64)),
             ("budget", lambda: sae.mutual_choice_route(x, 2**64)),
             ("m", lambda: sae.feature_choice_route(x, 2**64)),
             ("k", lambda: sae.topk_route(x, 2**64)),
             ("budget", lambda: sae.sae_encode(x, w.t(), torch.zeros(7, device=device), torch.zeros(5, device=device),
                                               "mutual_choice", budget=2**64)),
             ("k_aux", lambda: sae.SparseAutoencoder(5, 7, k=2, k_aux=2**64))]
    for name, call in calls:
        with pytest.raises(ValueError, match=rf"{name} must (fit in int64|be in)"):
            call()
    # k·B past int64 keeps every entry (as any budget >= B·F does), it does not overflow.
    acts = sae.sae_encode(x, w.t(), torch.zeros(7, device=device), torch.zeros(5, device=device), "mutual_choice",
                          2**62)
    assert acts.value.numel() == int((x @ w.t() > 0).sum())


def test_linear_spherical_loss_without_features(device):
    """d = 0: the logits are the bias (or zeros); loss and gradients as for those logits."""
    h = torch.randn(4, 0, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 0, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, device=device, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3], device=device)
    for bias in (None, b):
        loss = fusedtrain.linear_spherical_loss(h, w, t, linear_bias=bias)
        logits = torch.nn.functional.linear(h, w, bias)
        torch.testing.assert_close(loss, fusedtrain.spherical_loss(logits, t))
    fusedtrain.linear_spherical_loss(h, w, t, linear_bias=b).backward()
    b2 = b.detach().clone().requires_grad_()
    fusedtrain.spherical_loss(b2.expand(4, 7), t).backward()
    torch.testing.assert_close(b.grad, b2.grad)


def test_malformed_stats_name_stats(device):
    x, t = torch.randn(4, 5, device=device), torch.tensor([0, 1, 2, 3], device=device)
    w = torch.randn(7, 5, device=device)
    gram, colsum = fusedtrain.linear_spherical_stats(w)
    bad = [(TypeError, r"stats must be linear_spherical_stats", 3),
           (TypeError, r"stats must be", (gram,)),
           (ValueError, r"stats.gram must have shape \(5, 5\)", (gram[:4, :4], colsum)),
           (ValueError, r"stats.colsum must have shape \(5,\)", (gram, colsum[:4])),
           (TypeError, r"stats.gram must be torch.float32", (gram.double(), colsum)),
           (TypeError, r"stats.colsum must be a torch.Tensor", (gram, [1.0] * 5)),
           (ValueError, r"stats.gram is on meta", (_meta(gram), colsum))]
    for error, message, stats in bad:
        with pytest.raises(error, match=message):
            fusedtrain.linear_spherical_loss(x, w, t, stats=stats)
    with pytest.raises(ValueError, match=r"stats.gram must have shape \(6, 6\)"):  # d' = d + 1 with a bias
        fusedtrain.linear_spherical_loss(x, w, t, linear_bias=torch.zeros(7, device=device), stats=(gram, colsum))


@pytest.mark.parametrize("routing", ["topk", "feature_choice", "mutual_choice"])
def test_sparse_autoencoder_names_x(device, routing):
    model = sae.SparseAutoencoder(8, 32, routing, 4, device=device)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d_in\) = \(\.\.\., 8\), got \(4, 7\)"):
        model(torch.randn(4, 7, device=device))
    model.eval()
    model.threshold_steps.fill_(1)  # threshold inference
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., d_in\) = \(\.\.\., 8\)"):
        model.encode(torch.randn(4, 7, device=device))
    # The functional encoder names both: either may be the wrong one.
    with pytest.raises(ValueError, match=r"W_enc must have shape \(d, F\) with d = 7 the width of x"):
        sae.sae_encode(torch.randn(4, 7, device=device), model.W_enc, model.b_enc, model.b_dec, k=2)


def test_sparse_autoencoder_constructor_and_loader():
    with pytest.raises(ValueError, match=r"k_aux must be in \[0, 2\*\*63 - 1\], got -1"):
        sae.SparseAutoencoder(8, 32, k=4, k_aux=-1)
    with pytest.raises(ValueError, match="auxk_alpha must be a finite number"):
        sae.SparseAutoencoder(8, 32, k=4, auxk_alpha=float("nan"))
    state = sae.SparseAutoencoder(8, 32, k=4).state_dict()
    sae.SparseAutoencoder.from_saelens_state_dict(state, k=4)
    for key in ("W_enc", "b_dec"):
        partial = {k: v for k, v in state.items() if k != key}
        with pytest.raises(KeyError, match=rf"lacks \['{key}'\]"):
            sae.SparseAutoencoder.from_saelens_state_dict(partial, k=4)
    for key, value in (("W_dec", torch.randn(16, 7)), ("b_enc", torch.randn(31)), ("threshold", torch.randn(3))):
        with pytest.raises(ValueError, match=rf"state_dict\['{key}'\] must have shape"):
            sae.SparseAutoencoder.from_saelens_state_dict({**state, key: value}, k=4)
    with pytest.raises(KeyError, match=r"lacks \['encoder.weight'"):
        sae.SparseAutoencoder.from_sparsify_state_dict({"W_dec": state["W_dec"]}, k=4)


def test_frugal_step_int_lists_must_fit_int64(device):
    p = torch.randn(4, 6, device=device)
    e = p.new_empty(0)
    args = ([p], [torch.randn(4, 6, device=device)], [torch.zeros(4, 6, device=device)],
            [torch.zeros(4, 6, device=device)], [torch.empty(0, dtype=torch.int32, device=device)])
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, residual_bases=[e], dense_updates=[e])
    with pytest.raises(ValueError, match=r"steps\[0\] must fit in int64"):
        fusedtrain.frugal_step_(*args, [0], [2**64], **hyper)
    with pytest.raises(ValueError, match=r"kinds\[0\] must fit in int64"):
        fusedtrain.frugal_step_(*args, [-2**64], [1], **hyper)


def test_scale_grad_needs_floating_tensors(device, needs_kernels):
    with pytest.raises(TypeError, match="grad must be float32"):
        torch.ops.fusedtrain._scale_grad_(torch.ones(4, 5, dtype=torch.int32, device=device),
                                          torch.ones((), device=device))
    with pytest.raises(TypeError, match="grad must be float32"):  # the fake kernel says the same
        torch.ops.fusedtrain._scale_grad_(torch.ones(4, 5, dtype=torch.int32, device="meta"),
                                          torch.ones((), device="meta"))
