"""fusedtrain.linear_spherical_loss (the fused linear op) against the logits path in float64.

The oracle is `spherical_loss(F.linear(x, W, b), t)` of the reference (fusedtrain.reference), in
float64 on the same (upcast) values: loss and the gradients of input, weight and bias, for every
kind x reduction, with and without bias, with ignored and repeated targets. Plus: q = hᵀQh against
Σo² computed directly, the memory bound (N = 8192, D = 262144 under 1 GiB), gradcheck, opcheck,
torch.compile, layouts, errors, SphericalHead's cached statistics, linear_topk. Every test runs on
"cpu" and (marked `cuda`, skipped without a GPU) on "cuda" with the same assertions.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fusedtrain
from fusedtrain import linear_spherical as ls
from fusedtrain.reference.linear_spherical import linear_spherical_loss as reference
from fusedtrain.reference.linear_spherical import linear_topk as reference_topk

from fusedtrain.benchmarks.harness import cpu_peak_extra_mib
from utils import HAS_CUDA, dtype_tolerances, rel_err

KERNEL_OP = "linear_spherical_loss"  # what the needs_kernels fixture (conftest) checks

KINDS = ["z", "spherical", "taylor", "mse"]
REDUCTIONS = ["mean", "sum", "none"]

# (N, d, D): odd sizes, one class, one feature, a single row, an empty batch, more classes than rows
# and more rows than classes (many repeated targets: multi-row scatter segments).
SHAPES = [(37, 13, 101), (5, 1, 7), (1, 8, 3), (64, 33, 20), (200, 16, 5), (16, 64, 1000), (0, 8, 10),
          (9, 4, 1)]

# fp64: only summation order differs from the logits path.
# fp32: the Gram-basis q = hᵀQh and the products accumulate in fp32 with d' and D terms; 2e-5
# leaves margin over that rounding for other seeds.
TOLERANCES = dtype_tolerances(fp32=2e-5)


def make_case(n, d, D, device, dtype=torch.float32, *, bias=True, ignore=True, scale=1.0):
    """Inputs drawn in fp64 then rounded to dtype; logits of O(scale); row 1 ignored; targets repeat."""
    h = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(D, d, dtype=torch.float64) * (scale / max(d, 1) ** 0.5)
    b = torch.randn(D, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, D, (n,))
    if n > 3:
        t[3] = t[2]  # a segment of two rows at least
    if ignore and n > 2:
        t[1] = -100
    to = dict(device=device, dtype=dtype)
    return h.to(**to), w.to(**to), None if b is None else b.to(**to), t.to(device)


def loss_and_grads(fn, h, w, b, t, upstream=None, **kw):
    """Loss and the gradients of sum(loss * upstream) w.r.t. (input, weight, bias)."""
    leaves = [x.detach().requires_grad_() for x in (h, w)] + ([b.detach().requires_grad_()] if b is not None else [])
    loss = fn(leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None else None, **kw)
    total = loss.sum() if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def check_against_reference(h, w, b, t, kind, reduction, tol, upstream=None, **kw):
    # Results that cancel to ~0 are compared in absolute terms: at D <= 2 (as in test_spherical) and at
    # d = 1, where every logit is w_k·h and the Z-loss's z_c does not depend on h (∂L/∂h ≈ 0).
    floor = 1.0 if w.shape[0] <= 2 or w.shape[1] == 1 else 1e-300
    loss, grads = loss_and_grads(fusedtrain.linear_spherical_loss, h, w, b, t, upstream, kind=kind,
                                 reduction=reduction, **kw)
    up64 = None if upstream is None else upstream.double()
    ref_loss, ref_grads = loss_and_grads(reference, h.double(), w.double(), None if b is None else b.double(),
                                         t, up64, kind=kind, reduction=reduction, **kw)
    assert loss.dtype == h.dtype and loss.shape == ref_loss.shape
    for g, x in zip(grads, [h, w] + ([b] if b is not None else [])):
        assert g.dtype == x.dtype and g.shape == x.shape
    if h.shape[0] == 0 or (t == kw.get("ignore_index", -100)).all():
        torch.testing.assert_close(loss.double(), ref_loss, equal_nan=True)
        assert all((g == 0).all() for g in grads)
        return
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    bounds = [tol] * 4
    if h.dtype != torch.float64:
        # "Within fp32 rounding": a small o_c (spherical: γ = −2o_c/(o_c² + eps)) or one class
        # (q and o_c² are one number formed two ways, their difference amplified by 1/o²)
        # magnify rounding; the bar is then 4x the error of the logits path computed by PyTorch
        # in the same dtype.
        pt_loss, pt_grads = loss_and_grads(reference, h, w, b, t, upstream, kind=kind, reduction=reduction, **kw)
        bounds = [max(tol, 4 * rel_err(x, r, floor)) for x, r in zip([pt_loss] + pt_grads, [ref_loss] + ref_grads)]
    assert rel_err(loss, ref_loss, floor) <= bounds[0], ("loss", rel_err(loss, ref_loss, floor), bounds[0])
    for name, g, r, bound in zip(["input", "weight", "bias"], grads, ref_grads, bounds[1:]):
        assert rel_err(g, r, floor) <= bound, (name, rel_err(g, r, floor), bound)


def upstream_for(reduction, n, device):
    if reduction == "none":
        return torch.randn(n, device=device)
    return torch.tensor(-1.7, device=device)


@pytest.mark.parametrize("dtype, tol", TOLERANCES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_logits_path(device, dtype, tol, kind, reduction, bias, shape):
    if shape[2] == 1 and dtype == torch.float32 and kind in ("z", "spherical"):
        pytest.skip("one class: the Z-loss and spherical weight gradients are exact zeros that the "
                    "factored form gets as 1·aᵀ + W·M, a difference of fp32-rounded products (fp64 covers it)")
    h, w, b, t = make_case(*shape, device, dtype, bias=bias)
    check_against_reference(h, w, b, t, kind, reduction, tol)
    if reduction != "mean" or shape[0] > 0:
        check_against_reference(h, w, b, t, kind, reduction, tol, upstream_for(reduction, shape[0], device))


@pytest.mark.parametrize("kind", KINDS)
def test_larger_shape_float32(device, kind):
    h, w, b, t = make_case(512, 96, 3000, device, scale=2.0)
    check_against_reference(h, w, b, t, kind, "mean", 2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_within_twice_pytorch_error(device, dtype, kind):
    """bf16/fp16 error vs the fp64 logits path is at most 2x that of the logits path run by PyTorch
    in the same dtype (F.linear in bf16 and the reference loss on its bf16 logits)."""
    h, w, b, t = make_case(128, 64, 500, device, dtype)
    kw = dict(kind=kind, reduction="mean")
    ours_loss, ours = loss_and_grads(fusedtrain.linear_spherical_loss, h, w, b, t, **kw)
    torch_loss, torch_grads = loss_and_grads(reference, h, w, b, t, **kw)
    ref_loss, ref = loss_and_grads(reference, h.double(), w.double(), b.double(), t, **kw)
    assert ours_loss.dtype == dtype
    assert rel_err(ours_loss, ref_loss) <= 2 * rel_err(torch_loss, ref_loss) + 1e-3
    for name, g, tg, r in zip(["input", "weight", "bias"], ours, torch_grads, ref):
        assert g.dtype == dtype
        assert rel_err(g, r) <= 2 * rel_err(tg, r) + 1e-3, (name, rel_err(g, r), rel_err(tg, r))


def test_q_from_gram_agrees_with_direct_sum_of_squares(device):
    """q = hᵀQh (Gram basis) vs Σo² of the logits, both in fp32, against fp64: same rounding level.
    The mse kind's row loss is q − 2·o_c + 1, so q is read back from it."""
    h, w, b, t = make_case(256, 64, 4096, device, bias=True, ignore=False, scale=3.0)
    loss = fusedtrain.linear_spherical_loss(h, w, t, linear_bias=b, kind="mse", reduction="none")
    oc = (h.double() * w.double()[t]).sum(-1) + b.double()[t]
    q_ours = loss.double() + 2 * oc - 1
    logits32 = F.linear(h, w, b)
    q_direct = (logits32 * logits32).sum(-1).double()
    logits64 = F.linear(h.double(), w.double(), b.double())
    q64 = (logits64 * logits64).sum(-1)
    err_ours = ((q_ours - q64).abs() / q64).max().item()
    err_direct = ((q_direct - q64).abs() / q64).max().item()
    assert err_ours <= max(4 * err_direct, 1e-6), (err_ours, err_direct)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("d", [1023, 1024, 1100])
def test_gram_symmetric_blocks(device, bias, d):
    """From 1024 columns of W' on, the centered Gram matrix is assembled from its upper blocks and
    mirrored."""
    _, w, b, _ = make_case(0, d, 300, device, torch.float64, bias=bias)
    gram, colsum = fusedtrain.linear_spherical_stats(w, b)
    aug = torch.cat([w, b.unsqueeze(1)], 1) if bias else w
    centered = aug - aug.mean(0)
    torch.testing.assert_close(gram, centered.t() @ centered)
    torch.testing.assert_close(colsum, aug.sum(0))
    assert torch.equal(gram, gram.t())
    h, _, _, t = make_case(6, d, 300, device, torch.float64, bias=bias)
    check_against_reference(h, w, b, t, "z", "mean", 1e-10)


def test_bf16_projection_at_fp32_accuracy(device, needs_kernels):
    """bf16 inputs: p = H·Q runs as three bf16 products of a split fp32 Q; it must keep fp32 accuracy
    (a single bf16 product would be off by ~2^-9)."""
    h, w, _, t = make_case(64, 96, 500, device, torch.bfloat16, bias=False)
    gram, colsum = fusedtrain.linear_spherical_stats(w)
    _, _, proj = torch.ops.fusedtrain.linear_spherical_loss(h, w, None, t, gram, colsum, "z", 0.05, 20.0, 1e-6,
                                                            1e-6, -100, "mean", True)
    exact = h.double() @ gram.double()
    assert proj.dtype == torch.float32
    assert rel_err(proj, exact) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [10.0, 100.0, 1000.0])
def test_large_common_offset_float32(device, kind, offset):
    """Logits sharing a large offset (bias and a common direction of W's rows) with spread ~1: the
    centered Gram matrix keeps the row spread free of cancellation. Bar: within 4x the error of the
    fp32 logits path (check_against_reference) or 2e-5."""
    h, w, b, t = make_case(128, 32, 700, device, torch.float64)
    w = w + offset * 0.01 * torch.randn(32, dtype=torch.float64, device=device)
    b = b + offset
    f32 = [x.float() for x in (h, w, b)]
    check_against_reference(*f32, t, kind, "mean", 2e-5)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the RSS")
def test_memory_never_proportional_to_logits_cpu():
    """N = 8192, d = 64, D = 262144 float32: the logits alone would take 8 GiB; forward + backward
    (gradients of input and weight: 2 MiB + 64 MiB) must stay under 1 GiB of extra memory."""
    N, d, D = 8192, 64, 262144
    h = torch.randn(N, d).requires_grad_()
    w = (torch.randn(D, d) / 8).requires_grad_()
    t = torch.randint(0, D, (N,))

    def step():
        loss = fusedtrain.linear_spherical_loss(h, w, t, kind="z")
        loss.backward()
        assert torch.isfinite(loss)

    extra = cpu_peak_extra_mib(step) * 2**20
    assert w.grad is not None and w.grad.shape == (D, d)
    assert extra < 2**30, f"peak extra RSS {extra / 2**20:.0f} MiB"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_memory_never_proportional_to_logits_cuda():
    N, d, D = 8192, 64, 262144
    h = torch.randn(N, d, device="cuda").requires_grad_()
    w = (torch.randn(D, d, device="cuda") / 8).requires_grad_()
    t = torch.randint(0, D, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fusedtrain.linear_spherical_loss(h, w, t).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2**30


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(device, needs_kernels, kind, reduction):
    h, w, b, t = make_case(7, 5, 9, device, torch.float64)
    leaves = [x.detach().requires_grad_() for x in (h, w, b)]

    def fn(h_, w_, b_):
        return fusedtrain.linear_spherical_loss(h_, w_, t, linear_bias=b_, kind=kind, reduction=reduction)

    assert torch.autograd.gradcheck(fn, leaves)


def test_all_rows_ignored_like_cross_entropy(device):
    h, w, b, t = make_case(6, 4, 9, device, torch.float64)
    t[:] = -100
    for reduction in REDUCTIONS:
        check_against_reference(h, w, b, t, "z", reduction, 1e-10)


@pytest.mark.parametrize("ignore_index", [3, -1])
def test_custom_ignore_index(device, ignore_index):
    h, w, b, t = make_case(20, 6, 9, device, torch.float64, ignore=False)
    t[::3] = ignore_index
    check_against_reference(h, w, b, t, "z", "mean", 1e-10, ignore_index=ignore_index)


@pytest.mark.parametrize("bad", [9, 2**40, -1, -101])
def test_out_of_range_target_raises(device, bad):
    h, w, b, t = make_case(6, 4, 9, device)
    t[2] = bad
    with pytest.raises(ValueError, match="target"):
        fusedtrain.linear_spherical_loss(h.requires_grad_(), w, t, linear_bias=b)


def test_unchecked_out_of_range_target_gives_nan(device, needs_kernels):
    h, w, b, t = make_case(6, 4, 9, device)
    t[2] = 9
    x = h.detach().requires_grad_()
    loss = fusedtrain.linear_spherical_loss(x, w, t, linear_bias=b, reduction="none", check_target=False)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 3, 4, 5]]).all()
    # Backward never gathers or scatters the out-of-range row: its input gradient is NaN, the
    # others finite (the weight's gradient, a sum over all rows, is NaN: nothing silent).
    loss.sum().backward()
    assert torch.isnan(x.grad[2]).all() and torch.isfinite(x.grad[[0, 1, 3, 4, 5]]).all()


def test_input_with_extra_dimensions(device):
    h, w, b, t = make_case(24, 6, 11, device, torch.float64)
    for reduction in REDUCTIONS:
        ours = fusedtrain.linear_spherical_loss(h.reshape(2, 3, 4, 6), w, t.reshape(2, 3, 4), linear_bias=b,
                                                reduction=reduction)
        ref = reference(h, w, t, linear_bias=b, reduction=reduction)
        torch.testing.assert_close(ours.reshape(ref.shape), ref)
        if reduction == "none":
            assert ours.shape == (2, 3, 4)


def test_non_contiguous_layouts(device):
    """Transposed storage for input and weight, strided rows, a strided target and bias."""
    h, w, b, t = make_case(30, 7, 13, device, torch.float64)
    h_t = h.t().contiguous().t()
    w_t = w.t().contiguous().t()
    h_rows = torch.randn(30, 20, dtype=torch.float64, device=device)[:, 3:10]
    h_rows.copy_(h)
    b_strided = torch.stack([b, b], dim=1)[:, 0]
    t_strided = torch.stack([t, t], dim=1)[:, 1]
    for hh, ww, bb, tt in [(h_t, w, b, t), (h, w_t, b, t), (h_rows, w, b_strided, t_strided)]:
        assert not (hh.is_contiguous() and ww.is_contiguous() and bb.is_contiguous() and tt.is_contiguous())
        check_against_reference(hh, ww, bb, tt, "z", "mean", 1e-10)


def test_partial_gradients(device):
    """Only the weight (a frozen feature extractor), only the input (a frozen head), only the bias."""
    h, w, b, t = make_case(17, 5, 12, device, torch.float64)
    _, ref = loss_and_grads(reference, h, w, b, t)
    for wanted in range(3):
        leaves = [x.detach().requires_grad_(i == wanted) for i, x in enumerate((h, w, b))]
        loss = fusedtrain.linear_spherical_loss(leaves[0], leaves[1], t, linear_bias=leaves[2])
        (g,) = torch.autograd.grad(loss, [leaves[wanted]])
        torch.testing.assert_close(g, ref[wanted])


def test_no_grad_forward(device):
    h, w, b, t = make_case(17, 5, 12, device, torch.float64)
    with torch.no_grad():
        loss = fusedtrain.linear_spherical_loss(h.requires_grad_(), w, t, linear_bias=b)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(h, w, t, linear_bias=b))


def test_backward_is_deterministic(device):
    """Two backward passes give bit-identical gradients (segmented scatter: no float atomics)."""
    h, w, b, t = make_case(300, 32, 7, device)
    _, first = loss_and_grads(fusedtrain.linear_spherical_loss, h, w, b, t)
    _, second = loss_and_grads(fusedtrain.linear_spherical_loss, h, w, b, t)
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)


def test_gradient_accumulates_and_flows_through_earlier_ops(device):
    h, w, b, t = make_case(10, 6, 9, device, torch.float64)
    x = torch.randn(10, 6, dtype=torch.float64, device=device, requires_grad=True)
    wl = w.detach().requires_grad_()
    for _ in range(2):
        fusedtrain.linear_spherical_loss(torch.tanh(x), wl, t, linear_bias=b).backward()
    x_ref = x.detach().requires_grad_()
    w_ref = w.detach().requires_grad_()
    (2 * reference(torch.tanh(x_ref), w_ref, t, linear_bias=b)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(wl.grad, w_ref.grad)


def test_module_equals_functional(device):
    h, w, b, t = make_case(10, 6, 9, device, torch.float64)
    criterion = fusedtrain.nn.LinearSphericalLoss("taylor", reduction="sum")
    torch.testing.assert_close(criterion(h, w, t, b),
                               fusedtrain.linear_spherical_loss(h, w, t, linear_bias=b, kind="taylor",
                                                                reduction="sum"))
    assert "taylor" in repr(criterion)


def test_spherical_head_caches_statistics(device, monkeypatch):
    """Statistics computed once per weight version: reused across micro-batches and evaluation,
    recomputed after the optimizer's in-place step; loss and gradients as without the cache."""
    torch.manual_seed(1)
    head = fusedtrain.nn.SphericalHead(6, 11, bias=True, kind="z", device=device, dtype=torch.float64)
    calls = []
    real = ls.linear_spherical_stats
    monkeypatch.setattr(fusedtrain.spherical.stats_cache, "linear_spherical_stats",
                        lambda *a: calls.append(1) or real(*a))
    h1, _, _, t1 = make_case(8, 6, 11, device, torch.float64)
    h2, _, _, t2 = make_case(8, 6, 11, device, torch.float64)
    (head(h1, t1) + head(h2, t2)).backward()
    assert len(calls) == 1
    w, b = head.weight.detach().requires_grad_(), head.bias.detach().requires_grad_()
    (reference(h1, w, t1, linear_bias=b) + reference(h2, w, t2, linear_bias=b)).backward()
    torch.testing.assert_close(head.weight.grad, w.grad)
    torch.testing.assert_close(head.bias.grad, b.grad)
    torch.optim.SGD(head.parameters(), lr=0.1).step()
    loss = head(h1, t1)
    assert len(calls) == 2
    head(h1, t1).backward()
    torch.optim.Adam(head.parameters(), lr=0.1, foreach=True).step()  # multi-tensor in-place step
    head(h1, t1)
    assert len(calls) == 3
    loss = head(h1, t1)
    torch.testing.assert_close(loss, reference(h1, head.weight, t1, linear_bias=head.bias))
    values, indices = head.topk(h1, 3)
    torch.testing.assert_close(values, head.logits(h1).topk(3).values)
    assert "num_classes=11" in repr(head)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10000])
def test_linear_topk_matches_full_topk(device, bias, chunk):
    h, w, b, _ = make_case(33, 8, 64, device, bias=bias)
    for k in (1, 5, 64):
        values, indices = fusedtrain.linear_topk(h, w, k, linear_bias=b, chunk=chunk)
        ref_v, _ = reference_topk(h, w, k, linear_bias=b)
        torch.testing.assert_close(values, ref_v)
        torch.testing.assert_close(F.linear(h, w, b).gather(1, indices), ref_v)  # ties: any order
        assert indices.dtype == torch.int64 and values.shape == (33, k)


def test_linear_topk_half_precision_ranks_in_fp32(device):
    h, w, b, _ = make_case(40, 16, 300, device, torch.bfloat16)
    values, indices = fusedtrain.linear_topk(h, w, 5, linear_bias=b, chunk=64)
    ref_v, ref_i = F.linear(h.float(), w.float(), b.float()).topk(5)
    assert values.dtype == torch.bfloat16
    torch.testing.assert_close(values, ref_v.to(torch.bfloat16))
    torch.testing.assert_close(F.linear(h.float(), w.float(), b.float()).gather(1, indices), ref_v)


def test_linear_topk_errors(device):
    h, w, b, _ = make_case(3, 4, 5, device)
    for kwargs, match in [(dict(k=0), "k must be"), (dict(k=6), "k must be <="), (dict(k=2, chunk=0), "chunk")]:
        with pytest.raises(ValueError, match=match):
            fusedtrain.linear_topk(h, w, **kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_opcheck(device, needs_kernels, reduction, bias):
    h, w, b, t = make_case(9, 5, 7, device, torch.float64, bias=bias)
    stats = fusedtrain.linear_spherical_stats(w, b)
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_() if bias else None, t, stats.gram,
            stats.colsum, "z", 0.05, 20.0, 1e-6, 1e-6, -100, reduction, True)
    torch.library.opcheck(torch.ops.fusedtrain.linear_spherical_loss.default, args)
    torch.library.opcheck(torch.ops.fusedtrain._linear_spherical_gram.default,
                          (w.detach(), b.detach() if bias else None))
    _, coef, proj = torch.ops.fusedtrain.linear_spherical_loss(*args)
    grad = torch.randn(9 if reduction == "none" else (), dtype=torch.float64, device=device)
    for mask in ([True, True, True], [False, True, False], [True, False, bias]):
        torch.library.opcheck(torch.ops.fusedtrain._linear_spherical_loss_backward.default,
                              (grad, h.detach(), w.detach(), b.detach() if bias else None, t, stats.colsum,
                               coef, proj, -100, mask))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(device, needs_kernels, backend):
    torch._dynamo.reset()
    h, w, b, t = make_case(12, 6, 10, device, torch.float64)

    def step(h_, w_, b_):
        return fusedtrain.linear_spherical_loss(torch.tanh(h_), w_, t, linear_bias=b_, kind="z")

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    leaves = [x.detach().requires_grad_() for x in (h, w, b)]
    loss = compiled(*leaves)
    loss.backward()
    ref_leaves = [x.detach().requires_grad_() for x in (h, w, b)]
    ref = reference(torch.tanh(ref_leaves[0]), ref_leaves[1], t, linear_bias=ref_leaves[2])
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for x, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(x.grad, r.grad)


def test_spherical_head_under_torch_compile(device, needs_kernels):
    """Under torch.compile the head computes its statistics in the graph (no cache)."""
    torch._dynamo.reset()
    head = fusedtrain.nn.SphericalHead(6, 9, device=device, dtype=torch.float64)
    h, _, _, t = make_case(10, 6, 9, device, torch.float64)
    x = h.detach().requires_grad_()
    loss = torch.compile(head, backend="aot_eager", fullgraph=True)(x, t)
    loss.backward()
    x_ref = h.detach().requires_grad_()
    ref = reference(x_ref, head.weight.detach(), t, linear_bias=head.bias.detach())
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


def _bad_cases(device):
    h, w, b, t = make_case(4, 3, 5, device)
    return [
        (lambda: (h.double(), w, t, b), TypeError, "input must have linear_weight's dtype"),
        (lambda: (h, w.int(), t, b), TypeError, "linear_weight must be"),
        (lambda: (h, w[0], t, b), ValueError, "linear_weight must have shape"),
        (lambda: (h, w[:0], t, b), ValueError, "linear_weight must have shape"),
        (lambda: (h[:, :2], w, t, b), ValueError, "input must have shape"),
        (lambda: (h, w, t[:3], b), ValueError, "target must have shape"),
        (lambda: (h, w, t.bool(), b), TypeError, "target must be integer class indices"),  # int32 is accepted
        (lambda: (h, w, t, b[:4]), ValueError, "linear_bias must have shape"),
        (lambda: (h, w, t, b.double()), TypeError, "linear_bias must have"),
        (lambda: ("x", w, t, b), TypeError, "input must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_bad_tensors_raise_naming_the_argument(device, case):
    make, exc, match = _bad_cases(device)[case]
    h, w, t, b = make()
    with pytest.raises(exc, match=match):
        fusedtrain.linear_spherical_loss(h, w, t, linear_bias=b)


@pytest.mark.parametrize("kwargs, match", [(dict(kind="softmax"), "kind"), (dict(reduction="avg"), "reduction"),
                                           (dict(a=0.0), "a must be"), (dict(kind="spherical", eps=0.0), "eps"),
                                           (dict(b=float("nan")), "b must be")])
def test_bad_hyperparameters_raise(device, kwargs, match):
    h, w, b, t = make_case(4, 3, 5, device)
    with pytest.raises(ValueError, match=match):
        fusedtrain.linear_spherical_loss(h, w, t, linear_bias=b, **kwargs)
    with pytest.raises(ValueError, match=match):
        fusedtrain.nn.LinearSphericalLoss(**kwargs)


def test_compiled_op_checks_arguments_too(device, needs_kernels):
    """The C++ op checks what the Python wrapper is bypassed for: stale or foreign statistics."""
    h, w, b, t = make_case(4, 3, 5, device)
    gram, colsum = fusedtrain.linear_spherical_stats(w, b)
    op = torch.ops.fusedtrain.linear_spherical_loss

    def call(**change):
        args = dict(input=h, linear_weight=w, linear_bias=b, target=t, gram=gram, colsum=colsum)
        args.update(change)
        return op(args["input"], args["linear_weight"], args["linear_bias"], args["target"], args["gram"],
                  args["colsum"], "z", 0.05, 20.0, 1e-6, 1e-6, -100, "mean", True)

    for change, match in [(dict(linear_bias=None), "gram must have shape"), (dict(colsum=colsum[:3]), "colsum"),
                          (dict(gram=gram.double()), "gram must be"), (dict(input=h[:, :2]), "input must have"),
                          (dict(target=t[:2]), "target must have"), (dict(linear_bias=b[:2]), "linear_bias")]:
        with pytest.raises((ValueError, TypeError), match=match):
            call(**change)
    with pytest.raises(ValueError, match="kind"):
        op(h, w, b, t, gram, colsum, "softmax", 0.05, 20.0, 1e-6, 1e-6, -100, "mean", True)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_and_cuda_agree(kind, dtype):
    h, w, b, t = make_case(300, 96, 2000, "cpu", dtype)
    cpu_loss, cpu_grads = loss_and_grads(fusedtrain.linear_spherical_loss, h, w, b, t, kind=kind)
    cuda_loss, cuda_grads = loss_and_grads(fusedtrain.linear_spherical_loss, h.cuda(), w.cuda(), b.cuda(),
                                           t.cuda(), kind=kind)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(cuda_loss.cpu(), cpu_loss) <= tol
    for g_cuda, g_cpu in zip(cuda_grads, cpu_grads):
        assert rel_err(g_cuda.cpu(), g_cpu) <= tol


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_inputs_on_different_devices_raise():
    h, w, b, t = make_case(4, 3, 5, "cuda")
    with pytest.raises(ValueError, match="target is on"):
        fusedtrain.linear_spherical_loss(h, w, t.cpu(), linear_bias=b)


# Non-finite and huge values: NaN/inf in any operand reaches the loss and every gradient; a huge
# weight gives the right loss or inf/NaN (its Gram matrix, ~|W|²·D, overflows fp32 beyond ~1e19).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["input", "weight", "bias", "gram", "colsum"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_operand_reaches_loss_and_gradients(device, needs_kernels, dtype, kind, where, value):
    h, w, b, t = make_case(12, 8, 30, device, dtype, ignore=False)
    stats = tuple(x.clone() for x in fusedtrain.linear_spherical_stats(w, b))
    {"input": h, "weight": w, "bias": b, "gram": stats[0], "colsum": stats[1]}[where].view(-1)[3] = value
    kw = {"stats": stats} if where in ("gram", "colsum") else {}  # else from the planted weight
    for reduction in REDUCTIONS:
        loss, grads = loss_and_grads(fusedtrain.linear_spherical_loss, h, w, b, t, kind=kind,
                                     reduction=reduction, **kw)
        assert not torch.isfinite(loss).all(), (reduction, loss)
        assert all(not torch.isfinite(g).all() for g in grads), (reduction, grads)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("huge", ["row", 1e15, 1e30, 3e38])
def test_huge_weight_right_or_non_finite(device, needs_kernels, kind, huge):
    h, w, b, t = make_case(12, 8, 30, device, ignore=False)
    if huge == "row":
        w *= 2.0**50  # every logit ~1e15, the Gram matrix ~1e30·D still within fp32
    else:
        w[3, 2] = huge
    loss, grads = loss_and_grads(fusedtrain.linear_spherical_loss, h, w, b, t, kind=kind, reduction="none")
    ref, ref_grads = loss_and_grads(reference, h.double(), w.double(), b.double(), t, kind=kind, reduction="none")
    wrong = torch.isfinite(loss) & ((loss.double() - ref).abs() > 1e-4 * ref.abs())
    assert not wrong.any(), (loss, ref)  # the issue: 1e30 gave softplus(a·b)/a = 26.27 for every row
    if huge in ("row", 1e15):  # right values (one 1e15 weight saturates the gradients: loss only)
        assert torch.isfinite(loss).all()
    if huge == "row":
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) <= 1e-4, (rel_err(g, r), g, r)
    if not torch.isfinite(loss).all():
        assert all(not torch.isfinite(g).all() for g in grads)
