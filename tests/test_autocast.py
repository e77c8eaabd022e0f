"""Every family under torch.autocast (docs: "Mixed precision" in spherical.md, sae.md, mining.md,
frugal.md; the policy table in fusedtrain/_core/autocast.py).

Two kinds of check: against fp32 with tolerances from the bf16 rounding of the inputs (what a user
sees), and against a float64 oracle fed the very bf16-rounded inputs the kernels read, with
tolerances of fp32 arithmetic (so that a loss rounded through bf16, or a matmul recast behind a
kernel's back, fails). Every test runs on CPU and, marked `cuda`, on a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedtrain
from fusedtrain import mining, sae
from fusedtrain._core import backend
from fusedtrain.optim import FRUGAL
from fusedtrain.reference import linear_spherical as ref_linear
from fusedtrain.reference import mining as ref_mining
from fusedtrain.reference import spherical as ref_spherical

from mining_helpers import pairs
from utils import rel_err

BF16 = torch.bfloat16


def amp(device):
    return torch.autocast(device, dtype=BF16)


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, in float64: what a kernel given t under autocast reads."""
    return t.detach().to(BF16).double()


def has_raw(op: str) -> bool:
    return op in backend.ops() and hasattr(torch.ops.fusedtrain, op)


# -- the policy is registered for every op ----------------------------------------------------------

def test_every_raw_op_has_an_autocast_kernel():
    if not backend.has_extension():
        pytest.skip("no compiled ops")
    for op in backend.ops():
        if hasattr(torch.ops.fusedtrain, op):
            for key in ("AutocastCPU", "AutocastCUDA"):
                assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedtrain::{op}", key), (op, key)


# -- spherical: the fused linear loss and SphericalHead ---------------------------------------------

def test_spherical_head_matches_fp32_within_bf16(device):
    """Acceptance: loss rel. error < 2e-2, weight gradient < 5e-2 against the fp32 head."""
    head = fusedtrain.nn.SphericalHead(64, 300, device=device)
    h = torch.randn(4, 16, 64, device=device)
    t = torch.randint(0, 300, (4, 16), device=device)
    loss32 = head(h, t)
    loss32.backward()
    grad32 = head.weight.grad.clone()
    head.weight.grad = None
    with amp(device):
        loss = head(h, t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert head.weight.grad.dtype == torch.float32
    assert rel_err(loss, loss32) < 2e-2
    assert rel_err(head.weight.grad, grad32) < 5e-2
    # Sharper: the float64 loss of the bf16-rounded inputs the kernels read. A loss rounded to bf16
    # on its way out (2**-9 relative) would fail this.
    exact = ref_linear.linear_spherical_loss(bf16_exact(h), bf16_exact(head.weight), t,
                                             linear_bias=bf16_exact(head.bias))
    assert rel_err(loss, exact) < 1e-4


def test_spherical_head_autocast_statistics_are_cached_apart(device):
    head = fusedtrain.nn.SphericalHead(32, 50, device=device)
    h = torch.randn(8, 32, device=device)
    t = torch.randint(0, 50, (8,), device=device)
    outside = head(h, t)
    with amp(device):
        inside = head(h, t)
        gram = head.stats().gram
    assert torch.equal(gram, fusedtrain.linear_spherical_stats(head.weight.to(BF16), head.bias.to(BF16)).gram)
    assert torch.equal(head(h, t), outside)  # outside again: the fp32 weight's statistics
    assert inside.dtype == outside.dtype == torch.float32


def test_linear_loss_bf16_activations_fp32_weight_trains(device):
    """Acceptance: bf16 h with an fp32 weight under autocast; a few SGD steps reduce the loss."""
    h = torch.randn(128, 32, device=device).to(BF16)
    t = torch.randint(0, 20, (128,), device=device)
    W = torch.nn.Parameter(0.1 * torch.randn(20, 32, device=device))
    b = torch.nn.Parameter(torch.zeros(20, device=device))
    opt = torch.optim.SGD([W, b], lr=2.0)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        with amp(device):
            loss = fusedtrain.linear_spherical_loss(h, W, t, linear_bias=b)
        assert loss.dtype == torch.float32
        loss.backward()
        assert W.grad.dtype == torch.float32 and torch.isfinite(W.grad).all()
        opt.step()
        losses.append(loss.item())
    # The Z-loss is about b − z_c while z_c (at most sqrt(D − 1)) is small: it falls slowly.
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.97 * losses[0], losses


def test_linear_loss_gradients_against_bf16_oracle(device):
    h = torch.randn(40, 24, device=device, requires_grad=True)
    W = torch.randn(30, 24, device=device, requires_grad=True)
    t = torch.randint(0, 30, (40,), device=device)
    with amp(device):
        loss = fusedtrain.linear_spherical_loss(h, W, t, reduction="sum")
    loss.backward()
    h64, W64 = bf16_exact(h).requires_grad_(), bf16_exact(W).requires_grad_()
    exact = ref_linear.linear_spherical_loss(h64, W64, t, reduction="sum")
    exact.backward()
    assert rel_err(loss, exact) < 1e-4
    # The gradients are bf16 GEMM outputs (as F.linear's under autocast): bf16 rounding.
    assert h.grad.dtype == W.grad.dtype == torch.float32
    assert rel_err(h.grad, h64.grad) < 2e-2 and rel_err(W.grad, W64.grad) < 2e-2


def test_mixed_dtypes_outside_autocast_raise_naming_both(device):
    # As F.linear (and F.linear_cross_entropy) outside autocast: no silent promotion.
    h = torch.randn(4, 8, device=device, dtype=BF16)
    W = torch.randn(5, 8, device=device)
    t = torch.randint(0, 5, (4,), device=device)
    with pytest.raises(TypeError, match=r"input must have linear_weight's dtype torch.float32, got torch.bfloat16"):
        fusedtrain.linear_spherical_loss(h, W, t)
    with pytest.raises(TypeError, match="bfloat16"):
        fusedtrain.linear_topk(h, W, 2)


def test_spherical_loss_over_bf16_logits(device):
    h = torch.randn(24, 16, device=device)
    W = torch.randn(40, 16, device=device, requires_grad=True)
    t = torch.randint(0, 40, (24,), device=device)
    with amp(device):
        logits = F.linear(h, W)
        logits.retain_grad()
        loss = fusedtrain.spherical_loss(logits, t)
    assert logits.dtype == BF16 and loss.dtype == torch.float32
    loss.backward()
    o64 = logits.detach().double().requires_grad_()
    exact = ref_spherical.spherical_loss(o64, t)
    exact.backward()
    assert rel_err(loss, exact) < 1e-5  # fp32 arithmetic on the bf16 logits, no bf16 round trip
    assert logits.grad.dtype == BF16 and rel_err(logits.grad, o64.grad) < 1e-2
    # fp32 logits stay fp32 (NATIVE: no cast), so the loss is the one outside autocast.
    o32 = torch.randn(6, 9, device=device)
    t32 = torch.randint(0, 9, (6,), device=device)
    with amp(device):
        inside = fusedtrain.spherical_loss(o32, t32)
    assert torch.equal(inside, fusedtrain.spherical_loss(o32, t32))


def test_backward_inside_the_autocast_region(device):
    h = torch.randn(16, 12, device=device, requires_grad=True)
    W = torch.randn(10, 12, device=device, requires_grad=True)
    t = torch.randint(0, 10, (16,), device=device)
    grads = []
    for inside in (False, True):
        h.grad = W.grad = None
        with amp(device):
            loss = fusedtrain.linear_spherical_loss(h, W, t)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append((h.grad.clone(), W.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_raw_ops_are_not_recast_inside_autocast(device):
    """The compiled op's own at::mm calls ran under autocast before the policy existed ("expected
    scalar type Float but found BFloat16"): fp32 in, the fp32 result out."""
    if not has_raw("linear_spherical_loss") or device not in [d.lower() for d in
                                                           backend.backends_for("linear_spherical_loss")]:
        pytest.skip(f"no compiled {device} kernel")
    h = torch.randn(8, 6, device=device)
    W = torch.randn(5, 6, device=device)
    t = torch.randint(0, 5, (8,), device=device)
    gram, colsum = fusedtrain.linear_spherical_stats(W)
    args = (h, W, None, t, gram, colsum, "z", 0.05, 20.0, 1e-6, 1e-6, -100, "mean", True)
    outside = torch.ops.fusedtrain.linear_spherical_loss(*args)
    with amp(device):
        inside = torch.ops.fusedtrain.linear_spherical_loss(*args)
    for a, b in zip(inside, outside):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_linear_topk_under_autocast(device):
    h = torch.randn(10, 16, device=device)
    W = torch.randn(300, 16, device=device)
    with amp(device):
        top = fusedtrain.linear_topk(h, W, 5, chunk=64)
    assert top.values.dtype == BF16  # as F.linear's logits under autocast
    logits = F.linear(bf16_exact(h), bf16_exact(W))
    assert rel_err(top.values, logits.gather(1, top.indices)) < 1e-2
    assert rel_err(top.values, logits.topk(5).values) < 1e-2


def test_torch_compile_under_autocast(device):
    head = fusedtrain.nn.SphericalHead(16, 30, device=device)
    h = torch.randn(12, 16, device=device)
    t = torch.randint(0, 30, (12,), device=device)

    def step(h, t):
        with amp(device):
            return head(h, t) + fusedtrain.spherical_loss(head(h), t)

    eager = step(h, t)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(h, t)
    assert compiled.dtype == eager.dtype == torch.float32
    assert rel_err(compiled, eager) < 1e-5


# -- mining: float32 (cosine_similarity's policy), registered on the raw ops ------------------------

def test_mining_losses_compute_in_fp32(device):
    if not backend.has_extension():
        pytest.skip("the mining policy is the compiled ops' (the reference runs in the input dtype)")
    emb = torch.randn(32, 16, device=device)
    labels = torch.randint(0, 4, (32,), device=device)
    x = emb.to(BF16).requires_grad_()
    with amp(device):
        ms = mining.multi_similarity_loss(x, labels)
        tcm = mining.tcm_loss(x, labels, margin_plus=0.2, margin_minus=0.1)
    assert ms.dtype == tcm.dtype == torch.float32
    ms.backward()
    assert x.grad.dtype == BF16 and torch.isfinite(x.grad).all()
    e64 = x.detach().double()
    assert rel_err(ms, ref_mining.multi_similarity_loss(e64, labels)) < 1e-4
    assert rel_err(tcm, ref_mining.tcm_loss(e64, labels, margin_plus=0.2, margin_minus=0.1)) < 1e-4
    # fp32 embeddings inside autocast: the kernels' similarity GEMMs are not recast to bf16.
    with amp(device):
        inside = mining.multi_similarity_loss(emb, labels)
        pairs_inside = mining.batch_hard_mine(emb, labels)
        mined_inside = mining.multi_similarity_mine(emb, labels)
    assert torch.equal(inside, mining.multi_similarity_loss(emb, labels))
    for a, b in zip(pairs_inside, mining.batch_hard_mine(emb, labels)):
        assert torch.equal(a, b)
    assert _same_pairs(mined_inside, mining.multi_similarity_mine(emb, labels))


_MIXED_CASES = {  # name -> fn(embeddings, labels, ref_emb, ref_labels): a loss or an index tuple
    "multi_similarity_loss": lambda e, l, r, rl: mining.multi_similarity_loss(e, l, r, rl),
    "tcm_loss": lambda e, l, r, rl: mining.tcm_loss(e, l, r, rl, margin_plus=0.2, margin_minus=0.1),
    "multi_similarity_mine": lambda e, l, r, rl: mining.multi_similarity_mine(e, l, r, rl),
    "pair_margin_mine": lambda e, l, r, rl: mining.pair_margin_mine(e, l, r, rl, pos_margin=0.5, neg_margin=0.1),
    "batch_hard_mine": lambda e, l, r, rl: mining.batch_hard_mine(e, l, r, rl),
    "MultiSimilarityLoss": lambda e, l, r, rl: mining.MultiSimilarityLoss()(e, l, ref_emb=r, ref_labels=rl),
    "MultiSimilarityLoss+miner": lambda e, l, r, rl: mining.MultiSimilarityLoss()(
        e, l, mining.MultiSimilarityMiner()(e, l, r, rl), r, rl),
    "MultiSimilarityLoss(lp)": lambda e, l, r, rl: mining.MultiSimilarityLoss(distance=mining.LpDistance())(
        e, l, ref_emb=r, ref_labels=rl),
    "MultiSimilarityMiner": lambda e, l, r, rl: tuple(mining.MultiSimilarityMiner()(e, l, r, rl)),
    "MultiSimilarityMiner(lp)": lambda e, l, r, rl: mining.MultiSimilarityMiner(distance=mining.LpDistance())(
        e, l, r, rl),
    "PairMarginMiner": lambda e, l, r, rl: mining.PairMarginMiner()(e, l, r, rl),
    "BatchHardMiner": lambda e, l, r, rl: mining.BatchHardMiner()(e, l, r, rl),
    "ThresholdConsistentMarginLoss": lambda e, l, r, rl: mining.ThresholdConsistentMarginLoss()(
        e, l, ref_emb=r, ref_labels=rl),
}


def _same_pairs(a, b) -> bool:
    """Pair tuples as sets of (anchor, other) pairs (their order is unspecified); triplets as they are."""
    if len(a) != len(b):
        return False
    if len(a) == 4:
        return pairs(a[0], a[1]) == pairs(b[0], b[1]) and pairs(a[2], a[3]) == pairs(b[2], b[3])
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("case", list(_MIXED_CASES))
def test_mining_mixes_bf16_embeddings_with_an_fp32_reference_as_torch_does(device, case):
    # Inside autocast a bf16 batch against an fp32 memory is what a model under autocast hands a
    # cross-batch loss; torch's float32-policy ops take the mix (both cast to fp32). Ours compute
    # exactly what fp32 computes on the same values; outside autocast the mix raises, naming both.
    fn = _MIXED_CASES[case]
    emb = torch.randn(40, 16, device=device).to(BF16)
    labels = torch.randint(0, 5, (40,), device=device)
    ref, ref_labels = torch.randn(56, 16, device=device), torch.randint(0, 5, (56,), device=device)
    x = emb.clone().requires_grad_()
    with amp(device):
        inside = fn(x, labels, ref, ref_labels)
    outside = fn(emb.float().requires_grad_(), labels, ref, ref_labels)
    if isinstance(inside, torch.Tensor):
        assert inside.dtype == torch.float32 and outside.item() != 0
        assert rel_err(inside, outside) < 1e-6
        inside.backward()
        assert x.grad.dtype == BF16 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    else:
        assert len(inside[0]) > 0 and _same_pairs(inside, outside)
    with pytest.raises(TypeError, match="ref_emb must have the dtype of embeddings"):
        result = fn(emb, labels, ref, ref_labels)
        tuple(result) if not isinstance(result, torch.Tensor) else None  # a lazy MinedPairs mines here


def test_mining_keeps_the_batch_itself_apart_under_autocast(device):
    # `ref_emb is embeddings` means the batch itself (self pairs excluded): the fp32 cast of one
    # object passed twice must stay one object.
    x = torch.randn(32, 16, device=device).to(BF16)
    labels = torch.randint(0, 4, (32,), device=device)
    # All pairs / a positive margin above 1, so that a self pair would change the loss.
    cases = {"multi_similarity_loss": lambda *a: mining.multi_similarity_loss(*a, mine=False),
             "tcm_loss": lambda *a: mining.tcm_loss(*a, margin_plus=1.5, margin_minus=0.1)}
    with amp(device):
        for name, fn in cases.items():
            assert torch.equal(fn(x, labels, x, labels), fn(x, labels)), name
            assert not torch.equal(fn(x, labels, x.clone(), labels), fn(x, labels)), name  # the test can fail


def test_mining_reference_path_stays_fp32_under_autocast(device, monkeypatch):
    # Without compiled kernels the pure-PyTorch reference runs; inside autocast its matmuls must not
    # be recast to bf16 behind the fp32 policy (a bf16 similarity matrix moves the loss by ~1e-3).
    emb = torch.randn(48, 32, device=device)
    labels = torch.randint(0, 4, (48,), device=device)
    monkeypatch.setattr(backend, "use_kernel", lambda op, dev: False)
    outside = mining.multi_similarity_loss(emb, labels, mine=False)
    with amp(device):
        inside = mining.multi_similarity_loss(emb, labels, mine=False)
        tcm = mining.tcm_loss(emb, labels, margin_plus=0.2, margin_minus=0.1)
    assert inside.dtype == torch.float32 and rel_err(inside, outside) < 1e-6
    assert rel_err(tcm, mining.tcm_loss(emb, labels, margin_plus=0.2, margin_minus=0.1)) < 1e-6


_PAIR_MINERS = {
    "pair_margin_lp": lambda: mining.PairMarginMiner(),
    "batch_hard_lp": lambda: mining.BatchHardMiner(),
    "pair_margin_cos": lambda: mining.PairMarginMiner(0.9, 0.3, distance=mining.CosineSimilarity()),
}


@pytest.mark.parametrize("miner", list(_PAIR_MINERS))
def test_pml_pair_paths_compute_in_fp32(device, miner):
    # PML's two steps with a non-MS miner (pair lists) and the LpDistance tiles run in Python: inside
    # autocast they compute what fp32 computes on the same (bf16) values, and the loss is float32.
    emb = torch.randn(48, 16, device=device).to(BF16)
    labels = torch.randint(0, 5, (48,), device=device)
    for name, loss_fn in {"cosine": mining.MultiSimilarityLoss(),
                          "lp": mining.MultiSimilarityLoss(distance=mining.LpDistance())}.items():
        x = emb.clone().requires_grad_()
        with amp(device):
            pairs = _PAIR_MINERS[miner]()(x, labels)
            inside = loss_fn(x, labels, pairs)
        assert inside.dtype == torch.float32, name
        inside.backward()
        x32 = emb.float().requires_grad_()
        outside = loss_fn(x32, labels, _PAIR_MINERS[miner]()(x32, labels))
        outside.backward()
        assert outside.item() != 0, name  # pairs were mined: the comparison can fail
        assert rel_err(inside, outside) < 1e-6, name
        assert rel_err(x.grad.float(), x32.grad) < 1e-2, name  # x's gradient is rounded to bf16


# -- SAE: encoder and decoder in the autocast dtype, losses in fp32 --------------------------------

@pytest.mark.parametrize("routing", ["topk", "mutual_choice", "threshold"])
def test_sparse_autoencoder_btd_under_autocast(device, routing):
    """Acceptance: forward and backward on (B, T, d) activations inside autocast."""
    kw = dict(theta=0.05) if routing == "threshold" else {}
    model = sae.SparseAutoencoder(32, 128, routing, 8, device=device, **kw)
    x = torch.randn(3, 7, 32, device=device)
    reference = model(x)
    with amp(device):
        out = model(x)
    assert out.sae_out.shape == x.shape and out.sae_out.dtype == BF16
    assert out.fvu.dtype == out.loss.dtype == torch.float32
    assert out.latent_acts.num_tokens == 21 and out.latent_acts.value.dtype == BF16
    assert rel_err(out.fvu, reference.fvu) < 5e-2
    # The decoder of these very latents, in float64 from the bf16 values and weights it read.
    dense = out.latent_acts.to_dense(128).double()
    recon = dense @ bf16_exact(model.W_dec) + bf16_exact(model.b_dec)
    assert rel_err(out.sae_out.reshape(-1, 32), recon) < 1e-2
    out.loss.backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    assert model.W_dec.grad.abs().sum() > 0


def test_sparse_autoencoder_auxk_under_autocast(device):
    model = sae.SparseAutoencoder(16, 64, "topk", 4, k_aux=8, device=device)
    model.num_tokens_since_fired.fill_(10**9)  # every latent dead: AuxK runs
    x = torch.randn(2, 5, 16, device=device, dtype=BF16)
    with amp(device):
        out = model(x)
    assert out.auxk_loss.dtype == torch.float32 and out.auxk_loss > 0
    out.loss.backward()
    assert torch.isfinite(model.W_enc.grad).all()


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["topk", "mutual_choice"])
def test_sparse_autoencoder_compiled_under_autocast(device, routing):
    # torch.compile of the module (graph breaks allowed: the dead-latent count is read on the host)
    # trains as the eager module does under autocast: same outputs, same gradients.
    torch.manual_seed(0)
    eager = sae.SparseAutoencoder(32, 256, routing, 8, device=device)
    compiled_module = sae.SparseAutoencoder(32, 256, routing, 8, device=device)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, backend="aot_eager")
    x = torch.randn(4, 16, 32, device=device)
    with amp(device):
        want, got = eager(x), compiled(x)
    want.loss.backward()
    got.loss.backward()
    assert got.sae_out.dtype == BF16 and got.loss.dtype == torch.float32
    assert rel_err(got.loss, want.loss) < 1e-6 and rel_err(got.sae_out.float(), want.sae_out.float()) < 1e-2
    for name, p in compiled_module.named_parameters():
        assert rel_err(p.grad, dict(eager.named_parameters())[name].grad) < 1e-5, name


def test_sae_functional_ops_under_autocast(device):
    x = torch.randn(12, 16, device=device)
    W_enc, b_enc = torch.randn(16, 48, device=device), torch.zeros(48, device=device)
    W_dec, b_dec = torch.randn(48, 16, device=device), torch.zeros(16, device=device)
    with amp(device):
        acts = sae.sae_encode(x, W_enc, b_enc, b_dec, "topk", 4)
        recon = sae.sparse_decode(acts, W_dec, b_dec)
        pre = (x @ W_enc).to(BF16)
        routed = sae.topk_route(pre, 4)
    assert acts.value.dtype == recon.dtype == BF16
    expected = sae.sae_encode(x.to(BF16), W_enc.to(BF16), b_enc.to(BF16), b_dec.to(BF16), "topk", 4)
    for a, b in zip(acts, expected):
        assert torch.equal(a, b)
    assert torch.equal(recon, sae.sparse_decode(expected, W_dec.to(BF16), b_dec.to(BF16)))
    for a, b in zip(routed, sae.topk_route(pre, 4)):  # routings keep pre's dtype
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match=r"W_dec must have the dtype of acts.value \(torch.bfloat16\), got torch.float32"):
        sae.sparse_decode(acts, W_dec)  # outside autocast: mixed dtypes raise naming both


# -- FRUGAL: the step is autocast-neutral ----------------------------------------------------------

@pytest.mark.parametrize("proj", ["svd", "random", "columns"])
def test_frugal_step_inside_autocast_is_the_step_outside(device, proj):
    torch.manual_seed(0)
    weights = [torch.randn(12, 20, device=device), torch.randn(20, device=device)]
    runs = []
    for inside in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = FRUGAL(params, lr=1e-2, density=0.5, proj=proj, update_gap=2, seed=1)
        for step in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * (step + 1))
            if inside:
                with amp(device):
                    opt.step()
            else:
                opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
