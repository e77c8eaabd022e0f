"""fusedtrain.sae routings against the float64 references (fusedtrain.reference.sae), compared exactly
(same input values, so the same selection, ties included): every routing over odd, empty and wide
shapes in every dtype, the dense TopK form, NaN, non-contiguous input, and the edge paths of the
read-once row and column selects (with a Python model of their buffer/threshold logic). Every test
runs on "cpu" and (marked `cuda`, skipped without a GPU) on "cuda" with the same assertions.
"""
from __future__ import annotations

import math

import pytest
import torch

from fusedtrain import sae
from fusedtrain.reference import sae as ref

from sae_helpers import make_pre, reference_csr

KERNEL_OP = "sae_route"  # what the needs_kernels fixture (conftest) checks


def assert_csr_equal(acts, expected):
    row_ptr, feature, value = expected
    assert torch.equal(acts.row_ptr.cpu(), row_ptr.cpu())
    assert torch.equal(acts.feature.cpu(), feature.cpu())
    assert torch.equal(acts.value.cpu(), value.cpu())


# (B, F): F below and not a multiple of 8 (SIMD tails), one column, one row, empty batch, wide rows
# (several 16-entry chunks and 256-feature blocks), more rows than a parallel chunk.
SHAPES = [(5, 40), (33, 7), (64, 100), (1, 1), (3, 1), (0, 10), (17, 300), (130, 530)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_routings_match_reference(device, dtype, shape, ties):
    B, F = shape
    pre = make_pre(B, F, device, dtype, ties)
    for k in sorted({1, min(3, F), F}):
        assert_csr_equal(sae.topk_route(pre, k), reference_csr(pre, "topk", k))
    for m in (0, 1, 2, B, B + 5):
        assert_csr_equal(sae.feature_choice_route(pre, m), reference_csr(pre, "feature_choice", m))
    for budget in (0, 1, 7, B * F // 3, B * F, B * F + 10):
        assert_csr_equal(sae.mutual_choice_route(pre, budget), reference_csr(pre, "mutual_choice", budget))
    theta = torch.rand(F, device=device, dtype=dtype)
    assert_csr_equal(sae.threshold_route(pre, theta), reference_csr(pre, "threshold", None, theta))
    assert_csr_equal(sae.threshold_route(pre, 0.5), reference_csr(pre, "threshold", None, 0.5))
    assert_csr_equal(sae.threshold_route(pre, 0.3), reference_csr(pre, "threshold", None, 0.3))
    assert_csr_equal(sae.threshold_route(pre, -1.0), reference_csr(pre, "threshold", None, -1.0))


def test_topk_dense_form_matches_torch_topk(device):
    pre = make_pre(40, 129, device, torch.float64)  # distinct values: torch.topk's order is defined
    out = sae.topk_route(pre, 16, dense=True)
    values, indices = torch.topk(pre, 16)
    assert torch.equal(out.top_indices, indices)
    assert torch.equal(out.top_acts, values.relu())


def test_routings_equal_torch_topk_without_ties(device):
    """The acceptance wording: TopK = row torch.topk, feature choice = column torch.topk, mutual
    choice = flattened torch.topk (positive entries; distinct values, so no tie order matters)."""
    B, F = 50, 70
    pre = make_pre(B, F, device, torch.float64)
    for acts, dim, n in ((sae.topk_route(pre, 6), 1, 6), (sae.feature_choice_route(pre, 4), 0, 4)):
        mask = torch.zeros_like(pre, dtype=torch.bool).scatter(dim, pre.topk(n, dim=dim).indices, True)
        torch.testing.assert_close(acts.to_dense(F), pre * (mask & (pre > 0)), rtol=0, atol=0)
    flat = torch.zeros(B * F, dtype=torch.bool, device=device)
    flat[pre.reshape(-1).topk(300).indices] = True
    expected = pre * (flat.reshape(B, F) & (pre > 0))
    torch.testing.assert_close(sae.mutual_choice_route(pre, 300).to_dense(F), expected, rtol=0, atol=0)


def test_topk_dense_ties_and_padding(device):
    pre = make_pre(20, 30, device, torch.float32, ties=True)
    pre[3] = -1.0  # no positive entry: padded with zero values at the smallest indices
    out = sae.topk_route(pre, 5, dense=True)
    values, indices = ref.topk_select(pre, 5)
    assert torch.equal(out.top_indices, indices)
    assert torch.equal(out.top_acts, values.relu())
    assert torch.equal(out.top_indices[3].cpu(), torch.arange(5))
    assert (out.top_acts[3] == 0).all()


def test_noncontiguous_pre(device):
    base = make_pre(60, 90, device, torch.float32)
    for pre in (base.t(), base[::2, 1:80], base[:, ::3]):
        assert_csr_equal(sae.topk_route(pre, 4), reference_csr(pre, "topk", 4))
        assert_csr_equal(sae.feature_choice_route(pre, 3), reference_csr(pre, "feature_choice", 3))
        assert_csr_equal(sae.mutual_choice_route(pre, 50), reference_csr(pre, "mutual_choice", 50))


def test_nan_is_never_selected(device, needs_kernels):
    pre = make_pre(8, 20, device, torch.float32)
    pre[2, 5] = math.nan
    pre[4] = math.nan
    for acts in (sae.topk_route(pre, 3), sae.feature_choice_route(pre, 2), sae.mutual_choice_route(pre, 30)):
        assert not torch.isnan(acts.value).any()
        assert (acts.row_ptr[5] - acts.row_ptr[4]).item() == 0


# ---------------------------------------------------------------------------------------------
# Edge paths of the read-once row select (CUDA row_stream_select_kernel: 16-byte tiles of 256
# threads, a shared candidate buffer of k + 2 tiles compacted when full, a strict threshold).
# The same assertions run on the CPU kernel. Tiles hold 2048 (bf16), 1024 (fp32), 512 (fp64) entries.

def edge_rows(kind, B, F, dtype, device):
    """Rows that stress the buffer: `ascending` (every entry beats the threshold: a compaction per
    tile), `descending` (the first buffer holds the answer), `ties` (3 distinct values), `constant`
    (one value: the k smallest indices win), `random`."""
    ramp = torch.linspace(-3, 3, F, dtype=torch.float64)
    rows = {
        "ascending": ramp.expand(B, F),
        "descending": ramp.flip(0).expand(B, F),
        "ties": torch.randint(-1, 2, (B, F)).double(),
        "constant": torch.full((B, F), 0.5, dtype=torch.float64),
        "random": torch.randn(B, F, dtype=torch.float64),
    }[kind]
    return rows.to(device=device, dtype=dtype).contiguous()


def assert_topk_exact(pre, k):
    values, indices = sae.topk_route(pre, k, dense=True)
    ref_values, ref_indices = ref.topk_select(pre, k)
    assert torch.equal(indices.cpu(), ref_indices.cpu()), k
    assert torch.equal(values.cpu(), ref_values.relu().cpu()), k
    assert_csr_equal(sae.topk_route(pre, k), reference_csr(pre, "topk", k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["ascending", "descending", "ties", "constant", "random"])
def test_topk_read_once_edge_paths(device, needs_kernels, dtype, kind):
    # F spans several tiles and is no multiple of 8; k = 1, a middle k, and the CUDA limit 1024.
    pre = edge_rows(kind, 3, 5003, dtype, device)
    for k in (1, 64, 1024):
        assert_topk_exact(pre, k)
    # F below one tile (and below 8), k = F.
    for F in (5, 300):
        small = edge_rows(kind, 4, F, dtype, device)
        for k in sorted({1, min(F, 37), F}):
            assert_topk_exact(small, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_block_maximum_paths(device, needs_kernels, dtype):
    # The CPU selects k >= 16 from the block maxima of a row when it has at least k blocks of 32
    # entries, falling back to the streaming scan on -inf/NaN-bounded rows and tie-heavy rows.
    # Rows: random with +-0, +-inf and NaN; signed zeros only (every entry ties); -inf with a
    # few finite entries; random with a tail shorter than a block.
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(4, 2 * 1024 + 19, generator=g, dtype=torch.float64)
    rows[0, ::5] = -0.0
    rows[0, 1::97] = math.inf
    rows[0, 2::89] = -math.inf
    rows[0, 3::31] = math.nan
    rows[1] = 0.0
    rows[1, ::2] = -0.0
    rows[2] = -math.inf
    rows[2, ::300] = 1.0
    pre = rows.to(dtype).to(device)
    for k in (16, 33, 64):
        assert_topk_exact(pre, k)
        values, indices = torch.ops.fusedtrain.sae_topk_select(pre, k)
        key = torch.where(pre.isnan(), -math.inf, pre.double())
        expected = key.sort(dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(indices.cpu(), expected.cpu()), k
        assert torch.equal(values.cpu(), pre.gather(1, expected).cpu()), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_topk_read_once_misaligned_rows(device, needs_kernels, dtype):
    # Rows whose starts are not 16-byte aligned (odd offsets and strides) take the scalar loads;
    # rows of the same tensor alternate between aligned and misaligned starts.
    base = make_pre(9, 4111, device, dtype, ties=True)
    for pre in (base[:, 1:], base[:, 3:4000], base[1:, 6:], base[::2, 7:3001]):
        assert pre.stride(1) == 1 and pre.data_ptr() % 16 != 0
        for k in (1, 17, 1024):
            assert_topk_exact(pre, k)
            assert_csr_equal(sae.feature_choice_route(pre.t(), min(k, 5)),
                             reference_csr(pre.t(), "feature_choice", min(k, 5)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_topk_read_once_nan(device, needs_kernels, dtype):
    # NaN ranks as -inf (then by index), as on the CPU; a NaN-heavy row selects NaNs last.
    pre = edge_rows("ascending", 4, 3001, dtype, device).clone()
    pre[0, ::3] = math.nan
    pre[1, 2900:] = math.nan  # the best entries of an ascending row are NaN
    pre[2, :] = math.nan
    pre[2, 10] = -math.inf
    pre[3, 1500] = math.nan
    for k in (1, 64, 1024):
        values, indices = sae.topk_route(pre, k, dense=True)
        ref_indices = ref.topk_select(pre, k)[1]
        assert torch.equal(indices.cpu(), ref_indices.cpu()), k
        assert_csr_equal(sae.topk_route(pre, k), reference_csr(pre, "topk", k))
        assert_csr_equal(sae.feature_choice_route(pre.t(), min(k, 7)),
                         reference_csr(pre.t(), "feature_choice", min(k, 7)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["ascending", "ties", "constant", "random"])
def test_feature_choice_read_once_edge_paths(device, needs_kernels, dtype, kind):
    # Feature choice selects over tokens: long columns (B = 5003 tokens, many 32-token tiles).
    # CUDA paths by m: the column kernel (m <= 32, 32 features a block: here 3 and, below, 40
    # features), the transposed copy + read-once row kernel (33..1024), the multi-pass row select
    # (1025..B-1), nothing to select (m >= B).
    pre = edge_rows(kind, 3, 5003, dtype, device).t()
    for m in (1, 4, 32, 33, 64, 1024, 1025, 5003):
        assert_csr_equal(sae.feature_choice_route(pre, m), reference_csr(pre, "feature_choice", m))
    pre = edge_rows(kind, 40, 700, dtype, device).t()
    for m in (1, 7, 32, 33, 699, 700):
        assert_csr_equal(sae.feature_choice_route(pre, m), reference_csr(pre, "feature_choice", m))


def _stream_select_model(row, k, threads, vec, capacity, topk, ordered=True):
    """The read-once select's algorithm in Python, step for step (tile layout, compaction when the
    buffer cannot take a tile, strict threshold), returning TopK's indices best first or the cutoff
    (value, index). ordered=True: the row kernel (appends in index order, radix select + stable
    compaction, ties taken in buffer order); False: the column kernel (appends in any order within a
    tile, compaction and the cutoff by counted ranks in the full order)."""
    vals = [-math.inf if v != v else v + 0.0 for v in row.tolist()]  # NaN -> -inf, -0 -> +0
    F, tile = len(vals), threads * vec
    buf, thr, eligible = [], None, 0
    shuffle = torch.Generator().manual_seed(F * 31 + k)

    def keep_best(buf):  # radix select of the k-th key, then the stable compaction
        if not ordered:  # entry of rank r moves to position r
            best = sorted(buf, key=lambda e: (-e[0], e[1]))[:k]
            return best, best[-1][0]
        kth = sorted((v for v, _ in buf), reverse=True)[k - 1]
        need, out = k - sum(v > kth for v, _ in buf), []
        for v, f in buf:
            if v > kth or (v == kth and need > 0):
                need -= v == kth
                out.append((v, f))
        return out, kth

    for base in range(0, F, tile):
        if len(buf) > capacity - tile:
            buf, thr = keep_best(buf)
            assert len(buf) == k
        order = range(base, min(base + tile, F))  # thread-major = index order
        if not ordered:  # shared atomics: any order within the tile
            order = [base + i for i in torch.randperm(len(order), generator=shuffle).tolist()]
        for f in order:
            if not topk:
                if not vals[f] > 0:
                    continue
                eligible += 1
            if thr is None or vals[f] > thr:
                buf.append((vals[f], f))
        assert len(buf) <= capacity
    if ordered:
        assert all(a[1] < b[1] for a, b in zip(buf, buf[1:]))  # buffer order is index order
    if not topk:
        if eligible <= k:
            return 0.0, -1
        kept, kth = keep_best(buf)
        return kth, [f for v, f in kept if v == kth][-1]
    if len(buf) > k:
        buf, _ = keep_best(buf)
    return [f for _, f in sorted(buf, key=lambda e: (-e[0], e[1]))]


@pytest.mark.parametrize("ordered", [True, False], ids=["row_kernel", "column_kernel"])
@pytest.mark.parametrize("capacity_tiles", [1, 2])
def test_read_once_algorithm_model(capacity_tiles, ordered):
    """The kernels cannot run without a GPU: their buffer/threshold algorithm, modelled with tiny
    tiles (many compactions), must equal the reference selection on adversarial rows."""
    threads, vec = 4, 2
    for kind in ("ascending", "descending", "ties", "constant", "random"):
        rows = edge_rows(kind, 2, 203, torch.float64, "cpu").clone()
        rows[1, ::7] = math.nan
        rows[1, 5::11] = -0.0
        for k in (1, 3, 8, 40):
            capacity = k + capacity_tiles * threads * vec
            for row in rows:
                got = _stream_select_model(row, k, threads, vec, capacity, True, ordered)
                assert got == ref.topk_select(row[None], k)[1][0].tolist(), (kind, k)
                value, index = _stream_select_model(row, k, threads, vec, capacity, False, ordered)
                positive = row > 0
                if positive.sum() <= k:
                    assert (value, index) == (0.0, -1)
                else:
                    best = ref.topk_select(torch.where(positive, row, -math.inf)[None], k)[1][0]
                    assert index == best[-1].item() and value == row[index].item(), (kind, k)


# ---------------------------------------------------------------------------------------------
# The cutoff (docs/sae.md "Cutoff"): the best positive value the routing REJECTED, 0 when it kept
# every positive entry. The same on every device and in the reference, at every edge: fewer than,
# exactly and more than m (budget) positive entries, m = 0, ties, NaN and the kernels' paths.

def _cutoff(pre, routing, param):
    return sae.routing.route(pre, routing, param)[1].cpu().double()


@pytest.mark.parametrize("budget,expected", [(0, 2.0), (1, 1.0), (2, 0.5), (3, 0.0), (4, 0.0), (6, 0.0), (99, 0.0)])
def test_mutual_choice_cutoff_edges(device, needs_kernels, budget, expected):
    # 3 positive entries: budget 3 (exactly) and above keep them all (cutoff 0, `pre > 0`); below
    # it the cutoff is the (budget + 1)-th best; budget 0 keeps nothing: the best value.
    pre = torch.tensor([[1.0, -1.0, 2.0], [0.5, -3.0, -1.0]], device=device)
    cut = _cutoff(pre, "mutual_choice", budget)
    assert cut.tolist() == [expected]
    assert torch.equal(cut, reference_cutoff_of(pre, "mutual_choice", budget))
    kept = ref.mutual_choice_mask(pre.cpu(), budget)
    assert torch.equal(pre.cpu() > cut, kept)  # no ties here: threshold routing reproduces it exactly


def reference_cutoff_of(pre, routing, param):
    from fusedtrain.sae.routing import reference_cutoff
    return reference_cutoff(pre.cpu(), routing, param).double()


@pytest.mark.parametrize("m", [0, 1, 2, 3, 4, 5, 6])
def test_feature_choice_cutoff_edges(device, needs_kernels, m):
    # Columns with 0, 1, 2, 3 and 5 positive tokens (and NaN, -inf, +0, -0, which never count).
    nan, inf = math.nan, math.inf
    pre = torch.tensor([[-1.0, 3.0, 2.0, 0.5, 9.0],
                        [-2.0, nan, 4.0, 1.5, 8.0],
                        [0.0, -inf, nan, 2.5, 7.0],
                        [-0.0, 0.0, -3.0, -1.0, 6.0],
                        [nan, -1.0, -1.0, -0.5, 5.0]], device=device)
    cut = _cutoff(pre, "feature_choice", m)
    assert torch.equal(cut, reference_cutoff_of(pre, "feature_choice", m))
    positives = [sorted([v for v in col if v > 0], reverse=True) for col in pre.cpu().t().tolist()]
    assert cut.tolist() == [p[m] if len(p) > m else 0.0 for p in positives]
    kept = ref.feature_choice_mask(pre.cpu(), m)
    assert torch.equal((pre.cpu() > cut) & (pre.cpu() > 0), kept)


@pytest.mark.parametrize("routing", ["feature_choice", "mutual_choice"])
def test_cutoff_with_ties_keeps_a_threshold_subset(device, needs_kernels, routing):
    # All equal: the first rejected entry ties with the kept ones, so `pre > cutoff` keeps none of
    # the tied entries; the kernels still keep exactly m (budget) of them, smaller index first.
    pre = torch.ones(4, 3, device=device)
    param = 2 if routing == "feature_choice" else 5
    cut = _cutoff(pre, routing, param)
    assert cut.unique().tolist() == [1.0]
    assert torch.equal(cut, reference_cutoff_of(pre, routing, param))


# (B, F, m): the CUDA paths of the column cutoff (read-once m + 1 <= 32, the transposed read-once
# row select m + 1 <= 1024, the multi-pass one above) and of the global select; each with columns
# of fewer than, exactly and more than m positive tokens.
@pytest.mark.parametrize("B,F,m", [(64, 40, 5), (80, 9, 31), (80, 9, 32), (300, 5, 100), (1100, 3, 1024),
                                   (1100, 3, 1030)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cutoff_edges_on_every_path(device, needs_kernels, B, F, m, dtype):
    gen = torch.Generator().manual_seed(B + F + m)
    pre = torch.randn(B, F, generator=gen, dtype=torch.float64).abs() + 0.01
    for f, positives in enumerate([m - 1, m, m + 1, m + 7, B]):
        if f < F and 0 <= positives <= B:
            pre[positives:, f] = -pre[positives:, f]
    pre = pre.to(dtype)
    for routing, param in (("feature_choice", m), ("mutual_choice", m), ("mutual_choice", int((pre > 0).sum()) - 1),
                           ("mutual_choice", int((pre > 0).sum()))):
        acts, cut = sae.routing.route(pre.to(device), routing, param)
        assert torch.equal(cut.cpu().double(), reference_cutoff_of(pre, routing, param)), (routing, param)
        assert_csr_equal(acts, reference_csr(pre, routing, param))
