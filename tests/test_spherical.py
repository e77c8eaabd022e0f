"""spherical_loss against the float64 reference: values, gradients, reductions, ignore_index,
dtypes, layouts, errors, gradcheck, opcheck, torch.compile, CPU/CUDA agreement."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedtrain
from fusedtrain.reference.spherical import spherical_loss as reference

from conftest import HAS_CUDA, kernels_built

KINDS = ["z", "spherical", "taylor", "mse"]
REDUCTIONS = ["mean", "sum", "none"]
# (N, D): D = 1 and 2, odd D (no 16-byte vectors), warp-per-row (<= 4 KiB rows), block-per-row
# (with and without the shared-memory row cache), an empty batch and a single row.
SHAPES = [(5, 1), (6, 2), (9, 3), (17, 7), (33, 1000), (8, 4099), (0, 10), (1, 257)]
LARGE = (6, 70001)  # block of 1024 threads, row longer than the shared-memory cache


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    """‖a − b‖ / max(‖b‖, floor). A floor of 1 turns it into an absolute error for results that
    cancel to ~0 (one class: the spherical and Taylor losses are log(x) − log(x) = 0)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item() if b.numel() else 0.0


def make_case(n, d, device, dtype=torch.float32, ignore=True, scale=2.0):
    logits = (torch.randn(n, d, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    target = torch.randint(0, d, (n,), device=device)
    if ignore and n > 2:
        target[1] = -100
    return logits, target


def loss_and_grad(fn, logits, target, kind, reduction, upstream=None, **kw):
    """Loss and d(sum(loss * upstream))/dlogits; `upstream` None means loss.backward()."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, target, kind, reduction=reduction, **kw)
    (loss.backward() if upstream is None else (loss * upstream.to(loss.dtype)).sum().backward())
    return loss.detach(), x.grad


def check_against_reference(logits, target, kind, reduction, upstream=None, loss_tol=1e-5,
                            grad_tol=1e-5, **kw):
    # One or two classes: the losses/gradients cancel to ~0 (spherical, Taylor at D = 1; the Z-loss
    # gradient at D = 2, where z_c = ±1 whatever the logits), so compare absolute errors there.
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
    assert rel_err(loss, ref_loss, floor) <= loss_tol, (rel_err(loss, ref_loss, floor), loss_tol)
    assert torch.isfinite(grad).all()
    assert rel_err(grad, ref_grad, floor) <= grad_tol, (rel_err(grad, ref_grad, floor), grad_tol)
    return loss, grad, ref_loss, ref_grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_float32_and_float64_match_reference(device, kind, reduction, shape):
    n, d = shape
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        logits, target = make_case(n, d, device, dtype)
        upstream = torch.randn(n, device=device) if reduction == "none" else None
        check_against_reference(logits, target, kind, reduction, upstream, tol, tol)


@pytest.mark.parametrize("kind", KINDS)
def test_long_rows_match_reference(device, kind):
    logits, target = make_case(*LARGE, device)
    check_against_reference(logits, target, kind, "mean")
    check_against_reference(logits, target, kind, "none", torch.randn(LARGE[0], device=device))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scalar_upstream_gradient_is_applied(device, reduction):
    # loss.backward() takes the no-op path of the fused gradient; 3.7 * loss must scale it.
    logits, target = make_case(16, 300, device)
    check_against_reference(logits, target, "z", reduction, torch.tensor(3.7, device=device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(32, 1000), (4, 20000)], ids=["1000", "20000"])
def test_half_precision_within_twice_pytorch_error(device, dtype, kind, shape):
    # Bar: our error against the float64 reference is at most 2x the error of the same
    # computation done by PyTorch in that dtype (the reference run on the low-precision tensors),
    # plus a small floor for the rare case where PyTorch's rounding happens to be near exact.
    logits, target = make_case(*shape, device, dtype, scale=1.0)
    ours_loss, ours_grad = loss_and_grad(fusedtrain.spherical_loss, logits, target, kind, "mean")
    torch_loss, torch_grad = loss_and_grad(reference, logits, target, kind, "mean")
    ref_loss, ref_grad = loss_and_grad(reference, logits.double(), target, kind, "mean")
    floor = 4 * torch.finfo(dtype).eps
    assert rel_err(ours_loss, ref_loss) <= 2 * rel_err(torch_loss, ref_loss) + floor
    assert rel_err(ours_grad, ref_grad) <= 2 * rel_err(torch_grad, ref_grad) + floor


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(device, kind, reduction):
    logits, target = make_case(4, 5, device, torch.float64)
    target[2] = -100
    x = logits.requires_grad_()
    fn = lambda t: fusedtrain.spherical_loss(t, target, kind, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_every_gradient_element_matches(device):
    # Element-wise, not just in norm: catches unwritten (poisoned) or misplaced entries.
    logits, target = make_case(40, 1031, device)
    _, grad, _, ref_grad = check_against_reference(logits, target, "z", "sum")
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# ignore_index and targets

def test_ignored_rows_have_zero_loss_and_gradient(device):
    logits, target = make_case(12, 50, device)
    target[::3] = -100
    loss, grad = loss_and_grad(fusedtrain.spherical_loss, logits, target, "z", "none",
                               torch.rand(12, device=device))
    ignored = target == -100
    assert (loss[ignored] == 0).all() and (loss[~ignored] != 0).all()
    assert (grad[ignored] == 0).all()


@pytest.mark.parametrize("ignore_index", [3, -1])
def test_custom_ignore_index(device, ignore_index):
    logits, target = make_case(20, 10, device, ignore=False)
    target[::4] = ignore_index
    check_against_reference(logits, target, "taylor", "mean", ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_like_cross_entropy(device, reduction):
    logits, _ = make_case(6, 9, device)
    target = torch.full((6,), -100, device=device)
    up = torch.rand(6, device=device) if reduction == "none" else None
    loss, grad = loss_and_grad(fusedtrain.spherical_loss, logits, target, "z", reduction, up)
    ce_loss, ce_grad = loss_and_grad(lambda x, t, k, reduction: F.cross_entropy(x, t, reduction=reduction),
                                     logits, target, "z", reduction, up)
    torch.testing.assert_close(loss, ce_loss, equal_nan=True)  # mean: NaN, sum: 0, none: zeros
    torch.testing.assert_close(grad, ce_grad)  # zeros, finite
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("bad", [10, 11, -2])
def test_out_of_range_target_raises(device, bad):
    logits, target = make_case(8, 10, device)
    target[5] = bad
    with pytest.raises((ValueError, RuntimeError), match="target"):
        fusedtrain.spherical_loss(logits, target)


def test_unchecked_out_of_range_target_gives_nan_rows(device, needs_kernels):
    logits, target = make_case(8, 10, device, ignore=False)
    target[5] = 10
    x = logits.clone().requires_grad_()
    loss = fusedtrain.spherical_loss(x, target, reduction="none", check_target=False)
    assert torch.isnan(loss[5]) and torch.isfinite(loss[torch.arange(8, device=device) != 5]).all()
    loss.sum().backward()
    assert torch.isnan(x.grad[5]).all()


# ---------------------------------------------------------------------------------------------
# Numerics and layouts

def test_large_offset_logits_z_loss(device):
    # The Z-loss is shift invariant; the kernels take the row statistics about o_c, so a common
    # offset of 1e3 over unit-variance rows costs no more than fp32 rounding of the inputs
    # themselves (~1e3 * 6e-8 relative to a unit spread, hence 1e-4).
    logits = torch.randn(16, 500, dtype=torch.float64) + 1e3
    logits[3] = 1e3  # a constant row: variance clamps to 0, var_eps keeps it finite
    logits = logits.to(device=device, dtype=torch.float32)
    target = torch.randint(0, 500, (16,), device=device)
    check_against_reference(logits, target, "z", "none", torch.rand(16, device=device), 1e-4, 1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_large_magnitude_logits(device, kind):
    logits, target = make_case(16, 300, device, scale=1e3)
    check_against_reference(logits, target, kind, "mean")


def test_row_strided_logits(device):
    wide = torch.randn(9, 1500, device=device)
    logits = wide[:, 3:1203]  # row stride 1500, rows not 16-byte aligned
    target = torch.randint(0, 1200, (9,), device=device)
    check_against_reference(logits, target, "z", "sum")


def test_transposed_logits(device):
    logits = torch.randn(700, 12, device=device).t()  # column-major: stride(1) != 1
    target = torch.randint(0, 700, (12,), device=device)
    check_against_reference(logits, target, "spherical", "mean")


def test_misaligned_storage_offset(device):
    storage = torch.randn(8 * 1001 + 1, device=device)
    logits = storage[1:].view(8, 1001)
    target = torch.randint(0, 1001, (8,), device=device)
    check_against_reference(logits, target, "z", "mean")


def test_strided_target(device):
    logits, _ = make_case(10, 30, device)
    target = torch.randint(0, 30, (20,), device=device)[::2]
    check_against_reference(logits, target, "mse", "mean")


def test_extra_dimensions_like_cross_entropy(device):
    logits = torch.randn(3, 11, 4, 2, device=device)
    target = torch.randint(0, 11, (3, 4, 2), device=device)
    target[0, 1, 1] = -100
    for reduction in REDUCTIONS:
        upstream = torch.rand(3, 4, 2, device=device) if reduction == "none" else None
        loss, *_ = check_against_reference(logits, target, "z", reduction, upstream)
        assert loss.shape == ((3, 4, 2) if reduction == "none" else ())


# ---------------------------------------------------------------------------------------------
# Autograd plumbing

def test_backward_twice_with_retain_graph(device):
    logits, target = make_case(8, 100, device)
    x = logits.clone().requires_grad_()
    loss = fusedtrain.spherical_loss(x, target)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_logits_used_by_two_losses(device):
    logits, target = make_case(8, 100, device)
    x = logits.clone().requires_grad_()
    (fusedtrain.spherical_loss(x, target) + 0.5 * fusedtrain.spherical_loss(x, target, "taylor")).backward()
    x64 = logits.double().requires_grad_()
    (reference(x64, target) + 0.5 * reference(x64, target, "taylor")).backward()
    assert rel_err(x.grad, x64.grad) < 1e-5


def test_no_grad_forward(device):
    logits, target = make_case(8, 100, device)
    with torch.no_grad():
        loss = fusedtrain.spherical_loss(logits.requires_grad_(), target)
    assert rel_err(loss, reference(logits.double(), target)) < 1e-5


def test_module_equals_functional(device):
    logits, target = make_case(8, 100, device)
    criterion = fusedtrain.nn.SphericalLoss("z", a=0.1, b=10.0, reduction="sum")
    torch.testing.assert_close(criterion(logits, target),
                               fusedtrain.spherical_loss(logits, target, "z", a=0.1, b=10.0, reduction="sum"))
    assert "kind='z'" in repr(criterion)


@pytest.mark.parametrize("compute_grad", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(device, needs_kernels, compute_grad, reduction):
    if compute_grad and reduction == "none":
        pytest.skip("compute_grad is only used with mean/sum")
    logits, target = make_case(6, 37, device)
    args = (logits.requires_grad_(), target, "z", 0.05, 20.0, 1e-6, 1e-6, -100, reduction,
            compute_grad, True)
    torch.library.opcheck(torch.ops.fusedtrain.spherical_loss, args)


def test_opcheck_backward(device, needs_kernels):
    logits, target = make_case(6, 37, device)
    _, _, coef = torch.ops.fusedtrain.spherical_loss(logits, target, "z", 0.05, 20.0, 1e-6, 1e-6,
                                                     -100, "none", False, True)
    args = (torch.rand(6, device=device), logits, target, coef, -100)
    torch.library.opcheck(torch.ops.fusedtrain._spherical_loss_backward, args)


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    logits, target = make_case(16, 257, device)

    def loss_fn(x, t):  # the loss inside a compiled region, with ops around it
        return fusedtrain.spherical_loss(2.0 * x, t, "z") + fusedtrain.spherical_loss(x, t, "mse", reduction="sum")

    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        l1, l2 = compiled(x1, target), loss_fn(x2, target)
        l1.backward()
        l2.backward()
        torch.testing.assert_close(l1, l2)
        torch.testing.assert_close(x1.grad, x2.grad)


# ---------------------------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: (torch.randn(4, 5, device=d), torch.zeros(4, dtype=torch.int32, device=d)), "target"),
        (lambda d: (torch.randn(4, 5, device=d), torch.zeros(4, device=d)), "target"),
        (lambda d: (torch.zeros(4, 5, dtype=torch.int64, device=d), torch.zeros(4, dtype=torch.long, device=d)), "logits"),
        (lambda d: (torch.randn(4, 5, device=d), torch.zeros(3, dtype=torch.long, device=d)), "target"),
        (lambda d: (torch.randn(5, device=d), torch.zeros(5, dtype=torch.long, device=d)), "logits"),
        (lambda d: (torch.randn(4, 0, device=d), torch.zeros(4, dtype=torch.long, device=d)), "logits"),
    ],
    ids=["target-int32", "target-float", "logits-int64", "target-shape", "logits-1d", "zero-classes"],
)
def test_bad_tensors_raise_naming_the_argument(device, make, match):
    logits, target = make(device)
    with pytest.raises((TypeError, ValueError), match=match):
        fusedtrain.spherical_loss(logits, target)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"kind": "softmax"}, "kind"), ({"reduction": "avg"}, "reduction"), ({"a": 0.0}, "a must"),
     ({"a": float("nan")}, "a must"), ({"kind": "spherical", "eps": 0.0}, "eps"),
     ({"var_eps": -1.0}, "var_eps"), ({"b": float("inf")}, "b must"), ({"ignore_index": 1.5}, "ignore_index")],
)
def test_bad_hyperparameters_raise(device, kwargs, match):
    logits, target = make_case(4, 5, device)
    with pytest.raises((TypeError, ValueError), match=match):
        fusedtrain.spherical_loss(logits, target, **kwargs)


def test_compiled_op_checks_arguments_too(needs_kernels, device):
    # The C++ op is public (torch.ops.fusedtrain.spherical_loss): it checks on its own.
    logits, target = make_case(4, 5, device)
    op = torch.ops.fusedtrain.spherical_loss
    with pytest.raises(ValueError, match="kind"):
        op(logits, target, "bad", 0.05, 20.0, 1e-6, 1e-6, -100, "mean", False, True)
    with pytest.raises(ValueError, match="a must"):
        op(logits, target, "z", -1.0, 20.0, 1e-6, 1e-6, -100, "mean", False, True)
    with pytest.raises(TypeError, match="target"):
        op(logits, target.int(), "z", 0.05, 20.0, 1e-6, 1e-6, -100, "mean", False, True)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_target_on_other_device_raises():
    logits = torch.randn(4, 5, device="cuda")
    with pytest.raises(ValueError, match="target"):
        fusedtrain.spherical_loss(logits, torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# CPU / CUDA agreement

@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(64, 1000), (8, 40000)], ids=["1000", "40000"])
def test_cpu_and_cuda_agree(kind, shape):
    logits, target = make_case(*shape, "cpu")
    up = torch.randn(shape[0])
    cpu_loss, cpu_grad = loss_and_grad(fusedtrain.spherical_loss, logits, target, kind, "none", up)
    gpu_loss, gpu_grad = loss_and_grad(fusedtrain.spherical_loss, logits.cuda(), target.cuda(), kind,
                                       "none", up.cuda())
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, rtol=1e-4, atol=1e-7)
    assert kernels_built("cuda") == kernels_built("cuda")  # both devices ran whichever backend exists
