"""FRUGAL optimizer and its fused step op against torch.optim.AdamW, signSGD and the pure-PyTorch
reference (fusedtrain.reference.frugal, i.e. fusedtrain.optim.reference), plus state_dict resume, state bytes, amp and errors.

Every test runs on "cpu" and (marked `cuda`, skipped without a GPU) on "cuda" with the same
assertions. Gradients of the long runs are drawn independently of the weights (a fixed stream of
random tensors), so two implementations see the same gradients and differ only by their own
rounding; the AdamW/signSGD parity tests use a real model and loss instead.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import fusedtrain
from fusedtrain.optim import FRUGAL
from fusedtrain.reference import frugal as ref
from fusedtrain.reference.frugal import FRUGALReference

from utils import HAS_CUDA, kernels_built, max_rel_err

GATHER = ["columns", "rows", "block"]
ALL_PROJ = ["columns", "rows", "block", "svd", "random"]


KERNEL_OP = "frugal_step_"  # what the needs_kernels fixture (conftest) checks


# Shapes of the long runs: wide and tall matrices, odd sizes, a 3-D (conv-like) weight viewed as
# (size(0), rest), 1-D tensors (AdamW always), a single row and a single column.
SHAPES = [(24, 40), (40, 24), (7, 5, 3), (33,), (1, 17), (17, 1), (16, 16)]


def make_params(device, dtype=torch.float32, shapes=SHAPES):
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float64).to(device=device, dtype=dtype))
            for s in shapes]


def grad_stream(shapes, steps, seed):
    """`steps` lists of fp64 gradients, independent of the weights."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) * (0.1 + i % 3) for i, s in enumerate(shapes)]
            for _ in range(steps)]


def run_stream(opt_cls, params, grads, **kw):
    opt = opt_cls(params, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(device=p.device, dtype=p.dtype)
        opt.step()
    return opt


class MLP(torch.nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc1 = torch.nn.Linear(24, 40, bias=bias)
        self.fc2 = torch.nn.Linear(40, 16, bias=bias)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def train(model, opt, steps, data, device):
    x, y = (t.to(device) for t in data)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def regression_data():
    return torch.randn(64, 24), torch.randn(64, 16)


# ---------------------------------------------------------------------------------------------
# Acceptance: density 1 == AdamW, density 0 == signSGD, the reference over 300 steps

@pytest.mark.parametrize("proj", GATHER)
def test_density_one_is_adamw(device, proj):
    data = regression_data()
    model = MLP().to(device)
    twin = copy.deepcopy(model)
    initial = copy.deepcopy(model)
    ours = FRUGAL(model.parameters(), lr=3e-3, weight_decay=0.05, density=1.0, proj=proj, update_gap=7, seed=0)
    adamw = torch.optim.AdamW(twin.parameters(), lr=3e-3, weight_decay=0.05, foreach=False)
    train(model, ours, 50, data, device)
    train(twin, adamw, 50, data, device)
    for a, b in zip(model.parameters(), twin.parameters()):
        # fp32 rounding only: the two run the same arithmetic in different orders.
        assert max_rel_err(a, b) < 1e-5
    for a, b in zip(model.parameters(), initial.parameters()):
        assert max_rel_err(a, b) > 1e-3  # it did train (refreshes at steps 8, 15, ... kept the moments)


@pytest.mark.parametrize("proj", ALL_PROJ)
def test_density_zero_is_signsgd(device, proj):
    data = regression_data()
    model = MLP(bias=False).to(device)  # every tensor projectable: all of it goes to signSGD
    twin = copy.deepcopy(model)
    lr, wd = 1e-3, 0.1
    ours = FRUGAL(model.parameters(), lr=lr, weight_decay=wd, density=0.0, proj=proj, update_gap=5, seed=0)
    x, y = (t.to(device) for t in data)
    train(model, ours, 50, data, device)
    for _ in range(50):
        twin.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(twin(x), y).backward()
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(1 - lr * wd).sub_(lr * torch.sign(p.grad))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert max_rel_err(a, b) < 1e-6
    assert all(not s or set(s) <= {"step", "indices", "active"} for s in ours.state.values())


@pytest.mark.slow
@pytest.mark.parametrize("proj", ALL_PROJ)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_reference_300_steps(device, needs_kernels, proj, dtype, tol):
    grads = grad_stream(SHAPES, 300, seed=1)
    kw = dict(lr=1e-2, weight_decay=0.01, density=0.3, proj=proj, update_gap=50, seed=3)
    ours = make_params(device, dtype)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o = run_stream(FRUGAL, ours, grads, **kw)
    r = run_stream(FRUGALReference, theirs, grads, **kw)
    for a, b in zip(ours, theirs):
        assert max_rel_err(a, b) < tol
    # The same subspaces were drawn.
    for a, b in zip(ours, theirs):
        for key in ("indices", "projection", "active"):
            if key in r.state[b]:
                sa, sb = o.state[a][key], r.state[b][key]
                assert (sa == sb) if isinstance(sb, bool) else torch.equal(sa, sb)


@pytest.mark.parametrize("proj", GATHER)
def test_fp32_kernel_against_fp64_reference(device, needs_kernels, proj):
    """fp32 kernel vs the fp64 reference on the same gradients (for gather projections the residual
    signs are those of the gradient itself, so only Adam's rounding differs)."""
    grads = grad_stream(SHAPES, 120, seed=2)
    kw = dict(lr=1e-2, weight_decay=0.01, density=0.4, proj=proj, update_gap=40, seed=5)
    ours = make_params(device, torch.float32)
    theirs = [torch.nn.Parameter(p.detach().double().cpu()) for p in ours]
    run_stream(FRUGAL, ours, grads, **kw)
    run_stream(FRUGALReference, theirs, grads, **kw)
    for a, b in zip(ours, theirs):
        assert max_rel_err(a, b) < 1e-5  # fp32 rounding of the gradients and of Adam


@pytest.mark.parametrize("proj", ["columns", "svd"])
def test_reset_state_false_keeps_moments(device, proj):
    params = make_params(device, shapes=[(12, 20)])
    grads = grad_stream([(12, 20)], 7, seed=4)
    opt = run_stream(FRUGAL, params, grads, density=0.5, proj=proj, update_gap=3, reset_state=False, seed=0)
    assert opt.state[params[0]]["adam_step"] == 7
    opt = run_stream(FRUGAL, make_params(device, shapes=[(12, 20)]), grads, density=0.5, proj=proj,
                     update_gap=3, reset_state=True, seed=0)
    assert opt.state[next(iter(opt.state))]["adam_step"] == 1  # reset at the refresh of step 7


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_block_order_cycles(device, order):
    params = make_params(device, shapes=[(4, 4)] * 4 + [(4,)])
    grads = grad_stream([(4, 4)] * 4 + [(4,)], 6, seed=0)
    opt = FRUGAL(params, density=0.5, proj="block", update_gap=2, block_order=order, seed=0)
    seen = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(device=device, dtype=p.dtype)
        opt.step()
        seen.append([opt.state[p]["active"] for p in params[:4]])
    first, second = ([True, True, False, False], [False, False, True, True])
    if order == "descending":
        first, second = first[::-1], second[::-1]
    assert seen == [first, first, second, second, first, first]
    assert "exp_avg" in opt.state[params[4]]  # 1-D: AdamW


# ---------------------------------------------------------------------------------------------
# state_dict, memory, amp, API behaviour

@pytest.mark.parametrize("proj", ALL_PROJ)
def test_state_dict_resume_is_bit_identical(device, proj):
    data = regression_data()
    model = MLP().to(device)
    kw = dict(lr=1e-2, weight_decay=0.01, density=0.25, proj=proj, update_gap=7, seed=11)
    opt = FRUGAL(model.parameters(), **kw)
    train(model, opt, 17, data, device)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, 20, data, device)  # crosses refreshes at steps 21, 28, 35

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = MLP().to(device)
    resumed.load_state_dict(saved["model"])
    opt2 = FRUGAL(resumed.parameters(), **{**kw, "seed": 999})  # the generator comes from the state
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, 20, data, device)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t))


@pytest.mark.parametrize("proj", GATHER)
@pytest.mark.parametrize("density", [0.25, 0.125])  # "block" selects whole tensors: 2 and 1 of 8
def test_state_bytes_at_most_density_of_adamw(device, proj, density):
    # Eight equal-size matrices (either orientation) and two 1-D tensors (AdamW in both).
    shapes = [(256, 512)] * 4 + [(512, 256)] * 4 + [(512,), (512,)]
    ours, base = make_params(device, shapes=shapes), make_params(device, shapes=shapes)
    grads = grad_stream(shapes, 1, seed=0)
    opt = run_stream(FRUGAL, ours, grads, density=density, proj=proj, seed=0)
    adamw = run_stream(torch.optim.AdamW, base, grads)
    ratio = state_bytes(opt) / state_bytes(adamw)
    assert ratio <= density + 0.01, ratio
    assert ratio >= density - 0.01  # it really keeps the subspace's moments
    for p in ours[:8]:
        s = opt.state[p]
        if "indices" in s:
            assert s["indices"].dtype == torch.int32


def test_grad_scaler(device):
    data = regression_data()
    model = MLP().to(device)
    twin = copy.deepcopy(model)
    opt = FRUGAL(model.parameters(), lr=1e-2, seed=0, update_gap=3)
    opt_twin = FRUGAL(twin.parameters(), lr=1e-2, seed=0, update_gap=3)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    x, y = (t.to(device) for t in data)
    for _ in range(8):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    train(twin, opt_twin, 8, data, device)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert max_rel_err(a, b) < 1e-6  # power-of-two scale: unscaling is exact
    # An inf gradient makes the scaler skip the step.
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(x).sum() * float("inf")).backward()
    scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_params_without_grad_are_untouched(device):
    params = make_params(device, shapes=[(8, 6), (8, 6)])
    opt = FRUGAL(params, density=0.5, seed=0)
    before = params[1].detach().clone()
    params[0].grad = torch.randn(8, 6, device=device)
    opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state
    opt.zero_grad(set_to_none=True)
    assert params[0].grad is None
    opt.step()  # no grads at all: a no-op
    assert opt.state[params[0]]["step"] == 1


def test_per_group_overrides(device):
    data = regression_data()
    model = MLP().to(device)
    twin = copy.deepcopy(model)
    opt = FRUGAL([{"params": model.fc1.parameters(), "proj": None},
                  {"params": model.fc2.parameters(), "density": 1.0, "proj": "rows"}],
                 lr=3e-3, density=0.0, seed=0)
    assert opt.param_groups[0]["density"] == 0.0 and opt.param_groups[1]["density"] == 1.0
    # Both at their default weight decay (1e-2: FRUGAL's is AdamW's).
    adamw = torch.optim.AdamW(twin.parameters(), lr=3e-3, foreach=False)
    train(model, opt, 20, data, device)
    train(twin, adamw, 20, data, device)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert max_rel_err(a, b) < 1e-5


def test_non_contiguous_param(device):
    w = torch.nn.Parameter(torch.randn(10, 14, device=device).t())  # (14, 10), non-contiguous
    twin = torch.nn.Parameter(w.detach().contiguous())
    grads = grad_stream([(14, 10)], 5, seed=3)
    run_stream(FRUGAL, [w], grads, density=0.5, update_gap=2, seed=0)
    run_stream(FRUGALReference, [twin], grads, density=0.5, update_gap=2, seed=0)
    assert max_rel_err(w, twin) < 1e-6


def test_bfloat16_params(device, needs_kernels):
    shapes = [(24, 40), (40,)]
    ours = make_params(device, torch.bfloat16, shapes)
    theirs = [torch.nn.Parameter(p.detach().double().cpu()) for p in ours]
    grads = grad_stream(shapes, 10, seed=6)
    run_stream(FRUGAL, ours, grads, lr=1e-2, density=0.5, seed=0)
    run_stream(FRUGALReference, theirs, grads, lr=1e-2, density=0.5, seed=0)
    for a, b in zip(ours, theirs):
        # bf16 storage rounds every step (2^-8 relative); the fp64 reference does not.
        assert max_rel_err(a, b) < 3e-2


# ---------------------------------------------------------------------------------------------
# The functional op against its reference, op-level checks

def op_case(device, dtype, seed=0):
    """Lists for one call covering every kind, odd shapes, an empty tensor."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    empty = lambda: torch.empty(0, device=device, dtype=dtype)  # noqa: E731
    no_idx = lambda: torch.empty(0, device=device, dtype=torch.int32)  # noqa: E731
    cols = torch.tensor([0, 3, 4, 10, 12], dtype=torch.int32, device=device)
    rows = torch.tensor([1, 2, 6], dtype=torch.int32, device=device)
    cases = [  # (param, kind, m, v, idx, base, update, step)
        (rnd(9, 13), ref.COLUMNS, rnd(9, 5), rnd(9, 5).abs(), cols, empty(), empty(), 3),
        (rnd(7, 3, 5), ref.COLUMNS, rnd(7, 5), rnd(7, 5).abs(), cols, empty(), empty(), 1),
        (rnd(7, 11), ref.ROWS, rnd(3, 11), rnd(3, 11).abs(), rows, empty(), empty(), 5),
        (rnd(5, 6), ref.DENSE, rnd(5, 6), rnd(5, 6).abs(), no_idx(), empty(), empty(), 2),
        (rnd(37), ref.DENSE, rnd(37), rnd(37).abs(), no_idx(), empty(), empty(), 1),
        (rnd(6, 6), ref.FREE, empty(), empty(), no_idx(), empty(), empty(), 0),
        (rnd(0, 4), ref.FREE, empty(), empty(), no_idx(), empty(), empty(), 0),
        (rnd(8, 5), ref.RESIDUAL, empty(), empty(), no_idx(), rnd(8, 5), rnd(8, 5), 0),
        (rnd(4, 70000), ref.COLUMNS, rnd(4, 5), rnd(4, 5).abs(), cols, empty(), empty(), 2),
    ]
    lists = [list(x) for x in zip(*cases)]
    params, kinds, ms, vs, idx, bases, updates, steps = lists
    grads = [rnd(*p.shape) for p in params]
    return dict(params=params, grads=grads, exp_avgs=ms, exp_avg_sqs=vs, indices=idx, kinds=kinds,
                steps=steps, residual_bases=bases, dense_updates=updates)


HYPER = dict(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1, free_lr_scale=0.7)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("free_update", ["signsgd", "sgd", "none"])
def test_op_matches_reference(device, needs_kernels, dtype, tol, free_update):
    ours = op_case(device, dtype)
    theirs = op_case("cpu", torch.float64)  # same draws, fp64
    fusedtrain.frugal_step_(**ours, **HYPER, free_update=free_update)
    ref.frugal_step_(**theirs, **HYPER, free_update=free_update)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for a, b in zip(ours[key], theirs[key]):
            assert max_rel_err(a, b) < tol, key
    # The untouched inputs stay untouched.
    fresh = op_case(device, dtype)
    for key in ("grads", "indices", "residual_bases", "dense_updates"):
        for a, b in zip(ours[key], fresh[key]):
            assert torch.equal(a, b)


def test_opcheck(needs_kernels):
    case = op_case("cpu", torch.float64)
    case = {k: case[k] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "indices", "residual_bases",
                                 "dense_updates", "kinds", "steps")}
    args = (*case.values(), 0.05, 0.8, 0.95, 1e-6, 0.1, "signsgd", 0.7)
    torch.library.opcheck(torch.ops.fusedtrain.frugal_step_, args)


def test_torch_compile_fullgraph(needs_kernels):
    case, eager = op_case("cpu", torch.float32), op_case("cpu", torch.float32)

    def step(c):
        fusedtrain.frugal_step_(**c, **HYPER)

    torch.compile(step, fullgraph=True)(case)
    step(eager)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        for a, b in zip(case[key], eager[key]):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("kw,match", [
    (dict(density=-0.1), "density"), (dict(density=1.5), "density"), (dict(density=float("nan")), "density"),
    (dict(proj="diagonal"), "proj"), (dict(update_gap=0), "update_gap"), (dict(update_gap=2.5), "update_gap"),
    (dict(free_update="adam"), "free_update"), (dict(betas=(0.9, 1.0)), "betas"), (dict(lr=-1.0), "lr"),
    (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(block_order="up"), "block_order"),
    (dict(free_lr_scale=-1.0), "free_lr_scale"), (dict(seed="x"), "seed"),
])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        FRUGAL([torch.nn.Parameter(torch.randn(4, 4))], **kw)
    if match != "seed":  # the same checks for a per-group override
        with pytest.raises(ValueError, match=rf"{match}.*param group 1"):
            FRUGAL([{"params": [torch.nn.Parameter(torch.randn(4, 4))]},
                    {"params": [torch.nn.Parameter(torch.randn(4, 4))], **kw}])


def test_bad_params_and_grads(device):
    with pytest.raises(ValueError, match="complex"):
        FRUGAL([torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64, device=device))])
    emb = torch.nn.Embedding(10, 4, sparse=True).to(device)
    opt = FRUGAL(emb.parameters())
    emb(torch.tensor([1, 2], device=device)).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda c: c["kinds"].__setitem__(0, 9), ValueError, r"kinds\[0\]"),
    (lambda c: c["indices"].__setitem__(0, torch.arange(14, dtype=torch.int32)), ValueError, r"indices\[0\]"),
    (lambda c: c["indices"].__setitem__(0, c["indices"][0].long()), TypeError, r"indices\[0\] must be int32"),
    (lambda c: c["exp_avgs"].__setitem__(0, torch.zeros(9, 4)), ValueError, r"exp_avgs\[0\]"),
    (lambda c: c["grads"].__setitem__(1, torch.zeros(7, 15)), ValueError, r"grads\[1\]"),
    (lambda c: c["grads"].__setitem__(1, torch.zeros(7, 3, 5, dtype=torch.float64)), TypeError, r"grads\[1\]"),
    (lambda c: c["params"].__setitem__(3, torch.zeros(5, 6, dtype=torch.float64)), TypeError, r"params\[3\]"),
    (lambda c: c["params"].__setitem__(3, torch.zeros(6, 5).t()), ValueError, "contiguous"),
    (lambda c: c["steps"].__setitem__(0, 0), ValueError, r"steps\[0\]"),
    (lambda c: c["steps"].pop(), ValueError, "steps must have one entry per param"),
    (lambda c: c["residual_bases"].__setitem__(7, torch.zeros(3)), ValueError, r"residual_bases\[7\]"),
])
def test_op_errors(needs_kernels, mutate, exc, match):
    case = op_case("cpu", torch.float32)
    mutate(case)
    with pytest.raises(exc, match=match):
        torch.ops.fusedtrain.frugal_step_(
            case["params"], case["grads"], case["exp_avgs"], case["exp_avg_sqs"], case["indices"],
            case["residual_bases"], case["dense_updates"], case["kinds"], case["steps"], 0.1, 0.9, 0.99,
            1e-8, 0.0, "signsgd", 1.0)


def test_op_hyperparameter_errors(needs_kernels):
    case = op_case("cpu", torch.float32)
    for bad, match in ((dict(free_update="adam"), "free_update"), (dict(beta1=1.0), "beta1"),
                       (dict(lr=float("nan")), "lr"), (dict(weight_decay=-1.0), "weight_decay")):
        with pytest.raises(ValueError, match=match):
            fusedtrain.frugal_step_(**case, **{**HYPER, **bad})


# Index lists are read as a set on every device (csrc/frugal/frugal_math.h): an entry is active iff
# in range and the first with its value; the selected columns (rows) get AdamW once with their
# active entry's moment slot, the others the free update, inactive slots stay as they are.
HOSTILE_INDEX_LISTS = {
    "unsorted": [10, 0, 4, 12, 3],
    "duplicates": [3, 3, 4, 10, 3],
    "out_of_range": [-5, 3, 2 ** 31 - 1, 12, 13],
    "all_hostile": [12, -1, 12, 0, 99],
}


def _canonical(idx, limit):
    seen, active = set(), []
    for j, c in enumerate(idx):
        if 0 <= c < limit and c not in seen:
            seen.add(c)
            active.append((c, j))
    return sorted(active)


@pytest.mark.parametrize("kind", ["columns", "rows"])
@pytest.mark.parametrize("name", sorted(HOSTILE_INDEX_LISTS))
def test_index_list_is_a_set(device, needs_kernels, kind, name):
    gen = torch.Generator().manual_seed(5)
    shape = (9, 13) if kind == "columns" else (13, 9)
    limit = 13
    idx = HOSTILE_INDEX_LISTS[name]
    k = len(idx)
    rnd = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64)  # noqa: E731
    w, g = rnd(*shape), rnd(*shape)
    mshape = (9, k) if kind == "columns" else (k, 9)
    m, v = rnd(*mshape), rnd(*mshape).abs()
    code = ref.COLUMNS if kind == "columns" else ref.ROWS
    # Ours, with the hostile list, in a subprocess-free call: no index can leave its tensor.
    ours = [t.clone().to(device) for t in (w, g, m, v)]
    fusedtrain.frugal_step_([ours[0]], [ours[1]], [ours[2]], [ours[3]],
                            [torch.tensor(idx, dtype=torch.int32, device=device)], [code], [3], **HYPER)
    # Expected: the canonical list, with the moments of the active slots.
    active = _canonical(idx, limit)
    sel = torch.tensor([c for c, _ in active], dtype=torch.int32)
    slots = torch.tensor([j for _, j in active], dtype=torch.long)
    dim = 1 if kind == "columns" else 0
    exp = [w.clone(), g.clone(), m.index_select(dim, slots).contiguous(), v.index_select(dim, slots).contiguous()]
    ref.frugal_step_([exp[0]], [exp[1]], [exp[2]], [exp[3]], [sel], [code], [3], **HYPER)
    m_exp, v_exp = m.clone(), v.clone()
    m_exp.index_copy_(dim, slots, exp[2])
    v_exp.index_copy_(dim, slots, exp[3])
    for got, want in ((ours[0], exp[0]), (ours[2], m_exp), (ours[3], v_exp)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-13, atol=1e-14)
    # The reference reads the hostile list the same way (it is the fallback without a kernel).
    direct = [t.clone() for t in (w, g, m, v)]
    ref.frugal_step_([direct[0]], [direct[1]], [direct[2]], [direct[3]], [torch.tensor(idx, dtype=torch.int32)],
                     [code], [3], **HYPER)
    for got, want in ((direct[0], exp[0]), (direct[2], m_exp), (direct[3], v_exp)):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


def test_hostile_index_values_do_not_crash(device, needs_kernels):
    """Huge, negative and repeated indices, in a subprocess: a crash fails the test."""
    from sae_helpers import run_isolated
    code = f"""
import torch, fusedtrain
dev = {device!r}
for kind, shape in ((1, (4, 70000)), (2, (70000, 3)), (1, (3, 5)), (2, (5, 3))):
    for idx in ([2 ** 31 - 1, -2 ** 31, 7, 7, 0], [-1] * 5, [4, 3, 2, 1, 0]):
        p = torch.randn(shape, device=dev); g = torch.randn(shape, device=dev)
        ms = (shape[0], 5) if kind == 1 else (5, shape[1])
        m = torch.zeros(ms, device=dev); v = torch.zeros(ms, device=dev)
        fusedtrain.frugal_step_([p], [g], [m], [v], [torch.tensor(idx, dtype=torch.int32, device=dev)], [kind], [1],
                                lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
        assert torch.isfinite(p).all()
if dev == "cuda":
    torch.cuda.synchronize()
print("OK")
"""
    proc = run_isolated(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("proj", ALL_PROJ)
def test_cpu_and_cuda_agree(proj):
    if not kernels_built("cuda", KERNEL_OP):
        pytest.skip("no CUDA kernel in this build")
    grads = grad_stream(SHAPES, 60, seed=8)
    kw = dict(lr=1e-2, density=0.3, proj=proj, update_gap=20, seed=1)
    cpu = make_params("cpu", torch.float64)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    run_stream(FRUGAL, cpu, grads, **kw)
    run_stream(FRUGAL, gpu, grads, **kw)
    for a, b in zip(gpu, cpu):
        assert max_rel_err(a, b) < 1e-10


@pytest.mark.slow
def test_example_trains(capsys):
    """examples/frugal_train.py runs and both optimizers learn (loss well below uniform)."""
    import pathlib
    import runpy
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "frugal_train.py"
    argv = sys.argv
    sys.argv = [str(path), "--steps", "40", "--device", "cpu", "--d-model", "32", "--layers", "1",
                "--context", "16", "--batch", "16"]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    finals = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[-2:]}
    assert set(finals) == {"frugal", "adamw"}
    assert all(loss < math.log(64) - 0.5 for loss in finals.values()), out


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_column_limit_is_an_error():
    """The CUDA column path keeps a bitmask of the columns in shared memory (at most 393216
    columns): wider tensors are refused with a clear error, never run wrong."""
    if not kernels_built("cuda", KERNEL_OP):
        pytest.skip("no CUDA kernel in this build")
    p = torch.zeros(1, 400_000, device="cuda")
    idx = torch.tensor([0, 5], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"params\[0\] has 400000 columns"):
        fusedtrain.frugal_step_([p], [torch.ones_like(p)], [torch.zeros(1, 2, device="cuda")],
                                [torch.zeros(1, 2, device="cuda")], [idx], [ref.COLUMNS], [1], **HYPER)


@pytest.mark.parametrize("free_update", ["signsgd", "sgd"])
def test_nan_gradient_reaches_the_weight(device, free_update):
    """A NaN gradient coordinate makes its weight NaN in the state-free part too (sign(NaN) = NaN,
    as torch.sign), never a silently skipped update; the other weights stay finite."""
    p = torch.nn.Parameter(torch.randn(8, 8, device=device))
    opt = FRUGAL([p], lr=0.1, density=0.0, free_update=free_update, seed=0)  # all of it state-free
    p.grad = torch.randn(8, 8, device=device)
    p.grad[2, 3] = float("nan")
    opt.step()
    assert torch.isnan(p[2, 3]) and torch.isfinite(p.detach().flatten()[torch.arange(64, device=device) != 19]).all()

