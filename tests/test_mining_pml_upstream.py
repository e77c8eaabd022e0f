"""The cases of pytorch-metric-learning's own unit tests for the six classes we replace (its
tests/losses/test_{multi_similarity_loss,tcm_loss,cross_batch_memory}.py and
tests/miners/test_{multi_similarity,batch_hard,pair_margin}_miner.py), in our words, for CI (PML's
sdist has no tests; tests/run_pml_upstream.py runs the originals against a checkout). Same inputs,
parameters and assertions; loops are shortened where PML repeats one check many times, and cases
that need PML's other classes (ContrastiveLoss, NTXentLoss, TripletMarginMiner) are skipped without it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusedtrain import mining as fm

try:
    import pytorch_metric_learning
    from pytorch_metric_learning import losses as pml_losses
    HAS_PML = pytorch_metric_learning.__version__ == "2.9.0"
except Exception:  # noqa: BLE001
    HAS_PML = False

DTYPES = [torch.float16, torch.float32, torch.float64]


def coord(angle_degrees, normalized=False):
    """A 2-D point at that angle, of norm 1 (normalized) or 2, as PML's tests build them."""
    x, y = np.cos(np.radians(angle_degrees)), np.sin(np.radians(angle_degrees))
    return [x, y] if normalized else [2 * x, 2 * y]


def points(angles, dtype, normalized=False, requires_grad=False):
    return torch.tensor([coord(a, normalized) for a in angles], dtype=dtype, requires_grad=requires_grad)


def all_pairs(labels, ref_labels=None):
    """Every (anchor, other) positive and negative pair, row-major; the diagonal is no pair in-batch."""
    in_batch = ref_labels is None
    ref_labels = labels if in_batch else ref_labels
    same = labels[:, None] == ref_labels[None, :]
    pos = same.clone()
    if in_batch:
        pos.fill_diagonal_(False)
    return (*torch.where(pos), *torch.where(~same))


def without_own_slots(pairs, curr_batch_idx):
    """Drop the positive pairs (a, p) where p is anchor a's own slot in the memory."""
    a1, p = pairs[0], pairs[1]
    keep = p != curr_batch_idx[a1]
    return (a1[keep], p[keep], *pairs[2:])


def as_set(a, b):
    return set(zip(a.tolist(), b.tolist()))


# -- MultiSimilarityLoss -----------------------------------------------------------------------------

def ms_expected(x, pos_pairs, neg_pairs, alpha, beta, base, ref=None):
    x = torch.nn.functional.normalize(x.detach().double())
    other = x if ref is None else ref.detach().double()
    total = 0.0
    for i in range(len(x)):
        sp = sum(math.exp(-alpha * (float(x[a] @ other[p]) - base)) for a, p in pos_pairs if a == i)
        sn = sum(math.exp(beta * (float(x[a] @ other[n]) - base)) for a, n in neg_pairs if a == i)
        total += (math.log1p(sp) / alpha if sp else 0.0) + (math.log1p(sn) / beta if sn else 0.0)
    return total / len(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ms_loss_five_points(dtype):
    x = points([0, 20, 40, 60, 80], dtype, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2])
    pos_pairs = [(0, 1), (1, 0), (2, 3), (3, 2)]
    neg_pairs = [(a, b) for a in range(5) for b in range(5) if a != b and labels[a] != labels[b]]
    alpha, beta, base = (0.1, 10, 0.5) if dtype == torch.float16 else (0.1, 40, 0.5)
    loss = fm.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)(x, labels)
    loss.backward()
    want = ms_expected(x, pos_pairs, neg_pairs, alpha, beta, base)
    assert math.isclose(loss.item(), want, rel_tol=1e-2 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ms_loss_with_reference_set(dtype):
    x = torch.nn.functional.normalize(torch.randn(4, 32, dtype=dtype)).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1])
    ref = torch.nn.functional.normalize(torch.randn(3, 32, dtype=dtype))
    ref_labels = torch.tensor([0, 1, 2])
    pos_pairs = [(0, 0), (1, 0), (2, 1), (3, 1)]
    neg_pairs = [(0, 1), (0, 2), (1, 1), (1, 2), (2, 0), (2, 2), (3, 0), (3, 2)]
    alpha, beta, base = (0.1, 10, 0.5) if dtype == torch.float16 else (0.1, 40, 0.5)
    loss = fm.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)(x, labels, ref_emb=ref, ref_labels=ref_labels)
    loss.backward()
    want = ms_expected(x, pos_pairs, neg_pairs, alpha, beta, base, ref)
    assert math.isclose(loss.item(), want, rel_tol=1e-2 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ms_loss_without_pairs_is_zero(dtype):
    x = points([0], dtype, requires_grad=True)
    loss = fm.MultiSimilarityLoss(alpha=0.1, beta=40, base=0.5)(x, torch.tensor([0]))
    loss.backward()
    assert loss.item() == 0


# -- ThresholdConsistentMarginLoss -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_tcm_four_points(dtype):
    x = torch.tensor([[0.00, 1.00], [0.43, 0.90], [1.00, 0.00], [0.50, 0.50]], dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        tcm = fm.ThresholdConsistentMarginLoss()(x, labels)
    # Positive part: only (2, 3) is below 0.9: 0.9 − cos 45°. Negative part: (0, 3) (cos 45°) and
    # (1, 3) are above 0.5 (both ways round): their mean excess.
    s03 = math.sqrt(0.5)
    s13 = (0.43 + 0.9) / (math.hypot(0.43, 0.9) * math.sqrt(2))
    want = (0.9 - math.sqrt(0.5)) + ((s03 - 0.5) + (s13 - 0.5)) / 2
    assert math.isclose(tcm.item(), want, rel_tol=1e-2 if dtype == torch.float16 else 1e-5, abs_tol=1e-4)
    if HAS_PML:  # PML's own case: with its ContrastiveLoss(cosine, 0.9, 0.4) the sum is 1.0045
        from pytorch_metric_learning.distances import CosineSimilarity
        both = pml_losses.MultipleLosses([pml_losses.ContrastiveLoss(distance=CosineSimilarity(), pos_margin=0.9,
                                                                     neg_margin=0.4),
                                          fm.ThresholdConsistentMarginLoss()])
        with torch.no_grad():
            total = both(x, labels)
        assert torch.isclose(total, torch.tensor(1.0045, dtype=dtype), rtol=1e-2 if dtype == torch.float16 else 1e-5,
                             atol=1e-4)


# -- MultiSimilarityMiner ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distance", ["cosine", "lp"])
def test_ms_miner_64_points(dtype, distance):
    eps = 0.1
    dist = fm.CosineSimilarity() if distance == "cosine" else fm.LpDistance()
    x = points(range(64), dtype, requires_grad=True)
    labels = torch.randint(0, 10, (64,))
    mat = dist(x.detach()).double()
    inverted = distance == "cosine"
    want_pos, want_neg, closeness = set(), set(), {}
    for i in range(64):
        others = [j for j in range(64) if j != i]
        pos = [mat[i, j].item() for j in others if labels[j] == labels[i]]
        neg = [mat[i, j].item() for j in others if labels[j] != labels[i]]
        hardest_neg = max(neg, default=-math.inf) if inverted else min(neg, default=math.inf)
        hardest_pos = min(pos, default=math.inf) if inverted else max(pos, default=-math.inf)
        for j in others:
            s = mat[i, j].item()
            if labels[j] == labels[i]:
                threshold = hardest_neg + eps if inverted else hardest_neg - eps
                if s < threshold if inverted else s > threshold:
                    want_pos.add((i, j))
            else:
                threshold = hardest_pos - eps if inverted else hardest_pos + eps
                if s > threshold if inverted else s < threshold:
                    want_neg.add((i, j))
            closeness[(i, j)] = abs(s - threshold)
    a1, p, a2, n = fm.MultiSimilarityMiner(eps, distance=dist)(x, labels)
    # A pair within a rounding of its ε-window may go either way (the kernel's S is not dist()'s).
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    for pair in (as_set(a1, p) ^ want_pos) | (as_set(a2, n) ^ want_neg):
        assert closeness[pair] < tol, pair


@pytest.mark.parametrize("dtype", DTYPES)
def test_ms_miner_without_positives_mines_nothing(dtype):
    a1, p, _, _ = fm.MultiSimilarityMiner(0.1)(torch.randn(32, 64).to(dtype), torch.arange(32))
    assert len(a1) == 0 and len(p) == 0


# -- BatchHardMiner ------------------------------------------------------------------------------------

BH_LABELS = torch.tensor([0, 0, 1, 1, 0, 2, 1, 1, 1])
BH_A, BH_P = torch.tensor([0, 1, 2, 3, 4, 6, 7, 8]), torch.tensor([4, 4, 8, 8, 0, 2, 2, 2])
BH_N = [torch.tensor([2, 2, 1, 4, 3, 5, 5, 5]), torch.tensor([2, 2, 1, 4, 5, 5, 5, 5])]
ANGLES = [0, 20, 40, 60, 80, 100, 120, 140, 160]


def check_batch_hard(a, p, n):
    assert torch.equal(a, BH_A) and torch.equal(p, BH_P) and any(torch.equal(n, c) for c in BH_N)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_hard_unnormalized_distance(dtype):
    miner = fm.BatchHardMiner(distance=fm.LpDistance(normalize_embeddings=False), collect_stats=True)
    check_batch_hard(*miner(torch.arange(9).to(dtype).unsqueeze(1), BH_LABELS))
    assert miner.hardest_pos_pair == 6 and miner.hardest_neg_pair == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("power", [1, 2])
def test_batch_hard_normalized_distance(dtype, power):
    x = points(ANGLES, dtype, normalized=True)
    miner = fm.BatchHardMiner(distance=fm.LpDistance(normalize_embeddings=True, power=power), collect_stats=True)
    check_batch_hard(*miner(x, BH_LABELS))
    places = 2 if dtype == torch.float16 else 5
    assert miner.hardest_pos_pair == pytest.approx(torch.sum((x[2] - x[8]) ** 2).item() ** (1 / 2 if power == 1
                                                                                             else 1), abs=10 ** -places)
    assert miner.hardest_neg_pair == pytest.approx(torch.sum((x[1] - x[2]) ** 2).item() ** (1 / 2 if power == 1
                                                                                             else 1), abs=10 ** -places)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_hard_similarity(dtype):
    miner = fm.BatchHardMiner(distance=fm.CosineSimilarity(), collect_stats=True)
    check_batch_hard(*miner(points(ANGLES, dtype, normalized=True), BH_LABELS))
    places = 2 if dtype == torch.float16 else 5
    assert miner.hardest_pos_pair == pytest.approx(np.cos(np.radians(120)), abs=10 ** -places)
    assert miner.hardest_neg_pair == pytest.approx(np.cos(np.radians(20)), abs=10 ** -places)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_hard_without_positives_mines_nothing(dtype):
    x = torch.randn(32, 64).to(dtype)
    for dist in (fm.LpDistance(normalize_embeddings=False), fm.LpDistance(), fm.LpDistance(power=2),
                 fm.CosineSimilarity()):
        miner = fm.BatchHardMiner(distance=dist, collect_stats=True)
        a, p, n = miner(x, torch.arange(32))
        assert len(a) == len(p) == len(n) == 0
        assert miner.hardest_pos_pair == miner.hardest_neg_pair == miner.hardest_triplet == 0


# -- PairMarginMiner -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distance", ["lp", "cosine"])
def test_pair_margin_16_points(dtype, distance):
    dist = fm.LpDistance() if distance == "lp" else fm.CosineSimilarity()
    x = points(range(16), dtype, requires_grad=True)
    labels = torch.randint(0, 2, (16,))
    mat = dist(x.detach())
    inverted = distance == "cosine"
    for pm in [k * 0.05 for k in range(-1, 4)]:
        for nm in [k * 0.05 for k in range(2, 7)]:
            miner = fm.PairMarginMiner(pm, nm, distance=dist)
            a1, p, a2, n = miner(x, labels)
            want_pos = {(i, j) for i in range(16) for j in range(16) if i != j and labels[i] == labels[j]
                        and (mat[i, j] < pm if inverted else mat[i, j] > pm)}
            want_neg = {(i, j) for i in range(16) for j in range(16) if labels[i] != labels[j]
                        and (mat[i, j] > nm if inverted else mat[i, j] < nm)}
            assert as_set(a1, p) == want_pos and as_set(a2, n) == want_neg
            assert getattr(miner, "pos_pair_dist", None) is None  # PML records it only with collect_stats


@pytest.mark.parametrize("dtype", DTYPES)
def test_pair_margin_without_positives_mines_nothing(dtype):
    a, p, _, _ = fm.PairMarginMiner(0, 1)(torch.randn(32, 64).to(dtype), torch.arange(32))
    assert len(a) == 0 and len(p) == 0


# -- CrossBatchMemory ----------------------------------------------------------------------------------

EMB, MEM = 128, 321


def test_cbm_supported_losses_and_reset_queue():
    assert "MultiSimilarityLoss" in fm.CrossBatchMemory.supported_losses()
    assert len(fm.CrossBatchMemory.supported_losses()) == 14
    cbm = fm.CrossBatchMemory(fm.MultiSimilarityLoss(), EMB, MEM)
    assert torch.equal(cbm.embedding_memory, torch.zeros(MEM, EMB))
    assert torch.equal(cbm.label_memory, torch.zeros(MEM, dtype=torch.long))
    cbm(torch.randn(32, EMB), torch.randint(0, 2, (32,)))
    assert not torch.equal(cbm.embedding_memory, torch.zeros(MEM, EMB))
    cbm.reset_queue()
    assert torch.equal(cbm.embedding_memory, torch.zeros(MEM, EMB)) and cbm.queue_idx == 0


@pytest.mark.parametrize("enqueue", [False, True], ids=["all", "enqueue_mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cbm_queue(enqueue, dtype):
    cbm = fm.CrossBatchMemory(fm.MultiSimilarityLoss(), EMB, MEM)
    B = 15 if enqueue else 32
    for i in range(24):  # wraps around the memory of 321 twice
        x, labels = torch.randn(32, EMB, dtype=dtype), torch.arange(32)
        mask = None
        if enqueue:
            mask = torch.zeros(32, dtype=torch.bool)
            mask[:-2:2] = True
        q = cbm.queue_idx
        assert q == (i * B) % MEM
        cbm(x, labels, enqueue_mask=mask)
        slots = torch.arange(q, q + B) % MEM
        assert torch.equal(cbm.embedding_memory[slots], x if mask is None else x[mask])
        assert torch.equal(cbm.label_memory[slots], labels if mask is None else labels[mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cbm_loss_equals_inner_loss_over_its_pairs(dtype):
    """PML's test_loss and test_all_losses for the Multi-Similarity loss: without a miner, with one,
    and with one plus input pairs."""
    inner, inner_miner, outer_miner = fm.MultiSimilarityLoss(), fm.MultiSimilarityMiner(0.3), fm.MultiSimilarityMiner(0.2)
    plain = fm.CrossBatchMemory(inner, EMB, MEM)
    mined = fm.CrossBatchMemory(inner, EMB, MEM, miner=inner_miner)
    mined2 = fm.CrossBatchMemory(inner, EMB, MEM, miner=inner_miner)
    seen_x, seen_labels = torch.empty(0, EMB, dtype=dtype), torch.empty(0, dtype=torch.long)
    for _ in range(4):
        x, labels = torch.randn(32, EMB, dtype=dtype), torch.randint(0, 10, (32,))
        loss, loss_mined = plain(x, labels), mined(x, labels)
        outer = tuple(outer_miner(x, labels))
        loss_mined2 = mined2(x, labels, outer)
        seen_x, seen_labels = torch.cat([seen_x, x]), torch.cat([seen_labels, labels])
        pairs = without_own_slots(all_pairs(labels, seen_labels), plain.curr_batch_idx)
        assert torch.isclose(loss, inner(x, labels, pairs, seen_x, seen_labels))
        pairs = without_own_slots(tuple(inner_miner(x, labels, seen_x, seen_labels)), mined.curr_batch_idx)
        assert torch.isclose(loss_mined, inner(x, labels, pairs, seen_x, seen_labels))
        both = tuple(torch.cat([o, p]) for o, p in zip(outer, pairs))
        assert torch.isclose(loss_mined2, inner(x, labels, both, seen_x, seen_labels))


@pytest.mark.parametrize("enqueue", [False, True], ids=["all", "enqueue_mask"])
def test_cbm_memory_of_one_batch_is_the_inner_loss(enqueue):
    """PML's sanity check, with our Multi-Similarity loss as the inner loss."""
    for memory_size in (20, 35):
        inner = fm.MultiSimilarityLoss()
        cbm = fm.CrossBatchMemory(inner, EMB, memory_size)
        for _ in range(3):
            B = 2 * memory_size if enqueue else memory_size
            x, labels = torch.randn(B, EMB), torch.randint(0, 4, (B,))
            if enqueue:
                mask = torch.zeros(B, dtype=torch.bool)
                mask[memory_size:] = True
                want = inner(x[~mask], labels[~mask], all_pairs(labels[~mask], labels[mask]), x[mask], labels[mask])
                assert torch.isclose(cbm(x, labels, enqueue_mask=mask), want)
            else:
                assert torch.isclose(cbm(x, labels), inner(x, labels))


def test_cbm_ref_mining_and_input_indices_tuple():
    cbm = fm.CrossBatchMemory(fm.MultiSimilarityLoss(), EMB, MEM)
    pair_miner = fm.PairMarginMiner(pos_margin=0, neg_margin=1)
    for _ in range(12):
        x, labels = torch.randn(32, EMB), torch.arange(32)
        cbm(x, labels)
        mem_labels = cbm.label_memory
        a1, p, a2, n = pair_miner(x, labels, cbm.embedding_memory, mem_labels)
        assert torch.all(labels[a1] == mem_labels[p]) and torch.all(labels[a2] != mem_labels[n])
        given = tuple(pair_miner(x, labels))
        own = without_own_slots(all_pairs(labels, mem_labels), cbm.curr_batch_idx)
        got = cbm.create_indices_tuple(x, labels, cbm.embedding_memory, mem_labels, given, True)
        assert torch.all(labels[got[0]] == mem_labels[got[1]]) and torch.all(labels[got[2]] != mem_labels[got[3]])
        for g, o, i in zip(got, own, given):
            assert torch.equal(g, torch.cat([o, i]))
