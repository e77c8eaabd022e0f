"""Small CUDA cases of the SAE kernels for compute-sanitizer (called by tests/sanitizer_cases.py).

Every kernel path once: row top-k (bf16, fp32, fp64, k up to the 1024 limit, ties), the read-once
row select's buffer compaction, scalar-load and NaN paths, the read-once column cutoff (m <= 32)
and the row kernels on the transposed matrix (larger m), the global radix select (ties at the
cutoff, budget above the positive count), the ordered CSR fill, gather decode, sampled dots and
per-feature sums. Each case also checks its result against the float64 reference, so a path that
runs clean but wrong fails.
"""
from __future__ import annotations

import torch

from fusedtrain import sae
from fusedtrain.reference import sae as ref

from utils import rel_err


def _same_csr(acts, pre, routing, param, theta=None) -> None:
    row_ptr, feature, value = ref.csr_from_dense(pre, ref.route_mask(pre, routing, param, theta))
    assert torch.equal(acts.row_ptr, row_ptr) and torch.equal(acts.feature, feature), (routing, param)
    assert torch.equal(acts.value, value), (routing, param)


def routing_cases(small: bool) -> None:
    shapes = [(33, 1000, torch.bfloat16), (8, 3001, torch.float32)]
    if not small:
        shapes += [(70, 257, torch.float64), (3, 20000, torch.float32)]
    for B, F, dtype in shapes:
        pre = torch.randn(B, F, device="cuda", dtype=torch.float64)
        pre[0] = (pre[0] * 2).round()  # ties
        pre = pre.to(dtype)
        for k in (1, 7, min(F, 1024)):
            _same_csr(sae.topk_route(pre, k), pre, "topk", k)
            values, indices = sae.topk_route(pre, k, dense=True)
            assert torch.equal(indices, ref.topk_select(pre, k)[1])
        for m in (0, 1, 5, B + 1):
            _same_csr(sae.feature_choice_route(pre, m), pre, "feature_choice", m)
        for budget in (0, 1, 100, B * F):
            _same_csr(sae.mutual_choice_route(pre, budget), pre, "mutual_choice", budget)
        _same_csr(sae.threshold_route(pre, 0.5), pre, "threshold", None, 0.5)


def _same_topk(pre, k) -> None:
    values, indices = sae.topk_route(pre, k, dense=True)
    ref_values, ref_indices = ref.topk_select(pre, k)
    assert torch.equal(indices, ref_indices), (pre.dtype, k)
    torch.testing.assert_close(values, ref_values.relu(), rtol=0, atol=0, equal_nan=True)


def read_once_cases(small: bool) -> None:
    """The read-once row select's edge paths: buffer compaction on every tile (ascending rows),
    one-value rows (all ties), k = 1 and k = 1024, a row shorter than a tile, misaligned row starts
    (scalar loads), NaN; the feature-choice cutoff on long columns, and m = 1025 (the fallback)."""
    dtypes = [torch.bfloat16] if small else [torch.bfloat16, torch.float32, torch.float64]
    for dtype in dtypes:
        F = 5003
        ramp = torch.linspace(-3, 3, F, device="cuda", dtype=torch.float64)
        rows = torch.stack([ramp, ramp.flip(0), torch.full_like(ramp, 0.5), (ramp * 3).round()])
        rows = rows.to(dtype)
        nan_rows = rows.clone()
        nan_rows[0, ::3] = float("nan")
        nan_rows[1, :] = float("nan")
        for pre in (rows, nan_rows, rows[:, 1:], rows[:, 3:40]):
            for k in sorted({1, min(pre.shape[1], 64), min(pre.shape[1], 1024)}):
                _same_topk(pre, k)
        cols = rows.t()
        for m in (1, 4, 32, 33, 1024, 1025):
            _same_csr(sae.feature_choice_route(cols, m), cols, "feature_choice", m)
        wide = rows.repeat(10, 1)[:, :300].t()  # 40 features: two blocks of the column kernel
        for m in (1, 32):
            _same_csr(sae.feature_choice_route(wide, m), wide, "feature_choice", m)


def decode_case(B: int, d: int, F: int, dtype: torch.dtype) -> None:
    pre = torch.randn(B, F, device="cuda", dtype=dtype)
    acts = sae.topk_route(pre, 8)
    value = acts.value.detach().requires_grad_()
    W_dec = torch.randn(F, d, device="cuda", dtype=dtype).requires_grad_()
    b_dec = torch.randn(d, device="cuda", dtype=dtype).requires_grad_()
    out = sae.sparse_decode(sae.SparseActs(acts.row_ptr, acts.feature, value), W_dec, b_dec)
    grad = torch.randn_like(out)
    out.backward(grad)
    v64, W64, b64 = (t.detach().double().requires_grad_() for t in (value, W_dec, b_dec))
    expected = ref.decode(ref.dense_from_csr(acts.row_ptr, acts.feature, v64, F), W64, b64)
    expected.backward(grad.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in ((out, expected), (value.grad, v64.grad), (W_dec.grad, W64.grad), (b_dec.grad, b64.grad)):
        err = rel_err(a, b)
        assert err < tol, (B, d, F, dtype, err)


def main(small: bool) -> None:
    routing_cases(small)
    read_once_cases(small)
    decode_case(17, 48, 300, torch.float32)
    if not small:
        decode_case(64, 1000, 5000, torch.bfloat16)
    torch.cuda.synchronize()
    print("sae sanitizer cases passed")
