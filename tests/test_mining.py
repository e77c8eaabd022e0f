"""fusedtrain.mining against the float64 references (fusedtrain.reference.mining); parity with
pytorch-metric-learning 2.9.0 is in test_mining_pml.py.

Fused Multi-Similarity loss and TCM (values, gradients to embeddings and ref_emb), the mining ops
(pairs compared as sets), row-chunk edges (small tiles), odd/empty shapes, non-contiguous inputs,
gradcheck, opcheck, torch.compile, errors and the memory bound. Every test runs on "cpu" and (marked `cuda`) on "cuda".
"""
from __future__ import annotations

import pytest
import torch

from fusedtrain import mining as fm
from fusedtrain.reference import mining as ref

from fusedtrain.benchmarks.harness import cpu_peak_extra_mib
from mining_helpers import make_case, pairs
from utils import assert_compiles_like_eager, dtype_tolerances, kernels_built


# (B, M, d, classes): odd sizes, a single row, rows longer than 256 threads (CUDA: several columns
# per thread), few classes (many positives) and many (rows without positives).
SHAPES = [(1, 1, 3, 2), (7, 5, 1, 3), (33, 40, 16, 4), (64, 300, 9, 50), (130, 129, 33, 7)]
DTYPE_TOL = dtype_tolerances(fp32=2e-5)


KERNEL_OP = "multi_similarity_loss"  # what the needs_kernels fixture (conftest) checks


def loss_and_grads(fn, x, labels, r, rl, ref_grad, **kw):
    x = x.detach().clone().requires_grad_()
    rr = None if r is None else r.detach().clone().requires_grad_(ref_grad)
    loss = fn(x, labels, rr, rl, **kw)
    inputs = [x] + ([rr] if ref_grad and rr is not None else [])
    grads = torch.autograd.grad(loss, inputs) if loss.requires_grad else [torch.zeros_like(t) for t in inputs]
    return loss.detach(), grads


def check_loss(fn, ref_fn, x, labels, r, rl, tol, ref_grad=True, **kw):
    loss, grads = loss_and_grads(fn, x, labels, r, rl, ref_grad, **kw)
    ref_loss, ref_grads = loss_and_grads(ref_fn, x, labels, r, rl, ref_grad, **kw)
    assert loss.dtype == x.dtype and loss.shape == ()
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert abs(loss.double().item() - ref_loss.double().item()) <= tol * max(1.0, abs(ref_loss.item()))
    for g, rg in zip(grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == rg.dtype
        # Relative to the gradient's scale, plus an absolute floor for rounding noise where the exact
        # gradient vanishes (d = 1: x / |x| is locally constant).
        floor = 1e-12 if x.dtype == torch.float64 else 2e-6
        assert (g.double() - rg.double()).abs().max().item() <= tol * rg.abs().max().item() + floor


# ---------------------------------------------------------------------------------------------
# Fused Multi-Similarity loss vs the reference (same dtype, so mining decisions are the same)

@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mine", [True, False], ids=["mined", "all_pairs"])
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "in_batch"])
def test_ms_loss_matches_reference(device, tiles, dtype, tol, shape, mine, with_ref):
    x, labels, r, rl = make_case(*shape, device, dtype, with_ref=with_ref)
    check_loss(fm.multi_similarity_loss, ref.multi_similarity_loss, x, labels, r, rl, tol, mine=mine,
               alpha=2.0, beta=50.0, base=0.5, epsilon=0.1)


@pytest.mark.parametrize("hyper", [dict(alpha=0.5, beta=10.0, base=0.2, epsilon=0.3),
                                   dict(alpha=5.0, beta=80.0, base=0.9, epsilon=-0.05)])
def test_ms_loss_hyperparameters(device, hyper):
    x, labels, r, rl = make_case(40, 50, 8, 4, device)
    check_loss(fm.multi_similarity_loss, ref.multi_similarity_loss, x, labels, r, rl, 1e-10, **hyper)


@pytest.mark.parametrize("labels_kind", ["all_unique", "all_same", "one_positive_each"])
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "in_batch"])
def test_ms_loss_rows_without_positives_or_negatives(device, tiles, labels_kind, with_ref):
    B = 24
    x, _, r, _ = make_case(B, B, 6, 2, device, with_ref=True)
    labels = {"all_unique": torch.arange(B), "all_same": torch.zeros(B, dtype=torch.long),
              "one_positive_each": torch.arange(B) // 2}[labels_kind].to(device)
    rl = labels.flip(0) if with_ref else None
    check_loss(fm.multi_similarity_loss, ref.multi_similarity_loss, x, labels, r if with_ref else None, rl,
               1e-10)


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
def test_ms_loss_self_index(device, tiles, dtype, tol):
    """Cross-batch memory: each anchor's own column counts for the thresholds, not as a positive.
    Also arbitrary self_index values: a negative column stays a negative, -1 or >= M drop nothing."""
    x, labels, r, rl = make_case(20, 45, 7, 3, device, dtype)
    slots = torch.randperm(45, device=device)[:20]
    r[slots] = x  # the batch was written into the memory
    rl[slots] = labels
    arbitrary = torch.randint(-1, 47, (20,), device=device)
    for index in (slots, arbitrary):
        for mine in (True, False):
            check_loss(fm.multi_similarity_loss, ref.multi_similarity_loss, x, labels, r, rl, tol, ref_grad=False,
                       mine=mine, self_index=index)


def test_ms_loss_ref_same_object_is_in_batch(device):
    x, labels, _, _ = make_case(30, 30, 5, 4, device, with_ref=False)
    a = fm.multi_similarity_loss(x, labels, x, labels)
    b = fm.multi_similarity_loss(x, labels)
    c = fm.multi_similarity_loss(x, labels, x.clone(), labels.clone())  # a copy: self pairs count
    assert torch.equal(a, b)
    torch.testing.assert_close(c, ref.multi_similarity_loss(x, labels, x.clone(), labels.clone()), rtol=1e-10, atol=0)


def test_ms_loss_in_batch_gradient_counts_both_roles(device):
    """In-batch, each embedding is an anchor and a reference column: the gradient has both terms."""
    x, labels, _, _ = make_case(16, 16, 4, 3, device, with_ref=False)
    check_loss(fm.multi_similarity_loss, ref.multi_similarity_loss, x, labels, None, None, 1e-10)
    # Same as the explicit reference with the same tensor on both sides (autograd adds both roles).
    xx = x.clone().requires_grad_()
    g_ref = torch.autograd.grad(ref.multi_similarity_loss(xx, labels), xx)[0]
    g = torch.autograd.grad(fm.multi_similarity_loss(xx, labels), xx)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("B,M", [(0, 5), (4, 0), (0, 0)])
def test_ms_loss_empty(device, B, M):
    x, labels, r, rl = make_case(B, M, 3, 2, device)
    xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    loss = fm.multi_similarity_loss(xx, labels, rr, rl)
    assert loss.item() == 0.0
    loss.backward()
    assert xx.grad.shape == x.shape and rr.grad.shape == r.shape
    assert (xx.grad == 0).all() and (rr.grad == 0).all()


def test_ms_loss_non_contiguous(device, tiles):
    x, labels, r, rl = make_case(23, 31, 6, 4, device)
    xt = x.t().contiguous().t()          # column-major
    rs = torch.cat([r, r], 1)[:, ::2]    # strided rows
    ls = torch.stack([labels, labels], 1)[:, 0]
    assert not xt.is_contiguous() and not rs.is_contiguous() and not ls.is_contiguous()
    check_loss(fm.multi_similarity_loss, ref.multi_similarity_loss, xt, ls, rs, rl, 1e-10)


def test_ms_loss_bfloat16_within_float32_error(device):
    """bf16/fp16 run in fp32 inside: the result is the fp32 computation on the upcast input,
    rounded to bf16 (mining decisions of the fp32 S)."""
    x, labels, r, rl = make_case(40, 60, 16, 5, device, torch.bfloat16)
    loss = fm.multi_similarity_loss(x, labels, r, rl)
    assert loss.dtype == torch.bfloat16
    expect = ref.multi_similarity_loss(x.float(), labels, r.float(), rl)
    # Within one bf16 rounding of the fp32 value (GEMM summation order may differ in the last bits).
    assert abs(loss.item() - expect.item()) <= 2 ** -8 * abs(expect.item())


def test_ms_loss_bad_input(device):
    x, labels, r, rl = make_case(6, 8, 3, 2, device)
    cases = [
        (lambda: fm.multi_similarity_loss(x[0], labels), ValueError, "embeddings"),
        (lambda: fm.multi_similarity_loss(x, labels[:-1]), ValueError, "labels"),
        (lambda: fm.multi_similarity_loss(x, labels.double()), TypeError, "labels"),
        (lambda: fm.multi_similarity_loss(x.long(), labels), TypeError, "embeddings"),
        (lambda: fm.multi_similarity_loss(x, labels, r, rl[:-1]), ValueError, "ref_labels"),
        (lambda: fm.multi_similarity_loss(x, labels, r), ValueError, "ref_labels"),
        (lambda: fm.multi_similarity_loss(x, labels, None, rl), ValueError, "ref_labels"),
        (lambda: fm.multi_similarity_loss(x, labels, r[:, :2], rl), ValueError, "ref_emb"),
        (lambda: fm.multi_similarity_loss(x, labels, r.float(), rl), TypeError, "ref_emb"),
        (lambda: fm.multi_similarity_loss(x, labels, epsilon=float("nan")), ValueError, "epsilon"),
        (lambda: fm.multi_similarity_loss(x, labels, alpha=-1.0), ValueError, "alpha"),
        (lambda: fm.multi_similarity_loss(x, labels, beta=-2.0), ValueError, "beta"),
        (lambda: fm.multi_similarity_loss(x, labels, base=float("inf")), ValueError, "base"),
        (lambda: fm.multi_similarity_loss(x, labels, self_index=labels), ValueError, "self_index"),
        (lambda: fm.multi_similarity_mine(x, labels, epsilon=float("nan")), ValueError, "epsilon"),
        (lambda: fm.pair_margin_mine(x, labels, pos_margin=float("nan")), ValueError, "pos_margin"),
        (lambda: fm.batch_hard_mine(x.unsqueeze(0), labels), ValueError, "embeddings"),
        (lambda: fm.tcm_loss(x, labels, margin_plus=float("nan")), ValueError, "margin_plus"),
        (lambda: fm.tcm_loss(x, labels[:3]), ValueError, "labels"),
    ]
    for call, exc, name in cases:
        with pytest.raises(exc, match=name):
            call()


def test_compiled_op_checks_its_arguments(device, needs_kernels):
    """The C++ op names the bad argument too (callers may skip the Python checks)."""
    x, labels, r, rl = make_case(6, 8, 3, 2, device)
    op = torch.ops.fusedtrain.multi_similarity_loss
    cases = [
        (lambda: op(x[0], labels, None, None, None, 2.0, 50.0, 0.5, 0.1, True, False, False), "embeddings"),
        (lambda: op(x, labels[:2], None, None, None, 2.0, 50.0, 0.5, 0.1, True, False, False), "labels"),
        (lambda: op(x, labels.int(), None, None, None, 2.0, 50.0, 0.5, 0.1, True, False, False), "labels"),
        (lambda: op(x, labels, r, None, None, 2.0, 50.0, 0.5, 0.1, True, False, False), "ref_labels"),
        (lambda: op(x, labels, r, rl[:3], None, 2.0, 50.0, 0.5, 0.1, True, False, False), "ref_labels"),
        (lambda: op(x, labels, r, rl, labels[:2], 2.0, 50.0, 0.5, 0.1, True, False, False), "self_index"),
        (lambda: op(x, labels, None, None, None, -2.0, 50.0, 0.5, 0.1, True, False, False), "alpha"),
        (lambda: op(x, labels, None, None, None, 2.0, 0.0, 0.5, 0.1, True, False, False), "beta"),
        (lambda: op(x, labels, None, None, None, 2.0, 50.0, 0.5, float("nan"), True, False, False), "epsilon"),
        (lambda: torch.ops.fusedtrain.mine_pairs(x, labels, None, None, "nope", 0.1, 0.2, 0.8), "rule"),
        (lambda: torch.ops.fusedtrain._multi_similarity_loss_backward(
            torch.ones((), dtype=x.dtype, device=device), x, labels, None, None, None,
            torch.zeros(6, 2, dtype=x.dtype, device=device), 2.0, 50.0, 0.5, 0.1, True, False), "row_stats"),
    ]
    for call, name in cases:
        with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
            call()


# ---------------------------------------------------------------------------------------------
# Mining ops vs the reference (sets)

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "in_batch"])
def test_mining_matches_reference(device, tiles, dtype, shape, with_ref):
    x, labels, r, rl = make_case(*shape, device, dtype, with_ref=with_ref)
    for eps in (0.1, 0.5):
        ours = fm.multi_similarity_mine(x, labels, r, rl, epsilon=eps)
        want = ref.multi_similarity_mine(x, labels, r, rl, epsilon=eps)
        assert all(t.device == labels.device for t in ours)
        assert pairs(*ours[:2]) == pairs(*want[:2]) and pairs(*ours[2:]) == pairs(*want[2:])
        assert len(ours[0]) == len(want[0]) and len(ours[2]) == len(want[2])  # no duplicates
    ours = fm.pair_margin_mine(x, labels, r, rl, pos_margin=0.3, neg_margin=-0.1)
    want = ref.pair_margin_mine(x, labels, r, rl, pos_margin=0.3, neg_margin=-0.1)
    assert pairs(*ours[:2]) == pairs(*want[:2]) and pairs(*ours[2:]) == pairs(*want[2:])
    ours = fm.batch_hard_mine(x, labels, r, rl)
    want = ref.batch_hard_mine(x, labels, r, rl)
    assert all(torch.equal(o, w) for o, w in zip(ours, want))


def test_batch_hard_ties_take_first_index(device):
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], device=device)
    labels = torch.tensor([0, 0, 0, 1, 1], device=device)
    a, p, n = fm.batch_hard_mine(x, labels)
    want = ref.batch_hard_mine(x, labels)
    assert all(torch.equal(o, w) for o, w in zip((a, p, n), want))
    assert p.tolist() == [1, 0, 0, 4, 3] and n.tolist() == [3, 3, 3, 0, 0]


@pytest.mark.parametrize("B,M", [(0, 5), (4, 0), (0, 0)])
def test_mining_empty(device, B, M):
    x, labels, r, rl = make_case(B, M, 3, 2, device)
    for out in (fm.multi_similarity_mine(x, labels, r, rl), fm.pair_margin_mine(x, labels, r, rl),
                fm.batch_hard_mine(x, labels, r, rl)):
        assert all(t.numel() == 0 and t.dtype == torch.long for t in out)


# ---------------------------------------------------------------------------------------------
# TCM

@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "in_batch"])
def test_tcm_matches_reference(device, tiles, dtype, tol, shape, with_ref):
    x, labels, r, rl = make_case(*shape, device, dtype, with_ref=with_ref)
    for hyper in (dict(), dict(lambda_plus=0.5, lambda_minus=2.0, margin_plus=0.2, margin_minus=-0.1)):
        check_loss(fm.tcm_loss, ref.tcm_loss, x, labels, r, rl, tol, **hyper)


# ---------------------------------------------------------------------------------------------
# Autograd, opcheck, torch.compile

@pytest.mark.parametrize("mine", [True, False])
def test_gradcheck_ms_loss(device, needs_kernels, mine):
    x, labels, r, rl = make_case(9, 11, 4, 3, device)
    x.requires_grad_()
    r.requires_grad_()
    torch.autograd.gradcheck(lambda a, b: fm.multi_similarity_loss(a, labels, b, rl, mine=mine), (x, r))
    torch.autograd.gradcheck(lambda a: fm.multi_similarity_loss(a, labels, mine=mine), (x,))


def test_gradcheck_tcm(device, needs_kernels):
    x, labels, r, rl = make_case(9, 11, 4, 3, device)
    x.requires_grad_()
    r.requires_grad_()
    kw = dict(margin_plus=0.3, margin_minus=-0.2)
    torch.autograd.gradcheck(lambda a, b: fm.tcm_loss(a, labels, b, rl, **kw), (x, r))
    torch.autograd.gradcheck(lambda a: fm.tcm_loss(a, labels, **kw), (x,))


def test_gradcheck_pair_list_paths(device):
    """The classes' pair-list paths (chunked cosine of index lists) for both losses."""
    x, labels, r, rl = make_case(9, 11, 4, 3, device)
    x.requires_grad_()
    r.requires_grad_()
    mined = ref.multi_similarity_mine(x, labels, r, rl, epsilon=0.3)
    torch.autograd.gradcheck(lambda a, b: fm.MultiSimilarityLoss()(a, labels, mined, b, rl), (x, r))
    tcm = fm.ThresholdConsistentMarginLoss(margin_plus=0.3, margin_minus=-0.2)
    torch.autograd.gradcheck(lambda a, b: tcm(a, labels, mined, b, rl), (x, r))
    in_batch = ref.batch_hard_mine(x, labels)
    torch.autograd.gradcheck(lambda a: fm.MultiSimilarityLoss()(a, labels, in_batch), (x,))


def test_opcheck(device, needs_kernels):
    x, labels, r, rl = make_case(7, 9, 5, 3, device)
    x.requires_grad_()
    r.requires_grad_()
    slots = torch.arange(7, device=device)
    for args in ((x, labels, r, rl, None, 2.0, 50.0, 0.5, 0.1, True, True, True),
                 (x, labels, r, rl, None, 2.0, 50.0, 0.5, 0.1, True, False, False),
                 (x, labels, r, rl, None, 2.0, 50.0, 0.5, 0.1, True, True, False),
                 (x, labels, None, None, None, 2.0, 50.0, 0.5, 0.1, False, True, False),
                 (x, labels, None, None, None, 2.0, 50.0, 0.5, 0.1, False, False, False),
                 (x, labels, r, rl, slots, 1.0, 20.0, 0.4, 0.2, True, True, True)):
        torch.library.opcheck(torch.ops.fusedtrain.multi_similarity_loss, args)
    torch.library.opcheck(torch.ops.fusedtrain.tcm_loss, (x, labels, r, rl, 1.0, 1.0, 0.5, 0.0))
    torch.library.opcheck(torch.ops.fusedtrain.tcm_loss, (x, labels, None, None, 1.0, 2.0, 0.3, 0.1))
    xd = x.detach()
    for rule in ("multi_similarity", "pair_margin"):
        torch.library.opcheck(torch.ops.fusedtrain.mine_pairs, (xd, labels, r.detach(), rl, rule, 0.1, 0.2, 0.0),
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fusedtrain.batch_hard_mine, (xd, labels, None, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile(device, needs_kernels):
    x, labels, r, rl = make_case(12, 20, 6, 3, device, torch.float32)

    def step(a, b):
        return fm.multi_similarity_loss(a, labels, b, rl) + fm.tcm_loss(a, labels, b, rl)

    assert_compiles_like_eager(step, [x, r])


@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "in_batch"])
def test_forward_computed_gradient_equals_backward_op(device, needs_kernels, with_ref):
    """compute_grad (the default when a gradient is wanted) and the recomputing backward op agree."""
    x, labels, r, rl = make_case(21, 33, 5, 3, device, with_ref=with_ref)
    grads = []
    for compute_grad in (True, False):
        xx = x.clone().requires_grad_()
        rr = None if r is None else r.clone().requires_grad_()
        loss = torch.ops.fusedtrain.multi_similarity_loss(xx, labels, rr, rl, None, 2.0, 50.0, 0.5, 0.1, True,
                                                          compute_grad, rr is not None and compute_grad)[0]
        up = torch.tensor(0.7, dtype=loss.dtype, device=device)
        grads.append(torch.autograd.grad(loss * up, [xx] + ([rr] if rr is not None else [])))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_backward_twice_and_no_grad(device):
    x, labels, r, rl = make_case(10, 12, 4, 3, device)
    xx = x.clone().requires_grad_()
    loss = fm.multi_similarity_loss(xx, labels, r, rl)
    g1 = torch.autograd.grad(loss, xx, retain_graph=True)[0]
    g2 = torch.autograd.grad(loss * 3, xx)[0]
    torch.testing.assert_close(g2, 3 * g1)
    with torch.no_grad():
        assert not fm.multi_similarity_loss(xx, labels, r, rl).requires_grad


def test_double_backward_refused(device, needs_kernels):
    x, labels, r, rl = make_case(8, 10, 4, 3, device)
    for fn in (fm.multi_similarity_loss, fm.tcm_loss):
        xx = x.clone().requires_grad_()
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.grad(fn(xx, labels, r, rl), xx, create_graph=True)


def test_selftest_mining(device):
    from fusedtrain import selftest
    assert selftest.run([device], ["mining"], verbose=False) == 0


# ---------------------------------------------------------------------------------------------
# Scale: memory bound and a large in-batch run (in-process RSS measurement, see benchmarks/harness.py)


@pytest.mark.slow
def test_memory_bound_against_large_reference_set(needs_kernels_cpu):
    """B = 1024 against M = 65536, d = 128, float32, forward + backward: < 256 MiB extra (a B×M
    matrix alone would be 256 MiB)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=gen).requires_grad_()
    labels = torch.randint(0, 1000, (1024,), generator=gen)
    r = torch.randn(65536, 128, generator=gen)
    rl = torch.randint(0, 1000, (65536,), generator=gen)

    def step():
        x.grad = None
        fm.multi_similarity_loss(x, labels, r, rl).backward()

    step()  # warm up (thread pools, MKL buffers)
    extra = cpu_peak_extra_mib(step)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert extra < 256, f"{extra:.1f} MiB extra"
    # A trainable reference set: its gradient (32 MiB) and normalized copy on top, still bounded.
    r.requires_grad_()

    def step_with_ref_grad():
        x.grad = r.grad = None
        fm.multi_similarity_loss(x, labels, r, rl).backward()

    extra = cpu_peak_extra_mib(step_with_ref_grad)
    assert torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0
    assert extra < 256, f"{extra:.1f} MiB extra with ref_emb.requires_grad"


@pytest.fixture
def needs_kernels_cpu():
    if not kernels_built("cpu", KERNEL_OP):
        pytest.skip("no compiled CPU kernel for the mining ops in this build")


@pytest.mark.slow
def test_large_in_batch(needs_kernels_cpu):
    """B = 32768 in-batch (S would be 4 GiB): runs, and sampled rows' statistics match a reference
    computed on those rows alone."""
    gen = torch.Generator().manual_seed(1)
    B, d = 32768, 16
    x = torch.randn(B, d, generator=gen).requires_grad_()
    labels = torch.randint(0, 2000, (B,), generator=gen)
    loss, stats = fm.multi_similarity_loss_with_stats(x, labels)
    loss.backward()
    assert torch.isfinite(loss) and stats.shape == (B, 6) and torch.isfinite(x.grad).all()
    rows = torch.randint(0, B, (6,), generator=gen)
    q = torch.nn.functional.normalize(x.detach(), dim=1)
    S = q[rows] @ q.t()
    pos = labels[rows][:, None] == labels[None, :]
    pos[torch.arange(6), rows] = False
    neg = labels[rows][:, None] != labels[None, :]
    keep_pos, keep_neg = ref.multi_similarity_masks(S, pos, neg, 0.1)
    lse_pos = ref._log1p_sum_exp(-2.0 * (S - 0.5), keep_pos)
    lse_neg = ref._log1p_sum_exp(50.0 * (S - 0.5), keep_neg)
    torch.testing.assert_close(stats[rows, 2], lse_pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[rows, 3], lse_neg, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CPU vs CUDA

@pytest.mark.cuda
def test_cpu_cuda_agree(needs_kernels_cpu):
    if not kernels_built("cuda", KERNEL_OP):
        pytest.skip("no compiled CUDA kernel")
    x, labels, r, rl = make_case(70, 300, 24, 6, "cpu")
    for fn in (fm.multi_similarity_loss, fm.tcm_loss):
        a, ga = loss_and_grads(fn, x, labels, r, rl, True)
        b, gb = loss_and_grads(fn, x.cuda(), labels.cuda(), r.cuda(), rl.cuda(), True)
        torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-12)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(v.cpu(), u, rtol=1e-9, atol=1e-12)
    for fn in (fm.multi_similarity_mine, fm.pair_margin_mine):
        a, b = fn(x, labels, r, rl), fn(x.cuda(), labels.cuda(), r.cuda(), rl.cuda())
        assert pairs(*a[:2]) == pairs(*[t.cpu() for t in b[:2]])
        assert pairs(*a[2:]) == pairs(*[t.cpu() for t in b[2:]])


# ---------------------------------------------------------------------------------------------
# Non-finite and huge embeddings: a NaN/inf embedding makes the loss NaN (its NaN similarities are
# mined, never silently dropped by a false comparison); a huge finite one normalizes correctly.

LOSSES = {"ms_mined": (fm.multi_similarity_loss, dict(mine=True)),
          "ms_all": (fm.multi_similarity_loss, dict(mine=False)), "tcm": (fm.tcm_loss, {})}
REF_LOSSES = {"ms_mined": ref.multi_similarity_loss, "ms_all": ref.multi_similarity_loss, "tcm": ref.tcm_loss}


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "in_batch"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_embedding_gives_nan_loss(device, needs_kernels, loss_name, dtype, with_ref, value):
    fn, kw = LOSSES[loss_name]
    for planted in ["embeddings"] + (["ref_emb"] if with_ref else []):
        x, labels, r, rl = make_case(33, 40, 16, 4, device, dtype, with_ref=with_ref)
        (x if planted == "embeddings" else r)[5, 3] = value
        loss, grads = loss_and_grads(fn, x, labels, r, rl, True, **kw)
        assert torch.isnan(loss), (planted, loss)
        assert all(not torch.isfinite(g).all() for g in grads), planted


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("dtype, huge", [(torch.float32, 1e30), (torch.float64, 1e300)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "in_batch"])
def test_huge_embedding_normalizes_like_a_small_one(device, needs_kernels, loss_name, dtype, huge, with_ref):
    # Cosine similarity is scale invariant: a row scaled by 1e30 (fp32; ‖x‖² overflows, F.normalize
    # would give 0) has the loss of the unscaled row, and its gradient 1e-30 times.
    fn, kw = LOSSES[loss_name]
    x, labels, r, rl = make_case(33, 40, 16, 4, device, dtype, with_ref=with_ref)
    big_x, big_r = x.clone(), None if r is None else r.clone()
    big_x[5] *= huge
    if r is not None:
        big_r[7] *= huge
    loss, grads = loss_and_grads(fn, big_x, labels, big_r, rl, True, **kw)
    ref_loss, ref_grads = loss_and_grads(REF_LOSSES[loss_name], x, labels, r, rl, True, **kw)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    assert abs(loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item())), (loss, ref_loss)
    for g, rg, row in zip(grads, ref_grads, [5, 7]):
        g = g.double().clone()
        g[row] *= huge
        assert (g - rg.double()).abs().max().item() <= tol * rg.abs().max().item() + 1e-6 * (tol > 1e-6)
