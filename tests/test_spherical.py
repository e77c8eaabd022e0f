"""fusedtrain.spherical_loss against the float64 reference (fusedtrain.reference.spherical).

Values and gradients for every kind x reduction x dtype over odd, empty and long shapes; ignore_index;
targets; numerics; layouts; autograd plumbing; gradcheck, opcheck, torch.compile; errors; CPU/CUDA
agreement. Every test runs on "cpu" and (marked `cuda`, skipped without a GPU) on "cuda" with the same
assertions. Without a build, the public API runs the reference, so those tests still run (trivially
for the numerics) while the ones that need the compiled op skip.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fusedtrain
from fusedtrain.reference.spherical import spherical_loss as reference

from spherical_helpers import check_rows_non_finite, make_case, plant_non_finite
from utils import (HAS_CUDA, assert_compiles_like_eager, dtype_tolerances, kernels_built,
                   nan_filled_allocations, rel_err)

KINDS = ["z", "spherical", "taylor", "mse"]
REDUCTIONS = ["mean", "sum", "none"]

# (N, D), chosen for the kernels' paths. CUDA, by fp32 row bytes: <= 128 B go 8 lanes a row (D = 1,
# 2, 3, 7; 5 with N = 100 > 32 rows a block; 32 on the edge), <= 4 KiB a warp (33 just past the edge,
# 257, 1000), longer a block (1025 just past 4 KiB and 4099: 256 threads; 20000: 512 threads with the
# whole row cached in shared memory). Odd D never fills whole 16-byte vectors. CPU: SIMD tails
# (D < 8, odd D), several rows per parallel_for chunk. Plus an empty batch and single rows.
SHAPES = [(5, 1), (6, 2), (9, 3), (17, 7), (100, 5), (40, 32), (40, 33), (1, 1), (1, 257),
          (33, 1000), (4, 1025), (8, 4099), (2, 20000), (0, 10)]
# Block of 1024 threads, the row longer than the shared-memory cache (part cached, part re-read).
LARGE = (64, 70000)

# fp64 kernels vs the fp64 reference: only summation order differs.
# fp32 kernels accumulate in fp32 over at most 7e4 terms against the fp64 reference on the same
# (upcast) inputs; 1e-5 is the project's bar, well above that rounding.
TOLERANCES = dtype_tolerances(fp32=1e-5)


def random_scalar(device) -> torch.Tensor:
    """A random upstream gradient for a scalar loss, |g| in [0.5, 4), either sign (never 1)."""
    sign = 1.0 if torch.rand(()) < 0.5 else -1.0
    return (sign * (0.5 + 3.5 * torch.rand((), dtype=torch.float64))).to(device)


def loss_and_grad(fn, logits, target, kind, reduction, upstream=None, **kw):
    """Loss and d(sum(loss * upstream))/dlogits; `upstream` None means loss.backward().

    `logits.detach()` keeps the layout (strides, storage offset) the test built; a clone would not.
    """
    x = logits.detach().requires_grad_()
    loss = fn(x, target, kind, reduction=reduction, **kw)
    (loss.backward() if upstream is None else (loss * upstream.to(loss.dtype)).sum().backward())
    return loss.detach(), x.grad


def check_against_reference(logits, target, kind, reduction, upstream=None, loss_tol=1e-5,
                            grad_tol=1e-5, **kw):
    """Ours on `logits` vs the reference in float64 on the same (upcast) values."""
    # One or two classes: the losses/gradients cancel to ~0 (spherical, Taylor at D = 1; the Z-loss
    # gradient at D = 2, where z_c = ±1 whatever the logits), so compare absolute errors there
    # (make_case keeps the cancelling terms O(1) for D <= 2).
    floor = 1.0 if logits.shape[1] <= 2 else 1e-300
    loss, grad = loss_and_grad(fusedtrain.spherical_loss, logits, target, kind, reduction,
                               upstream, **kw)
    up64 = None if upstream is None else upstream.double()
    ref_loss, ref_grad = loss_and_grad(reference, logits.double(), target, kind, reduction, up64, **kw)
    assert loss.dtype == logits.dtype and loss.shape == ref_loss.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    if logits.shape[0] == 0 or (target == kw.get("ignore_index", -100)).all():
        # No kept rows: mean is NaN (0/0) and sum 0, as F.cross_entropy; the gradient is empty/zero.
        torch.testing.assert_close(loss.double(), ref_loss, equal_nan=True)
        assert (grad == 0).all()
        return loss, grad, ref_loss, ref_grad
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref_loss, floor) <= loss_tol, (rel_err(loss, ref_loss, floor), loss_tol)
    assert rel_err(grad, ref_grad, floor) <= grad_tol, (rel_err(grad, ref_grad, floor), grad_tol)
    return loss, grad, ref_loss, ref_grad


def upstreams_for(reduction, n, device):
    """none: a random per-row upstream gradient; mean/sum: loss.backward() and a random scalar
    (the fused path skips the scaling for 1 and must apply anything else)."""
    if reduction == "none":
        return [torch.randn(n, device=device)]
    return [None, random_scalar(device)]


# ---------------------------------------------------------------------------------------------
# Values and gradients against the float64 reference

@pytest.mark.parametrize("dtype, tol", TOLERANCES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_float64_reference(device, dtype, tol, kind, reduction, shape):
    n, d = shape
    logits, target = make_case(n, d, device, dtype)
    for upstream in upstreams_for(reduction, n, device):
        check_against_reference(logits, target, kind, reduction, upstream, tol, tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_long_rows_match_reference(device, kind, reduction):
    logits, target = make_case(*LARGE, device)
    target[::7] = -100
    for upstream in upstreams_for(reduction, LARGE[0], device):
        check_against_reference(logits, target, kind, reduction, upstream)


def test_long_rows_float64(device):
    # fp64 rows of 560 KB: a different share of the row fits the CUDA shared-memory cache.
    logits, target = make_case(4, 70001, device, torch.float64)
    check_against_reference(logits, target, "z", "mean", None, 1e-10, 1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(64, 7), (32, 1000), (4, 20000)], ids=["7", "1000", "20000"])
def test_half_precision_within_twice_pytorch_error(device, dtype, kind, reduction, shape):
    # Bar: our error against the float64 reference (on the same low-precision values) is at most
    # 2x the error of the same computation done by PyTorch in that dtype, i.e. the reference run on
    # the bf16/fp16 tensors with its autograd gradient. Ours accumulates in fp32 and rounds once,
    # so it sits at about one output rounding (under 1 eps). The floor of eps (twice the
    # half-ulp of one correctly rounded output, so ties cannot flake) covers the cases where
    # PyTorch's own rounding happens to be exact, e.g. a scalar mean loss; where PyTorch overflows
    # (fp16 mse: Σo² > 65504 gives inf) only the floor is left as the bar.
    logits, target = make_case(*shape, device, dtype, scale=1.0)
    upstream = torch.rand(shape[0], device=device) + 0.5 if reduction == "none" else None
    ours = loss_and_grad(fusedtrain.spherical_loss, logits, target, kind, reduction, upstream)
    theirs = loss_and_grad(reference, logits, target, kind, reduction, upstream)
    exact = loss_and_grad(reference, logits.double(), target, kind, reduction,
                          None if upstream is None else upstream.double())
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    floor = torch.finfo(dtype).eps
    for what, mine, torch_half, ref in zip(("loss", "grad"), ours, theirs, exact):
        torch_err = rel_err(torch_half, ref)
        bar = (2 * torch_err if math.isfinite(torch_err) else 0.0) + floor
        assert rel_err(mine, ref) <= bar, (what, rel_err(mine, ref), torch_err)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(device, kind, reduction):
    logits, target = make_case(4, 5, device, torch.float64)
    target[2] = -100
    x = logits.requires_grad_()
    fn = lambda t: fusedtrain.spherical_loss(t, target, kind, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_double_backward_refused(device, needs_kernels):
    # The kernels' gradient carries no graph: create_graph=True must fail loudly, not return a
    # gradient whose second-order terms are silently zero.
    logits, target = make_case(4, 5, device, torch.float64)
    loss = fusedtrain.spherical_loss(logits.requires_grad_(), target, "z")
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, logits, create_graph=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_output_element_written(device, kind, reduction):
    # Outputs are allocated NaN-filled (see nan_filled_allocations), then compared element by
    # element, not in norm: catches unwritten (ignored rows included), misplaced or stale entries.
    # Tolerances: each gradient element is α + β·o_k (+ γ at the target) with coefficients good to
    # fp32 rounding, relative to the element where it is not itself a cancellation and relative to
    # the largest element where it is: hence rtol 1e-5 and atol 1e-5·max|ref|.
    with nan_filled_allocations():
        assert torch.empty(8, device=device).isnan().all()  # the poisoning itself works
    logits, target = make_case(24, 257, device)
    target[::5] = -100
    upstream = torch.randn(24, device=device) if reduction == "none" else random_scalar(device)
    with nan_filled_allocations():
        loss, grad = loss_and_grad(fusedtrain.spherical_loss, logits, target, kind, reduction, upstream)
    ref_loss, ref_grad = loss_and_grad(reference, logits.double(), target, kind, reduction,
                                       upstream.double())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5 * ref_loss.abs().max().item())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())


def test_no_grad_forward(device):
    logits, target = make_case(8, 100, device)
    with torch.no_grad():
        loss = fusedtrain.spherical_loss(logits.requires_grad_(), target)
    assert rel_err(loss, reference(logits.double(), target)) < 1e-5
    loss = fusedtrain.spherical_loss(logits.detach(), target, "taylor", reduction="none")
    assert not loss.requires_grad
    assert rel_err(loss, reference(logits.double(), target, "taylor", reduction="none")) < 1e-5


# ---------------------------------------------------------------------------------------------
# ignore_index and targets

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignored_rows_have_zero_loss_and_gradient(device, reduction):
    logits, target = make_case(12, 50, device)
    target[::3] = -100
    upstream = torch.rand(12, device=device) + 0.5 if reduction == "none" else random_scalar(device)
    loss, grad = loss_and_grad(fusedtrain.spherical_loss, logits, target, "z", reduction, upstream)
    ignored = target == -100
    if reduction == "none":
        assert (loss[ignored] == 0).all() and (loss[~ignored] != 0).all()
    assert (grad[ignored] == 0).all()
    assert (grad[~ignored] != 0).any(dim=1).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ignore_index", [3, -1])
def test_custom_ignore_index(device, kind, ignore_index):
    logits, target = make_case(20, 10, device, ignore=False)
    target[::4] = ignore_index
    for reduction in REDUCTIONS:
        for upstream in upstreams_for(reduction, 20, device):
            check_against_reference(logits, target, kind, reduction, upstream, ignore_index=ignore_index)
    # -100 is an ordinary (out-of-range) class index once ignore_index is something else.
    target[1] = -100
    with pytest.raises((ValueError, RuntimeError), match="target"):
        fusedtrain.spherical_loss(logits, target, kind, ignore_index=ignore_index)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_like_cross_entropy(device, kind, reduction):
    logits, _ = make_case(6, 9, device)
    target = torch.full((6,), -100, device=device)
    up = torch.rand(6, device=device) if reduction == "none" else None
    loss, grad = loss_and_grad(fusedtrain.spherical_loss, logits, target, kind, reduction, up)
    ce_loss, ce_grad = loss_and_grad(lambda x, t, k, reduction: F.cross_entropy(x, t, reduction=reduction),
                                     logits, target, kind, reduction, up)
    torch.testing.assert_close(loss, ce_loss, equal_nan=True)  # mean: NaN, sum: 0, none: zeros
    torch.testing.assert_close(grad, ce_grad)  # what F.cross_entropy gives: zeros, finite
    assert torch.isfinite(grad).all() and (grad == 0).all()


@pytest.mark.parametrize("requires_grad", [False, True], ids=["forward", "fused-grad"])
@pytest.mark.parametrize("bad", [10, 11, 2**40, -1, -2, -101])
def test_out_of_range_target_raises(device, bad, requires_grad):
    logits, target = make_case(8, 10, device)
    target[5] = bad
    with pytest.raises((ValueError, RuntimeError), match="target"):
        fusedtrain.spherical_loss(logits.requires_grad_(requires_grad), target)
    # The error leaves the device usable (on CUDA: no sticky device-side assert).
    target[5] = 4
    check_against_reference(logits.detach(), target, "z", "mean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unchecked_out_of_range_target_gives_nan_rows(device, needs_kernels, reduction):
    # check_target=False (no host sync on CUDA): the bad row's loss and gradient are NaN, the other
    # rows are untouched.
    logits, target = make_case(8, 10, device, ignore=False)
    target[5] = 10
    good = torch.arange(8, device=device) != 5
    x = logits.clone().requires_grad_()
    loss = fusedtrain.spherical_loss(x, target, reduction=reduction, check_target=False)
    (loss.sum() if reduction == "none" else loss).backward()
    assert torch.isnan(x.grad[5]).all() and torch.isfinite(x.grad[good]).all()
    if reduction == "none":
        assert torch.isnan(loss[5])
        ref_loss, ref_grad = loss_and_grad(reference, logits[good].double(), target[good], "z", "none",
                                           torch.ones(7, dtype=torch.float64, device=device))
        assert rel_err(loss[good], ref_loss) < 1e-5 and rel_err(x.grad[good], ref_grad) < 1e-5
    else:
        assert torch.isnan(loss)


# ---------------------------------------------------------------------------------------------
# Numerics

@pytest.mark.parametrize("std, offset", [(1.0, 1e3), (1.0, 1e4), (1e3, 1e4)])
def test_z_loss_large_common_offset(device, needs_kernels, std, offset):
    # The Z-loss is shift invariant. The float64 reference sees the very same fp32 values, so input
    # rounding is no error here: only the kernel's own arithmetic counts. Statistics taken about a
    # shift within the row keep o − shift exact and lose nothing to the offset; a one-pass fp32
    # Σo²/D − μ² loses (offset/std)²·2^-24 of σ² (6e-2 at offset/std = 1e3).
    # 1e-4 leaves room for fp32 accumulation over the row and still rejects the naive formula.
    # Kernels only: the reference fallback *is* that formula (a float64 oracle, not an fp32 kernel).
    logits = torch.randn(16, 500, dtype=torch.float64) * std + offset
    logits[3] = offset  # a constant row: the variance clamps to 0, var_eps keeps it finite
    logits = logits.to(device=device, dtype=torch.float32)
    target = torch.randint(0, 500, (16,), device=device)
    for reduction in REDUCTIONS:
        upstream = torch.rand(16, device=device) + 0.5 if reduction == "none" else random_scalar(device)
        check_against_reference(logits, target, "z", reduction, upstream, 1e-4, 1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_large_magnitude_logits(device, kind):
    # Logits of size ~1e3 (Σo² ~ 3e8 per row): fp32 still has ~1e-7 relative precision to spare.
    logits, target = make_case(16, 300, device, scale=1e3)
    check_against_reference(logits, target, kind, "mean")
    check_against_reference(logits, target, kind, "none", torch.randn(16, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_constant_rows_z_loss(device, dtype):
    # Every row constant: σ² = 0 exactly, so σ = sqrt(var_eps); z_c = 0, loss = softplus(a·b)/a.
    # (In fp32 the reference fallback's Σo²/D − μ² leaves a rounding residue ≫ var_eps: kernels only.)
    if dtype == torch.float32 and not kernels_built(device):
        pytest.skip(f"no compiled {device} kernel: the fp32 reference is not exact for constant rows")
    logits = (torch.randn(6, 1, dtype=torch.float64) * 3).expand(6, 40).to(device=device, dtype=dtype)
    target = torch.randint(0, 40, (6,), device=device)
    loss, *_ = check_against_reference(logits, target, "z", "none", torch.randn(6, device=device))
    expected = F.softplus(torch.tensor(0.05 * 20.0, dtype=torch.float64)) / 0.05
    torch.testing.assert_close(loss.double().cpu(), expected.expand(6), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# Layouts

def test_row_strided_logits(device):
    wide = torch.randn(9, 1500, device=device)
    logits = wide[:, 3:1203]  # column slice: row stride 1500 != D, rows not 16-byte aligned
    assert not logits.is_contiguous()
    target = torch.randint(0, 1200, (9,), device=device)
    for reduction in REDUCTIONS:
        for upstream in upstreams_for(reduction, 9, device):
            check_against_reference(logits, target, "z", reduction, upstream)


def test_transposed_logits(device):
    logits = torch.randn(700, 12, device=device).t()  # column-major view: stride(1) != 1
    target = torch.randint(0, 700, (12,), device=device)
    for reduction in REDUCTIONS:
        for upstream in upstreams_for(reduction, 12, device):
            check_against_reference(logits, target, "spherical", reduction, upstream)


@pytest.mark.parametrize("d", [1001, 1024])
def test_misaligned_storage_offset(device, d):
    # Storage offset of one element: no row starts on a 16-byte boundary (vector loads must not
    # assume it), even when D itself is a multiple of the vector width.
    storage = torch.randn(8 * d + 1, device=device)
    logits = storage[1:].view(8, d)
    assert logits.storage_offset() == 1
    target = torch.randint(0, d, (8,), device=device)
    for reduction in REDUCTIONS:
        for upstream in upstreams_for(reduction, 8, device):
            check_against_reference(logits, target, "z", reduction, upstream)


def test_broadcast_rows(device):
    # Row stride 0 (one row expanded): every row reads the same memory; autograd sums the gradient.
    logits = torch.randn(1, 65, device=device).expand(10, 65)
    target = torch.randint(0, 65, (10,), device=device)
    check_against_reference(logits, target, "taylor", "none", torch.randn(10, device=device))


def test_strided_target(device):
    logits, _ = make_case(10, 30, device)
    target = torch.randint(0, 30, (20,), device=device)[::2]
    assert not target.is_contiguous()
    for reduction in REDUCTIONS:
        for upstream in upstreams_for(reduction, 10, device):
            check_against_reference(logits, target, "mse", reduction, upstream)


@pytest.mark.parametrize("kind", KINDS)
def test_extra_dimensions_like_cross_entropy(device, kind):
    logits = torch.randn(3, 11, 4, 2, device=device)  # (N, D, d1, d2) as F.cross_entropy takes
    target = torch.randint(0, 11, (3, 4, 2), device=device)
    target[0, 1, 1] = -100
    for reduction in REDUCTIONS:
        upstream = torch.randn(3, 4, 2, device=device) if reduction == "none" else random_scalar(device)
        loss, *_ = check_against_reference(logits, target, kind, reduction, upstream)
        assert loss.shape == ((3, 4, 2) if reduction == "none" else ())


# ---------------------------------------------------------------------------------------------
# Autograd plumbing

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice_with_retain_graph(device, reduction):
    # mean/sum: the first backward hands autograd the gradient written in forward (scaled in place);
    # the second must rebuild it, not rescale or reuse that buffer (which is now x.grad).
    logits, target = make_case(8, 100, device)
    x = logits.clone().requires_grad_()
    loss = fusedtrain.spherical_loss(x, target, reduction=reduction)
    weight = torch.randn(8, device=device) if reduction == "none" else random_scalar(device).float()
    out = (loss * weight).sum()
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    _, ref_grad = loss_and_grad(reference, logits.double(), target, "z", reduction, weight.double())
    assert rel_err(first, ref_grad) < 1e-5


def test_gradient_accumulates_over_steps(device):
    # Two forward/backward passes without zeroing: x.grad holds the sum of both.
    logits, target = make_case(8, 100, device)
    x = logits.clone().requires_grad_()
    fusedtrain.spherical_loss(x, target).backward()
    first = x.grad.clone()
    fusedtrain.spherical_loss(x, target, reduction="sum").backward()
    _, ref_sum = loss_and_grad(reference, logits.double(), target, "z", "sum")
    assert rel_err(x.grad - first, ref_sum) < 1e-5


def test_logits_used_by_two_losses(device):
    logits, target = make_case(8, 100, device)
    x = logits.clone().requires_grad_()
    (fusedtrain.spherical_loss(x, target) + 0.5 * fusedtrain.spherical_loss(x, target, "taylor")
     + (x * x).mean()).backward()
    x64 = logits.double().requires_grad_()
    (reference(x64, target) + 0.5 * reference(x64, target, "taylor") + (x64 * x64).mean()).backward()
    assert rel_err(x.grad, x64.grad) < 1e-5


def test_gradient_flows_through_earlier_ops(device):
    # Logits that are not a leaf (a linear layer): the gradient reaches the weight. In float64, so
    # that ours and the reference see the same logits (fp32 matmul rounding would otherwise be
    # amplified by the spherical loss's 1/o_c sensitivity).
    h = torch.randn(16, 32, device=device, dtype=torch.float64)
    w = torch.randn(50, 32, device=device, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (16,), device=device)
    fusedtrain.spherical_loss(h @ w.t(), target, "spherical").backward()
    w64 = w.detach().clone().requires_grad_()
    reference(h @ w64.t(), target, "spherical").backward()
    assert rel_err(w.grad, w64.grad) < 1e-10


def test_module_equals_functional(device):
    logits, target = make_case(8, 100, device, ignore=False)
    target[3] = 7
    criterion = fusedtrain.nn.SphericalLoss("z", a=0.1, b=10.0, ignore_index=7, reduction="sum")
    torch.testing.assert_close(criterion(logits, target), fusedtrain.spherical_loss(
        logits, target, "z", a=0.1, b=10.0, ignore_index=7, reduction="sum"))
    for kind in KINDS:
        torch.testing.assert_close(fusedtrain.nn.SphericalLoss(kind, reduction="none")(logits, target),
                                   fusedtrain.spherical_loss(logits, target, kind, reduction="none"))
    text = repr(criterion)
    assert "SphericalLoss" in text and "kind='z'" in text and "a=0.1" in text and "b=10.0" in text
    assert "ignore_index=7" in text and "reduction='sum'" in text
    assert "eps=" in repr(fusedtrain.nn.SphericalLoss("spherical"))


# ---------------------------------------------------------------------------------------------
# The compiled op: opcheck and torch.compile

@pytest.mark.parametrize("compute_grad", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(device, needs_kernels, compute_grad, reduction):
    logits, target = make_case(6, 37, device)
    args = (logits.requires_grad_(), target, "z", 0.05, 20.0, 1e-6, 1e-6, -100, reduction,
            compute_grad, True)
    if compute_grad and reduction == "none":
        # The public API never asks for this (the per-row upstream gradient is only known in
        # backward), but the op is public: it must either refuse the combination up front, naming
        # the argument, or support it end to end (autograd included), which opcheck verifies.
        try:
            torch.ops.fusedtrain.spherical_loss(*args)
        except (ValueError, RuntimeError) as exc:
            assert "compute_grad" in str(exc)
            return
    torch.library.opcheck(torch.ops.fusedtrain.spherical_loss, args)


def test_opcheck_backward_ops(device, needs_kernels):
    logits, target = make_case(6, 37, device)
    _, grad, coef = torch.ops.fusedtrain.spherical_loss(logits, target, "z", 0.05, 20.0, 1e-6, 1e-6,
                                                        -100, "none", False, True)
    assert grad.numel() == 0 and coef.shape == (6, 4)
    torch.library.opcheck(torch.ops.fusedtrain._spherical_loss_backward,
                          (torch.rand(6, device=device), logits, target, coef, -100))
    torch.library.opcheck(torch.ops.fusedtrain._spherical_loss_backward,
                          (torch.rand((), device=device), logits, target, coef, -100))
    torch.library.opcheck(torch.ops.fusedtrain._scale_grad_,
                          (torch.randn(6, 37, device=device), torch.rand((), device=device)))


def test_compiled_op_gradient_output(device, needs_kernels):
    # compute_grad=True: the forward's gradient output is d(loss)/d(logits) itself.
    logits, target = make_case(6, 37, device)
    for reduction in ("mean", "sum"):
        _, grad, _ = torch.ops.fusedtrain.spherical_loss(logits, target, "taylor", 0.05, 20.0, 1e-6,
                                                         1e-6, -100, reduction, True, True)
        _, ref_grad = loss_and_grad(reference, logits.double(), target, "taylor", reduction)
        assert rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(device, needs_kernels, backend):
    # The reference fallback is not meant to compile with fullgraph (its one-time warning and its
    # data-dependent target check break the graph): the compiled op is what must trace.
    # aot_eager traces through the fake kernels and the autograd formula; inductor also generates
    # and compiles code (many seconds with a cold cache), hence `slow`.
    logits, target = make_case(16, 257, device)
    weight = torch.rand(16, device=device)

    def loss_fn(x, t, fn=fusedtrain.spherical_loss):  # inside a compiled region, with ops around it
        return (fn(2.0 * x, t, "z") + fn(x, t, "mse", reduction="sum")
                + (fn(x, t, "taylor", reduction="none") * weight.to(x.dtype)).sum())

    (grad,) = assert_compiles_like_eager(loss_fn, [logits], target, backend=backend)
    x64 = logits.double().requires_grad_()
    loss_fn(x64, target, reference).backward()
    assert rel_err(grad, x64.grad) < 1e-5


# ---------------------------------------------------------------------------------------------
# CPU / CUDA agreement

@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(200, 7), (64, 1000), (8, 40000)], ids=["7", "1000", "40000"])
def test_cpu_and_cuda_agree(kind, reduction, shape):
    # Both accumulate in fp32 in different orders: the differences are a few fp32 ulps of the row
    # statistics, well inside rtol 1e-5 (loss) and 1e-4 elementwise (gradient, whose elements can
    # be small differences of α and β·o_k).
    logits, target = make_case(*shape, "cpu")
    up = torch.randn(shape[0]) if reduction == "none" else torch.tensor(1.7)
    cpu_loss, cpu_grad = loss_and_grad(fusedtrain.spherical_loss, logits, target, kind, reduction, up)
    gpu_loss, gpu_grad = loss_and_grad(fusedtrain.spherical_loss, logits.cuda(), target.cuda(), kind,
                                       reduction, up.cuda())
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, rtol=1e-4,
                               atol=1e-6 * cpu_grad.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Non-finite and huge logits: NaN/inf in gives NaN/inf out; huge finite rows give the right value

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_logit_gives_non_finite_row(device, dtype, kind, value):
    logits, target = make_case(6, 40, device, dtype, ignore=False)
    bad = plant_non_finite(logits, target, value)
    for reduction in REDUCTIONS:
        up = torch.ones(6, device=device) if reduction == "none" else None
        check_rows_non_finite(*loss_and_grad(fusedtrain.spherical_loss, logits, target, kind, reduction, up),
                              bad, reduction)


def check_rows_against(loss, grad, ref_loss, ref_grad, reduction, scale=1.0, tol=1e-5):
    """Row by row (a huge row's tiny gradient must be right too); a loss beyond the dtype's range
    must be inf, as the float64 value rounds."""
    for ours, ref, s in ((loss, ref_loss, 1.0), (grad, ref_grad, scale)):
        ours, inf = ours.double() * s, torch.isinf(ref.to(ours.dtype))
        assert torch.equal(torch.isinf(ours), inf), (ours, ref)
        for r in range(ours.shape[0]) if ours.dim() else [Ellipsis]:
            assert rel_err(ours[r][~inf[r]], ref[r][~inf[r]]) <= tol, (r, ours[r], ref[r])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_huge_logits_fp32_match_float64(device, needs_kernels, kind, reduction):
    # The case: one logit of 1e20 (or 1e30) made the fp32 Z-loss 26.27 (truth 24.1), 1e32.
    logits, target = make_case(6, 300, device, ignore=False)
    for r, v in enumerate([1e20, 1e30, -1e37, 3e38]):
        logits[r, (target[r] + 1 + r) % 300] = v
    logits[4, :150] *= 1e25      # half a row huge, the target among them
    target[4] = 7
    logits[5] *= 1e30            # a whole row of huge logits
    up = torch.rand(6, device=device) + 0.5 if reduction == "none" else random_scalar(device)
    loss, grad = loss_and_grad(fusedtrain.spherical_loss, logits, target, kind, reduction, up)
    ref = loss_and_grad(reference, logits.double(), target, kind, reduction, up.double())
    check_rows_against(loss, grad, *ref, reduction)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_huge_logits_fp64_by_homogeneity(device, needs_kernels, kind, reduction):
    # x = 2^600·y: q ~ 2^1200 overflows fp64. Exactly (powers of two): the Z-loss of x (var_eps 0)
    # is that of y, the spherical loss of x with eps that of y with eps·2^-1200 (~0), and its
    # gradient 2^-600 times y's; the Taylor loss tends to the spherical one with eps 0.
    y, target = make_case(6, 300, device, torch.float64, ignore=False)
    y[0, (target[0] + 1) % 300] = 1e6
    x = y * 2.0**600
    up = torch.rand(6, device=device, dtype=torch.float64) + 0.5 if reduction == "none" else None
    kw = {"var_eps": 0.0} if kind == "z" else {}
    loss, grad = loss_and_grad(fusedtrain.spherical_loss, x, target, kind, reduction, up, **kw)
    if kind == "mse":  # its loss overflows as the truth does; its gradient 2(x − e_c) does not
        ref = loss_and_grad(reference, x, target, kind, reduction, up)
        return check_rows_against(loss, grad, *ref, reduction, tol=1e-12)
    ref_kind, kw = ("z", kw) if kind == "z" else ("spherical", {"eps": 0.0})
    ref = loss_and_grad(reference, y, target, ref_kind, reduction, up, **kw)
    check_rows_against(loss, grad, *ref, reduction, scale=2.0**600, tol=1e-12)
