"""fusedtrain.sae against the float64 references (fusedtrain.reference.sae); the routings themselves
are in test_sae_routing.py.

Encode/decode values and every gradient against the dense float64 reference; gradcheck, opcheck,
torch.compile; odd and empty shapes, non-contiguous inputs, errors; the SparseAutoencoder module.
Every test runs on "cpu" and (marked `cuda`, skipped without a GPU) on "cuda" with the same assertions.
"""
from __future__ import annotations

import math

import pytest
import torch

from fusedtrain import sae
from fusedtrain.sae.checks import routing_param
from fusedtrain.sae.codec import encode_with_cutoff
from fusedtrain.sae.routing import reference_cutoff
from fusedtrain.reference import sae as ref

from sae_helpers import make_pre, reference_csr
from utils import HAS_CUDA, assert_compiles_like_eager, rel_err

OPS = torch.ops.fusedtrain


KERNEL_OP = "sae_route"  # what the needs_kernels fixture (conftest) checks


# ---------------------------------------------------------------------------------------------
# Fused encode + sparse decode: values and every gradient against the dense reference.

def make_sae(B, d, F, device, dtype=torch.float64):
    g = torch.Generator().manual_seed(B * 1000 + F)
    x = torch.randn(B, d, dtype=torch.float64, generator=g)
    W_enc = torch.randn(d, F, dtype=torch.float64, generator=g) / math.sqrt(d)
    b_enc = torch.randn(F, dtype=torch.float64, generator=g) * 0.1
    b_dec = torch.randn(d, dtype=torch.float64, generator=g) * 0.1
    W_dec = torch.randn(F, d, dtype=torch.float64, generator=g) / math.sqrt(d)
    return [t.to(device=device, dtype=dtype) for t in (x, W_enc, b_enc, b_dec, W_dec)]


ROUTING_CASES = [("topk", dict(k=5)), ("feature_choice", dict(k=5)), ("feature_choice", dict(m=0)),
                 ("feature_choice", dict(m=1000)), ("mutual_choice", dict(k=5)),
                 ("mutual_choice", dict(budget=10**7)), ("threshold", dict(theta=0.3))]


def ours_step(params, routing, kw, upstream):
    leaves = [p.detach().requires_grad_() for p in params]
    x, W_enc, b_enc, b_dec, W_dec = leaves
    acts = sae.sae_encode(x, W_enc, b_enc, b_dec, routing, **kw)
    out = sae.sparse_decode(acts, W_dec, b_dec)
    (out * upstream).sum().backward()
    return out, acts, [p.grad for p in leaves]


def reference_step(params, routing, kw, upstream):
    leaves = [p.detach().double().requires_grad_() for p in params]
    x, W_enc, b_enc, b_dec, W_dec = leaves
    B, F = x.shape[0], W_enc.shape[1]
    param = None if routing == "threshold" else routing_param(routing, kw.get("k"), kw.get("m"),
                                                                  kw.get("budget"), B, F)
    dense = ref.encode(x, W_enc, b_enc, b_dec, routing, param, kw.get("theta"))
    out = ref.decode(dense, W_dec, b_dec)
    (out * upstream.double()).sum().backward()
    return out, dense, [p.grad for p in leaves]


@pytest.mark.parametrize("routing,kw", ROUTING_CASES, ids=lambda v: v if isinstance(v, str) else str(v))
@pytest.mark.parametrize("shape", [(33, 48, 100), (7, 5, 13), (1, 48, 9), (0, 48, 20)], ids=str)
def test_encode_decode_and_gradients_fp64(device, routing, kw, shape):
    params = make_sae(*shape, device)
    upstream = torch.randn(shape[0], shape[1], dtype=torch.float64, device=device)
    out, acts, grads = ours_step(params, routing, kw, upstream)
    ref_out, dense, ref_grads = reference_step(params, routing, kw, upstream)
    torch.testing.assert_close(acts.to_dense(shape[2]), dense.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name, g, r in zip(("x", "W_enc", "b_enc", "b_dec", "W_dec"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def _decode_errors(acts, value, W_dec, b_dec, grad, F):
    """Relative errors of (out, dvalue, dW_dec, db_dec) of sparse_decode, and of the same thing
    computed by PyTorch densely in the inputs' dtype, both against float64 on the same inputs."""
    def run(fn, cast):
        v, W, b = (t.detach().to(cast).requires_grad_() for t in (value, W_dec, b_dec))
        out = fn(v, W, b)
        out.backward(grad.to(cast))
        return out, v.grad, W.grad, b.grad

    dense = lambda v, W, b: ref.decode(ref.dense_from_csr(acts.row_ptr, acts.feature, v, F), W, b)
    ours = run(lambda v, W, b: sae.sparse_decode(sae.SparseActs(acts.row_ptr, acts.feature, v), W, b), value.dtype)
    torch_same_dtype = run(dense, value.dtype)
    exact = run(dense, torch.float64)
    return [rel_err(o, e) for o, e in zip(ours, exact)], [rel_err(t, e) for t, e in zip(torch_same_dtype, exact)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_decode_and_gradients_low_precision(device, dtype):
    """Decode and its gradients from given activations (the selection is then fixed) against fp64 on
    the same rounded inputs: at most 2x the error of PyTorch's dense computation in that dtype
    (plus fp32 rounding, 1e-6, for fp32 where both are near exact)."""
    B, d, F = 64, 48, 300
    pre = torch.randn(B, F, device=device).to(dtype)
    acts = sae.topk_route(pre, 8)
    W_dec = (torch.randn(F, d, device=device) / 7).to(dtype)
    b_dec = torch.randn(d, device=device).to(dtype)
    grad = torch.randn(B, d, device=device).to(dtype)
    ours, theirs = _decode_errors(acts, acts.value, W_dec, b_dec, grad, F)
    for name, o, t in zip(("out", "dvalue", "dW_dec", "db_dec"), ours, theirs):
        assert o <= 2 * t + 1e-6, (name, o, t)


def test_fp32_encode_matches_reference_selection(device):
    params = make_sae(128, 64, 512, device, torch.float32)
    x, W_enc, b_enc, b_dec, _ = params
    pre = torch.addmm(b_enc, x - b_dec, W_enc)  # the very GEMM the fused op runs
    for routing, param in (("topk", 16), ("feature_choice", 4), ("mutual_choice", 16 * 128)):
        acts = sae.sae_encode(x, W_enc, b_enc, b_dec, routing, **{"topk": {"k": param},
                              "feature_choice": {"m": param}, "mutual_choice": {"budget": param}}[routing])
        expected = reference_csr(pre, routing, param)
        assert torch.equal(acts.feature.cpu(), expected[1].cpu())
        torch.testing.assert_close(acts.value, expected[2], rtol=1e-6, atol=1e-6)


def test_backward_is_deterministic(device):
    params = make_sae(200, 48, 64, device, torch.float32)  # many tokens per feature
    upstream = torch.randn(200, 48, device=device)
    first = ours_step(params, "topk", dict(k=16), upstream)[2]
    second = ours_step(params, "topk", dict(k=16), upstream)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_encode_does_not_keep_dense_preactivations(device, needs_kernels):
    """Saved tensors of the fused encode: inputs and the (nnz,) indices, no (B, F) matrix."""
    B, d, F = 64, 16, 4096
    x, W_enc, b_enc, b_dec, _ = make_sae(B, d, F, device, torch.float32)
    W_enc.requires_grad_()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sae.sae_encode(x, W_enc, b_enc, b_dec, "topk", k=4)
    assert (B, F) not in saved and saved


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile.

@pytest.mark.parametrize("routing,kw", ROUTING_CASES[:5] + ROUTING_CASES[6:], ids=lambda v: v if isinstance(v, str) else str(v))
def test_gradcheck_encode_decode(device, routing, kw):
    params = [p.requires_grad_() for p in make_sae(9, 6, 11, device)]

    def fn(x, W_enc, b_enc, b_dec, W_dec):
        return sae.sparse_decode(sae.sae_encode(x, W_enc, b_enc, b_dec, routing, **kw), W_dec, b_dec)

    assert torch.autograd.gradcheck(fn, params)


def test_gradcheck_routes(device):
    pre = make_pre(7, 12, device, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: sae.topk_route(p, 3).value, (pre,))
    assert torch.autograd.gradcheck(lambda p: sae.topk_route(p, 3, dense=True).top_acts, (pre,))
    assert torch.autograd.gradcheck(lambda p: sae.feature_choice_route(p, 2).value, (pre,))
    assert torch.autograd.gradcheck(lambda p: sae.mutual_choice_route(p, 20).value, (pre,))
    assert torch.autograd.gradcheck(lambda p: sae.threshold_route(p, 0.2).value, (pre,))


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck(device, needs_kernels):
    x, W_enc, b_enc, b_dec, W_dec = make_sae(12, 8, 30, device)
    pre = (x - b_dec) @ W_enc + b_enc
    row_ptr, feature, value, _ = OPS.sae_route(pre, "topk", 4, None)
    grad = torch.randn(12, 8, dtype=torch.float64, device=device)
    col_ptr, perm, token = OPS._sae_csc(row_ptr, feature, 30)
    cases = [
        (OPS.sae_topk_select, (pre.requires_grad_(), 4), None),
        (OPS.sae_gather_rows, (row_ptr, feature, value.requires_grad_(), W_dec.requires_grad_(), b_dec), None),
        (OPS.sae_gather_rows, (row_ptr, feature, value, W_dec, None), None),
        (OPS._sae_sampled_dot, (row_ptr, feature, grad, W_dec.detach()), None),
        (OPS._sae_csc, (row_ptr, feature, 30), None),
        (OPS._sae_segment_sum, (col_ptr, perm, token, value.detach(), grad), None),
        # Data-dependent output sizes: the dynamic-shape AOT check does not apply.
        (OPS.sae_route, (pre, "feature_choice", 3, None), OPCHECK_UTILS),
        (OPS.sae_route, (pre, "mutual_choice", 40, None), OPCHECK_UTILS),
        (OPS.sae_encode, (x, W_enc.requires_grad_(), b_enc, b_dec, "topk", 4, None), OPCHECK_UTILS),
    ]
    for op, args, utils in cases:
        kwargs = {} if utils is None else {"test_utils": utils}
        torch.library.opcheck(op, args, **kwargs)


def test_torch_compile_decode(device, needs_kernels):
    x, W_enc, b_enc, b_dec, W_dec = make_sae(16, 8, 40, device, torch.float32)
    acts = sae.topk_route((x - b_dec) @ W_enc + b_enc, 4)

    def step(value, W):
        out = sae.sparse_decode(sae.SparseActs(acts.row_ptr, acts.feature, value), W, b_dec, check_indices=False)
        return out.pow(2).sum()

    assert_compiles_like_eager(step, [acts.value, W_dec])


@pytest.mark.parametrize("routing,param", [("topk", 4), ("feature_choice", 2), ("mutual_choice", 100)])
def test_torch_compile_fused_step(device, needs_kernels, routing, param):
    """The whole fused step under torch.compile(fullgraph=True): the routing's output size depends on
    the data, which dynamo captures with capture_dynamic_output_shape_ops."""
    def step(x, W_enc, b_enc, b_dec, W_dec):
        acts = encode_with_cutoff(x, W_enc, b_enc, b_dec, routing, param)[0]
        return (sae.sparse_decode(acts, W_dec, b_dec, check_indices=False) - x).pow(2).sum()

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        assert_compiles_like_eager(step, make_sae(32, 16, 64, device, torch.float32))


def test_torch_compile_topk_dense(device, needs_kernels):
    pre = make_pre(16, 40, device, torch.float32).requires_grad_()
    fn = torch.compile(lambda p: sae.topk_route(p, 5, dense=True).top_acts.sum(), fullgraph=True,
                       backend="aot_eager")
    fn(pre).backward()
    expected = torch.zeros_like(pre).scatter(1, ref.topk_select(pre.detach(), 5)[1], 1.0) * (pre > 0)
    torch.testing.assert_close(pre.grad, expected)


# ---------------------------------------------------------------------------------------------
# Errors.

def test_errors(device):
    pre = make_pre(4, 10, device, torch.float32)
    with pytest.raises(ValueError, match="k must be in"):
        sae.topk_route(pre, 11)
    with pytest.raises(ValueError, match="k must be in"):
        sae.topk_route(pre, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        sae.topk_route(pre, 2.5)
    with pytest.raises(ValueError, match="m must be in"):
        sae.feature_choice_route(pre, -1)
    with pytest.raises(ValueError, match="budget must be in"):
        sae.mutual_choice_route(pre, -3)
    with pytest.raises(ValueError, match="pre must be 2-D"):
        sae.topk_route(pre[0], 2)
    with pytest.raises(TypeError, match="pre must be float32"):
        sae.topk_route(pre.long(), 2)
    with pytest.raises(ValueError, match=r"theta must have shape \(10,\)"):
        sae.threshold_route(pre, torch.zeros(9, device=device))
    x, W_enc, b_enc, b_dec, W_dec = make_sae(4, 6, 10, device, torch.float32)
    with pytest.raises(ValueError, match="W_enc must have shape"):
        sae.sae_encode(x, W_enc.t(), b_enc, b_dec, k=2)
    with pytest.raises(ValueError, match="b_enc must have shape"):
        sae.sae_encode(x, W_enc, b_enc[:-1], b_dec, k=2)
    with pytest.raises(TypeError, match="b_dec must have the dtype"):
        sae.sae_encode(x, W_enc, b_enc, b_dec.double(), k=2)
    with pytest.raises(ValueError, match="routing must be one of"):
        sae.sae_encode(x, W_enc, b_enc, b_dec, "sinkhorn", k=2)
    acts = sae.sae_encode(x, W_enc, b_enc, b_dec, k=2)
    with pytest.raises(ValueError, match="acts.feature must lie in"):
        sae.sparse_decode(acts, W_dec[:1], b_dec)
    with pytest.raises(ValueError, match="row_ptr must rise"):
        sae.sparse_decode(sae.SparseActs(acts.row_ptr.flip(0), acts.feature, acts.value), W_dec, b_dec)
    with pytest.raises(TypeError, match="W_dec must have the dtype"):
        sae.sparse_decode(acts, W_dec.double(), b_dec)


def test_errors_from_compiled_ops(device, needs_kernels):
    """The C++ checks name the argument too (for callers of torch.ops.fusedtrain directly)."""
    pre = make_pre(4, 10, device, torch.float32)
    with pytest.raises(ValueError, match="k must be in"):
        OPS.sae_topk_select(pre, 11)
    with pytest.raises(ValueError, match="routing must be one of"):
        OPS.sae_route(pre, "nope", 2, None)
    with pytest.raises(ValueError, match="theta must have shape"):
        OPS.sae_route(pre, "threshold", 0, torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="threshold routing needs theta"):
        OPS.sae_route(pre, "threshold", 0, None)
    with pytest.raises(ValueError, match="m \\(tokens per feature\\) must be >= 0"):
        OPS.sae_route(pre, "feature_choice", -1, None)
    with pytest.raises(TypeError, match="pre must be float32"):
        OPS.sae_route(pre.int(), "topk", 2, None)
    if device == "cuda":  # rows are sorted in shared memory: k is bounded there
        wide = make_pre(2, 2000, device, torch.float32)
        with pytest.raises(ValueError, match="k must be <= 1024 on CUDA"):
            OPS.sae_topk_select(wide, 1025)


# ---------------------------------------------------------------------------------------------
# The module.

@pytest.mark.parametrize("routing", ["topk", "feature_choice", "mutual_choice"])
def test_module_forward_and_training(device, routing):
    torch.manual_seed(1)
    model = sae.SparseAutoencoder(48, 120, routing, k=6, device=device, dtype=torch.float64)
    x = torch.randn(64, 48, dtype=torch.float64, device=device)
    out = model(x)
    assert out.sae_out.shape == x.shape
    expected = ref.decode(out.latent_acts.to_dense(120), model.W_dec, model.b_dec)
    torch.testing.assert_close(out.sae_out, expected)
    fvu = (out.sae_out - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, fvu)
    if routing == "topk":
        assert (out.latent_acts.row_ptr.diff() <= 6).all()
    if routing == "mutual_choice":
        assert out.latent_acts.feature.numel() <= 6 * 64
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        out = model(x)
        first = first if first is not None else out.fvu.item()
        opt.zero_grad()
        out.loss.backward()
        model.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        model.set_decoder_norm_to_unit_norm()
    assert out.fvu.item() < first
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(120, dtype=torch.float64, device=device))


def test_module_parallel_gradient_removed(device):
    model = sae.SparseAutoencoder(16, 40, k=4, device=device, dtype=torch.float64)
    model(torch.randn(32, 16, dtype=torch.float64, device=device)).loss.backward()
    model.remove_gradient_parallel_to_decoder_directions()
    parallel = (model.W_dec.grad * model.W_dec).sum(1)
    assert parallel.abs().max().item() < 1e-12


def test_module_dead_latents_and_auxk(device):
    torch.manual_seed(2)
    model = sae.SparseAutoencoder(16, 64, k=2, dead_tokens_threshold=40, device=device, dtype=torch.float64)
    x = torch.randn(32, 16, dtype=torch.float64, device=device)
    out = model(x)
    assert out.num_dead == 0 and out.auxk_loss.item() == 0
    fired = torch.zeros(64, dtype=torch.bool, device=device)
    fired[out.latent_acts.feature] = True
    assert (model.num_tokens_since_fired[fired] == 0).all()
    assert (model.num_tokens_since_fired[~fired] == 32).all()
    model(x)
    out = model(x)  # latents silent for 64 > 40 tokens are now dead
    assert out.num_dead == int((~fired).sum()) > 0
    assert out.auxk_loss.item() > 0
    out.loss.backward()
    assert model.W_enc.grad is not None


@pytest.mark.parametrize("routing", ["feature_choice", "mutual_choice"])
def test_module_thresholds_for_inference(device, routing):
    torch.manual_seed(3)
    model = sae.SparseAutoencoder(16, 50, routing, k=4, threshold_decay=0.5, device=device, dtype=torch.float64)
    x = torch.randn(40, 16, dtype=torch.float64, device=device)
    model(x)
    param = routing_param(routing, 4, None, None, 40, 50)
    pre = (x - model.b_dec) @ model.W_enc + model.b_enc
    cutoff = (ref.feature_choice_cutoff(pre.detach(), param) if routing == "feature_choice"
              else reference_cutoff(pre.detach(), routing, param).expand(50))
    torch.testing.assert_close(model.threshold.double(), cutoff.double(), rtol=1e-6, atol=1e-6)
    model.eval()
    acts = model.encode(x)
    expected = reference_csr(pre.detach(), "threshold", None, model.threshold.double())
    assert torch.equal(acts.feature.cpu(), expected[1].cpu())


def test_module_loaders(device):
    model = sae.SparseAutoencoder(12, 30, k=3, device=device, dtype=torch.float64)
    x = torch.randn(8, 12, dtype=torch.float64, device=device)
    expected = model(x).sae_out
    saelens = {name: getattr(model, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    assert tuple(saelens["W_enc"].shape) == (12, 30) and tuple(saelens["W_dec"].shape) == (30, 12)
    torch.testing.assert_close(sae.SparseAutoencoder.from_saelens_state_dict(saelens, k=3)(x).sae_out, expected)
    sparsify = {"encoder.weight": saelens["W_enc"].t().contiguous(), "encoder.bias": saelens["b_enc"],
                "W_dec": saelens["W_dec"], "b_dec": saelens["b_dec"]}
    torch.testing.assert_close(sae.SparseAutoencoder.from_sparsify_state_dict(sparsify, k=3)(x).sae_out, expected)
    other = sae.SparseAutoencoder(12, 30, k=3, device=device, dtype=torch.float64)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x).sae_out, expected)


def test_module_errors():
    with pytest.raises(ValueError, match="routing must be one of"):
        sae.SparseAutoencoder(8, 16, "dense")
    with pytest.raises(ValueError, match="k must be in"):
        sae.SparseAutoencoder(8, 16, "topk", k=17)


def test_sparsify_parity(device, monkeypatch):
    """Our TopK module reproduces sparsify's SparseCoder, forward and gradients, with the same weights."""
    try:
        import sparsify
        import sparsify.sparse_coder
        import sparsify.utils
    except ImportError as exc:  # not installed, or installed without its dependencies
        pytest.skip(f"sparsify unavailable: {exc}")
    if device == "cpu":  # sparsify picks its Triton decoder whenever triton imports; Triton has no CPU driver
        monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", sparsify.utils.eager_decode)
    torch.manual_seed(0)
    cfg = sparsify.SparseCoderConfig(num_latents=64, k=4)
    coder = sparsify.SparseCoder(16, cfg, device=device, dtype=torch.float32)
    with torch.no_grad():  # sparsify starts b_dec at zero: make it count
        coder.b_dec.normal_()
    model = sae.SparseAutoencoder.from_sparsify_state_dict(coder.state_dict(), k=4)
    x = torch.randn(32, 16, device=device)
    theirs = coder(x)
    ours = model(x)
    torch.testing.assert_close(ours.sae_out, theirs.sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.fvu, theirs.fvu, rtol=1e-5, atol=1e-5)
    theirs.fvu.backward()
    ours.fvu.backward()
    grads = {"W_dec": (model.W_dec.grad, coder.W_dec.grad), "b_dec": (model.b_dec.grad, coder.b_dec.grad),
             "b_enc": (model.b_enc.grad, coder.encoder.bias.grad),
             "W_enc": (model.W_enc.grad.t(), coder.encoder.weight.grad)}
    for name, (a, b) in grads.items():
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cpu_cuda_agree():
    params = make_sae(256, 64, 1000, "cpu", torch.float32)
    upstream = torch.randn(256, 64)
    for routing, kw in ROUTING_CASES:
        out_c, acts_c, grads_c = ours_step(params, routing, kw, upstream)
        out_g, acts_g, grads_g = ours_step([p.cuda() for p in params], routing, kw, upstream.cuda())
        assert torch.equal(acts_c.feature, acts_g.feature.cpu())
        torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads_g, grads_c):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Hostile index values (issue 13): every raw op is safe on ANY row_ptr / feature / col_ptr / perm /
# token values and reads them as csrc/sae/sae.h defines (modelled in sae_helpers). Each class runs
# in its own interpreter, so a crash fails the test instead of killing the run.

_HOSTILE_PRELUDE = """
import torch, fusedtrain
from sae_helpers import *
ops = torch.ops.fusedtrain
dev = {device!r}
big = 2 ** 62
def t(x): return torch.tensor(x, dtype=torch.int64, device=dev)
def close(a, b): torch.testing.assert_close(a.cpu().double(), b.double(), rtol=1e-12, atol=1e-12)
ROW_PTRS = [[0, 24, 0, 24, 0, 24, 0, 24, 0], [0, 5, 3, 9, 12], [-7, 2, 2, 40, 12], [big, -big, 3, 1, 12],
            [0, 12, 12, 12, 12], [3, 3, 8, 8, 9], [0, 4, 8, 12, 12]]
FEATURES = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5, -1, 3, big, 9, 0, -big, 2, 31, 32, 7, 7]]
"""

HOSTILE_CASES = {
    # The SIGSEGV: overlapping rows through the public API, then backward.
    "public_decode_backward": """
a = fusedtrain.sae.topk_route(torch.randn(8, 32, device=dev), 3)
rp = t([0] + [24, 0] * 4)
v = a.value.clone().double().requires_grad_()
Wd = torch.randn(32, 16, dtype=torch.float64, device=dev, requires_grad=True)
out = fusedtrain.sae.sparse_decode(fusedtrain.sae.SparseActs(rp, a.feature, v), Wd, check_indices=False)
out.sum().backward()
assert torch.isfinite(Wd.grad).all() and torch.isfinite(v.grad).all()
try:
    fusedtrain.sae.sparse_decode(fusedtrain.sae.SparseActs(rp, a.feature, v), Wd)
    raise SystemExit("check_indices=True accepted overlapping rows")
except ValueError as e:
    assert "row_ptr" in str(e)
""",
    "csc": """
for rp in ROW_PTRS:
    for feat in FEATURES:
        for num_cols in (0, 1, 32):
            col_ptr, perm, token = ops._sae_csc(t(rp), t(feat), num_cols)
            exp = model_csc(rp, feat, num_cols)
            assert (col_ptr.tolist(), perm.tolist(), token.tolist()) == exp, (rp, feat, num_cols)
col_ptr, perm, token = ops._sae_csc(t([0]), t([]), 4)
assert col_ptr.tolist() == [0] * 5 and perm.numel() == 0
""",
    "gather_rows_and_sampled_dot": """
table = torch.randn(32, 5, dtype=torch.float64, device=dev)
grad = torch.randn(4, 5, dtype=torch.float64, device=dev)
value = torch.randn(12, dtype=torch.float64, device=dev)
bias = torch.randn(5, dtype=torch.float64, device=dev)
for rp in ROW_PTRS:
    for feat in FEATURES:
        out = ops.sae_gather_rows(t(rp), t(feat), value, table, bias)
        close(out, model_gather_rows(rp, feat, value.cpu(), table.cpu(), bias.cpu()))
        g = grad if len(rp) == 5 else torch.randn(len(rp) - 1, 5, dtype=torch.float64, device=dev)
        close(ops._sae_sampled_dot(t(rp), t(feat), g, table), model_sampled_dot(rp, feat, g.cpu(), table.cpu()))
""",
    "segment_sum": """
src = torch.randn(4, 3, dtype=torch.float64, device=dev)
coef = torch.randn(6, dtype=torch.float64, device=dev)
CASES = [([0, 2, 4, 6], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1]),          # valid
         ([0, 6, 0, 6], [5, 4, 3, 2, 1, 0], [3, 3, 3, 3, 3, 3]),          # overlapping columns
         ([-big, big, 2, -1], [-1, 6, big, 0, -big, 5], [0, 4, -1, big, 2, -big]),
         ([0, 3, 3, 9], [0, 0, 0, 1, 1, 1], [4, 3, 2, 1, 0, -1])]           # token 4 = B: skipped in both sums
for cp, perm, token in CASES:
    out, total = ops._sae_segment_sum(t(cp), t(perm), t(token), coef, src)
    exp_out, exp_total = model_segment_sum(cp, perm, token, coef.cpu(), src.cpu())
    close(out, exp_out)
    close(total, exp_total)
""",
    "token_and_to_dense": """
value = torch.randn(12, dtype=torch.float64, device=dev)
for rp in ROW_PTRS:
    for feat in FEATURES:
        acts = fusedtrain.sae.SparseActs(t(rp), t(feat), value)
        assert acts.token().tolist() == row_of_entries(rp, 12), rp
        dense = acts.to_dense(32).cpu()
        B = len(rp) - 1
        exp = torch.zeros(B, 32, dtype=torch.float64)
        for j, (b, f) in enumerate(zip(row_of_entries(rp, 12), feat)):
            if 0 <= b < B and 0 <= f < 32:
                exp[b, f] = value[j].item()
        if len(set(feat)) == len(feat):  # duplicates: which one index_put keeps is unspecified
            assert torch.equal(dense, exp), rp
""",
    "routing_parameters": """
pre = torch.randn(6, 9, device=dev)
for routing in ("feature_choice", "mutual_choice"):
    for param in (0, 5, 6, 54, 55, big, 2 ** 63 - 1):
        row_ptr, feature, value, cutoff = ops.sae_route(pre, routing, param, None)
        assert row_ptr[-1].item() == feature.numel() == value.numel()
for bad in (-1, -big):
    for routing in ("feature_choice", "mutual_choice"):
        try:
            ops.sae_route(pre, routing, bad, None)
            raise SystemExit(f"{routing} accepted {bad}")
        except ValueError:
            pass
for k in (0, 10, big):
    try:
        ops.sae_topk_select(pre, k)
        raise SystemExit(f"topk accepted k = {k}")
    except ValueError:
        pass
""",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CASES))
def test_hostile_index_values(device, needs_kernels, case):
    from sae_helpers import run_isolated
    proc = run_isolated(_HOSTILE_PRELUDE.format(device=device) + HOSTILE_CASES[case] + "\nprint('OK')\n")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
