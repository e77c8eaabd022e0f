"""Small CUDA cases for compute-sanitizer (memcheck, racecheck): every kernel path once, quickly.

Not a pytest module (the sanitizer makes pytest collection slow): run as
`compute-sanitizer --tool memcheck python tests/sanitizer_cases.py`. Each case also checks its
result against the float64 reference, so a path that runs clean but wrong still fails.
"""
from __future__ import annotations

import sys

import torch

import fusedtrain
from fusedtrain import selftest
from fusedtrain.reference.linear_spherical import linear_spherical_loss as linear_reference
from fusedtrain.reference.spherical import spherical_loss as reference

import sanitizer_cases_sae
from utils import max_rel_err, rel_err


def spherical_case(n: int, d: int, dtype: torch.dtype, kind: str, reduction: str, *,
                   offset: int = 0, row_stride: int | None = None, ignore_some: bool = True) -> None:
    width = row_stride or d
    storage = torch.randn(n * width + offset, device="cuda", dtype=dtype)
    logits = storage[offset:].view(n, width)[:, :d]  # misaligned rows when offset or width % 8
    target = torch.randint(0, d, (n,), device="cuda")
    if ignore_some and n > 1:
        target[::3] = -100
    x = logits.detach().clone().requires_grad_() if row_stride is None else logits.requires_grad_()
    loss = fusedtrain.spherical_loss(x, target, kind, reduction=reduction)
    upstream = torch.rand_like(loss)
    (loss * upstream).sum().backward()
    x64 = logits.detach().double().requires_grad_()
    ref = reference(x64, target, kind, reduction=reduction)
    (ref * upstream.double()).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    grad_err, loss_err = rel_err(x.grad, x64.grad), rel_err(loss, ref)
    assert grad_err < tol and loss_err < tol, (n, d, dtype, kind, reduction, loss_err, grad_err)


def frugal_case(dtype: torch.dtype) -> None:
    """One fused FRUGAL step over every kind (dense, columns, rows, free, residual, an empty
    tensor, more columns than a block's threads), against the reference step in float64."""
    from fusedtrain.reference import frugal as ref

    gen = torch.Generator().manual_seed(0)

    def lists(device, dt):
        def rnd(*shape, positive=False):
            t = torch.randn(shape, generator=gen, dtype=torch.float64)
            return (t.abs() if positive else t).to(device=device, dtype=dt)
        empty = torch.empty(0, device=device, dtype=dt)
        none = torch.empty(0, device=device, dtype=torch.int32)
        cols = torch.tensor([0, 5, 6, 300, 999], dtype=torch.int32, device=device)
        rows = torch.tensor([1, 4], dtype=torch.int32, device=device)
        cases = [(rnd(33, 1000), ref.COLUMNS, rnd(33, 5), rnd(33, 5, positive=True), cols, empty, empty, 3),
                 (rnd(6, 257), ref.ROWS, rnd(2, 257), rnd(2, 257, positive=True), rows, empty, empty, 2),
                 (rnd(7, 9), ref.DENSE, rnd(7, 9), rnd(7, 9, positive=True), none, empty, empty, 1),
                 (rnd(40000), ref.FREE, empty, empty, none, empty, empty, 0),
                 (rnd(0, 3), ref.FREE, empty, empty, none, empty, empty, 0),
                 (rnd(5, 11), ref.RESIDUAL, empty, empty, none, rnd(5, 11), rnd(5, 11), 0)]
        p, kinds, m, v, idx, base, upd, steps = (list(x) for x in zip(*cases))
        g = [rnd(*t.shape) for t in p]
        return dict(params=p, grads=g, exp_avgs=m, exp_avg_sqs=v, indices=idx, kinds=kinds, steps=steps,
                    residual_bases=base, dense_updates=upd)

    hyper = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, free_lr_scale=0.5)
    state = gen.get_state()
    ours = lists("cuda", dtype)
    gen.set_state(state)
    theirs = lists("cpu", torch.float64)
    fusedtrain.frugal_step_(**ours, **hyper)
    ref.frugal_step_(**theirs, **hyper)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for a, b in zip(ours[key], theirs[key]):
            err = max_rel_err(a, b)
            assert err < tol, ("frugal_step_", key, dtype, err)


def linear_case(n: int, d: int, D: int, dtype: torch.dtype, kind: str, reduction: str, bias: bool) -> None:
    """The fused linear op: row statistics, input gradient, target-row scatter (repeated targets)."""
    h = torch.randn(n, d, device="cuda", dtype=dtype)
    w = torch.randn(D, d, device="cuda", dtype=dtype) / d**0.5
    b = torch.randn(D, device="cuda", dtype=dtype) if bias else None
    target = torch.randint(0, D, (n,), device="cuda")
    target[::3] = -100
    leaves = [x.clone().requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    loss = fusedtrain.linear_spherical_loss(leaves[0], leaves[1], target, linear_bias=leaves[2] if bias else None,
                                            kind=kind, reduction=reduction)
    upstream = torch.rand_like(loss)
    (loss * upstream).sum().backward()
    leaves64 = [x.double().requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    ref = linear_reference(leaves64[0], leaves64[1], target, linear_bias=leaves64[2] if bias else None, kind=kind,
                           reduction=reduction)
    (ref * upstream.double()).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for x, x64 in zip(leaves, leaves64):
        err = rel_err(x.grad, x64.grad)
        assert err < tol, (n, d, D, dtype, kind, reduction, bias, err)


def main(small: bool) -> None:
    torch.manual_seed(0)
    cases = [
        (64, 7, torch.float32, "z", "mean"),           # warp per row, scalar paths
        (33, 1000, torch.bfloat16, "spherical", "sum"),
        (17, 3001, torch.float16, "taylor", "none"),   # backward from coefficients
        (9, 5000, torch.float32, "z", "mean"),         # block per row, shared-memory cache
        (5, 70001, torch.bfloat16, "mse", "mean"),     # block of 1024, partial cache
    ]
    if small:
        cases = cases[:1] + cases[3:4]
    for case in cases:
        spherical_case(*case)
    linear_case(64, 33, 100, torch.float32, "z", "mean", True)
    linear_case(300, 128, 7, torch.bfloat16, "spherical", "none", False)          # long scatter segments
    if not small:
        linear_case(5, 1, 3, torch.float32, "mse", "sum", True)
    spherical_case(8, 1001, torch.float32, "z", "mean", offset=1)                # misaligned rows
    spherical_case(8, 2000, torch.float32, "z", "sum", row_stride=2003)           # strided rows
    # Out-of-range target: flagged and raised, nothing written out of bounds.
    logits = torch.randn(4, 10, device="cuda")
    try:
        fusedtrain.spherical_loss(logits, torch.tensor([0, 10, 2, 3], device="cuda"))
        raise AssertionError("out-of-range target did not raise")
    except ValueError:
        pass
    frugal_case(torch.float32)
    if not small:
        frugal_case(torch.bfloat16)
    try:
        fusedtrain.linear_spherical_loss(torch.randn(4, 3, device="cuda"), torch.randn(10, 3, device="cuda"),
                                         torch.tensor([0, 10, 2, 3], device="cuda"))
        raise AssertionError("out-of-range target did not raise (linear)")
    except ValueError:
        pass
    torch.cuda.synchronize()
    sanitizer_cases_sae.main(small)
    # Every family's small end-to-end checks (fusedtrain.selftest) run under the sanitizer too.
    failures = selftest.run(["cuda"])
    torch.cuda.synchronize()
    assert failures == 0, f"{failures} selftest checks failed on CUDA"
    print("sanitizer cases passed")


if __name__ == "__main__":
    main(small="--small" in sys.argv)
