"""fusedtrain.mining's PML-compatible classes and ops against pytorch-metric-learning 2.9.0 (skipped
without it): Multi-Similarity, batch-hard and pair-margin mining, MultiSimilarityLoss, TCM,
CrossBatchMemory across wrap-around and with enqueue_mask, PML's quirks, and what the classes refuse.
Every test runs on "cpu" and (marked `cuda`) on "cuda".
"""
from __future__ import annotations

import pytest
import torch

from fusedtrain import mining as fm
from fusedtrain.reference import mining as ref

from mining_helpers import make_case, pairs

try:
    import pytorch_metric_learning
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    from pytorch_metric_learning.distances import CosineSimilarity
    HAS_PML = pytorch_metric_learning.__version__ == "2.9.0"
except Exception:  # noqa: BLE001 - any import failure means: no parity tests
    HAS_PML = False

needs_pml = pytest.mark.skipif(not HAS_PML, reason="pytorch-metric-learning 2.9.0 not installed")


def same_pairs_or_ties(ours, theirs, S, thresholds_fn, tol):
    """Equal as sets, except pairs within `tol` of their mining threshold (ties that S's rounding
    may tip either way)."""
    diff = pairs(*ours) ^ pairs(*theirs)
    for i, j in diff:
        assert thresholds_fn(i, j) <= tol, (i, j, thresholds_fn(i, j))


def pml_ms_parity(x, labels, r, rl, tol_tie):
    pm = pml_miners.MultiSimilarityMiner(0.1)(x, labels, r, rl)
    om = fm.MultiSimilarityMiner(0.1)(x, labels, r, rl)
    in_batch = r is None or r is x
    S = ref.similarity(x.double(), None if in_batch else r.double())
    pos, neg = ref.pair_masks(labels, None if in_batch else rl)
    min_pos = ref._row_min(S, pos)
    max_neg = ref._row_max(S, neg)
    same_pairs_or_ties(om[:2], pm[:2], S, lambda i, j: abs(S[i, j] - 0.1 - max_neg[i]).item(), tol_tie)
    same_pairs_or_ties(om[2:], pm[2:], S, lambda i, j: abs(S[i, j] + 0.1 - min_pos[i]).item(), tol_tie)
    return pm, om


@needs_pml
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("ref_mode", ["none", "same_object", "copy", "other"])
@pytest.mark.parametrize("labels_kind", ["random", "all_unique", "all_same"])
def test_pml_multi_similarity_parity(device, tiles, dtype, ref_mode, labels_kind):
    B = 48
    x, labels, r, rl = make_case(B, 64, 12, 6, device, dtype)
    if labels_kind == "all_unique":
        labels, rl = torch.arange(B, device=device), torch.arange(64, device=device) % 80
    elif labels_kind == "all_same":
        labels, rl = torch.zeros_like(labels), torch.zeros_like(rl)
    r, rl = {"none": (None, None), "same_object": (x, labels), "copy": (x.clone(), labels.clone()),
             "other": (r, rl)}[ref_mode]
    tol_tie = 1e-12 if dtype == torch.float64 else 1e-5
    pm, om = pml_ms_parity(x, labels, r, rl, tol_tie)
    # Loss and gradients: PML's loss over PML's pairs vs ours fused (ours mines itself).
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    same = ref_mode == "same_object"
    rp = None if r is None else (xp if same else r.clone().requires_grad_())
    ro = None if r is None else (xo if same else r.clone().requires_grad_())
    lp = pml_losses.MultiSimilarityLoss()(xp, labels, pml_miners.MultiSimilarityMiner(0.1)(xp, labels, rp, rl),
                                          rp, rl)
    lo = fm.MultiSimilarityLoss(miner=fm.MultiSimilarityMiner(0.1))(xo, labels, None, ro, rl)
    # PML's usual call shape takes the fused path too (the miner's lazy tuple is never read).
    lo_usual = fm.MultiSimilarityLoss()(xo, labels, fm.MultiSimilarityMiner(0.1)(xo, labels, ro, rl), ro, rl)
    assert torch.equal(lo_usual, lo)
    if pairs(*pm[:2]) != pairs(*om[:2]) or pairs(*pm[2:]) != pairs(*om[2:]):
        pytest.skip("a pair at a mining threshold tipped differently (tie)")
    assert abs(lo.item() - lp.item()) <= (1e-6 if dtype == torch.float64 else 1e-5) * max(1.0, abs(lp.item()))
    wanted = [xp] + ([rp] if rp is not None and not same else [])
    got = [xo] + ([ro] if ro is not None and not same else [])
    if lp.requires_grad:
        ggp = torch.autograd.grad(lp, wanted, allow_unused=True)
        ggo = torch.autograd.grad(lo, got, allow_unused=True)
        for t, gp, go in zip(wanted, ggp, ggo):
            gp = torch.zeros_like(t) if gp is None else gp
            go = torch.zeros_like(t) if go is None else go
            atol = 1e-12 if dtype == torch.float64 else 2e-6 * max(1.0, gp.abs().max().item())
            torch.testing.assert_close(go, gp, rtol=1e-9 if dtype == torch.float64 else 1e-4, atol=atol)
    # The loss given PML's tuple (pair-list path) agrees too, and so does the all-pairs loss.
    lt = fm.MultiSimilarityLoss()(x, labels, pm, r, rl)
    torch.testing.assert_close(lt.double(), pml_losses.MultiSimilarityLoss()(x, labels, pm, r, rl).double(),
                               rtol=1e-6 if dtype == torch.float64 else 1e-5, atol=1e-7)
    la = fm.MultiSimilarityLoss()(x, labels, None, r, rl)
    lpa = pml_losses.MultiSimilarityLoss()(x, labels, None, r, rl)
    torch.testing.assert_close(la.double(), lpa.double(), rtol=1e-6 if dtype == torch.float64 else 1e-5, atol=1e-7)


@needs_pml
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "in_batch"])
def test_pml_batch_hard_and_pair_margin_parity(device, tiles, dtype, with_ref):
    x, labels, r, rl = make_case(50, 70, 10, 5, device, dtype, with_ref=with_ref)
    cos = CosineSimilarity()
    ours = fm.BatchHardMiner(distance=fm.CosineSimilarity())(x, labels, r, rl)
    theirs = pml_miners.BatchHardMiner(distance=cos)(x, labels, r, rl)
    assert all(torch.equal(o, t) for o, t in zip(ours, theirs))
    ours = fm.PairMarginMiner(0.3, 0.1, distance=fm.CosineSimilarity())(x, labels, r, rl)
    theirs = pml_miners.PairMarginMiner(0.3, 0.1, distance=cos)(x, labels, r, rl)
    assert pairs(*ours[:2]) == pairs(*theirs[:2]) and pairs(*ours[2:]) == pairs(*theirs[2:])
    # A triplet tuple into the Multi-Similarity loss (PML converts it to pairs).
    lo = fm.MultiSimilarityLoss()(x, labels, fm.BatchHardMiner(distance=fm.CosineSimilarity())(x, labels, r, rl), r, rl)
    lp = pml_losses.MultiSimilarityLoss()(x, labels, pml_miners.BatchHardMiner(distance=cos)(x, labels, r, rl),
                                          r, rl)
    torch.testing.assert_close(lo.double(), lp.double(), rtol=1e-6 if dtype == torch.float64 else 1e-5, atol=1e-7)


@needs_pml
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_pml_tcm_parity(device, dtype):
    x, labels, _, _ = make_case(40, 40, 8, 4, device, dtype, with_ref=False)
    for hyper in (dict(), dict(lambda_plus=0.5, lambda_minus=2.0, margin_plus=0.3, margin_minus=0.0)):
        xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        lp = pml_losses.ThresholdConsistentMarginLoss(**hyper)(xp, labels)
        lo = fm.ThresholdConsistentMarginLoss(**hyper)(xo, labels)
        tol = 1e-9 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(lo.double(), lp.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(torch.autograd.grad(lo, xo)[0], torch.autograd.grad(lp, xp)[0], rtol=tol,
                                   atol=tol)
        mined = pml_miners.MultiSimilarityMiner()(x, labels)
        torch.testing.assert_close(fm.ThresholdConsistentMarginLoss(**hyper)(x, labels, mined).double(),
                                   pml_losses.ThresholdConsistentMarginLoss(**hyper)(x, labels, mined).double(),
                                   rtol=tol, atol=tol)


@needs_pml
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("miner", ["none", "multi_similarity", "batch_hard"])
def test_pml_cross_batch_memory_parity(device, dtype, miner):
    """Several steps through a memory of 40 with batches of 16: fills, then wraps around."""
    d = 8
    make_miner = {"none": lambda lib: None,
                  "multi_similarity": lambda lib: lib.MultiSimilarityMiner(0.1),
                  "batch_hard": lambda lib: lib.BatchHardMiner(distance=(CosineSimilarity() if lib is pml_miners
                                                                         else fm.CosineSimilarity()))}[miner]
    ours = fm.CrossBatchMemory(fm.MultiSimilarityLoss(), d, memory_size=40, miner=make_miner(fm))
    theirs = pml_losses.CrossBatchMemory(pml_losses.MultiSimilarityLoss(), d, memory_size=40,
                                         miner=make_miner(pml_miners))
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for step in range(6):
        x = torch.randn(16, d, dtype=dtype, device=device)
        labels = torch.randint(0, 5, (16,), device=device)
        xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        lo, lp = ours(xo, labels), theirs(xp, labels)
        torch.testing.assert_close(lo.double(), lp.double(), rtol=tol, atol=tol)
        if lp.requires_grad:
            lo.backward()
            lp.backward()
            torch.testing.assert_close(xo.grad, xp.grad, rtol=max(tol, 1e-4), atol=tol)
        assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled == theirs.has_been_filled
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory.to(ours.embedding_memory))
    assert ours.has_been_filled


@needs_pml
def test_convert_to_triplets_is_pmls():
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    from fusedtrain.mining.pml_common import convert_to_triplets
    for n1, n2 in [(0, 0), (0, 5), (7, 0), (12, 9), (40, 33)]:
        t = (torch.randint(0, 6, (n1,)), torch.randint(0, 50, (n1,)), torch.randint(0, 6, (n2,)),
             torch.randint(0, 50, (n2,)))
        ours, theirs = convert_to_triplets(t), lmu.convert_to_triplets(t, None)
        assert all(torch.equal(x, y) for x, y in zip(ours, theirs)), (n1, n2)
        assert n1 * n2 == 0 or len(ours[0]) > 0 or not set(t[0].tolist()) & set(t[2].tolist())


@needs_pml
def test_pml_cross_batch_memory_pairs_given_to_a_triplet_miner(device):
    """A 4-tuple passed to a CrossBatchMemory whose miner mines triplets is converted to triplets and
    appended, as PML does (it raised before)."""
    d = 6
    ours = fm.CrossBatchMemory(fm.MultiSimilarityLoss(), d, memory_size=36, miner=fm.BatchHardMiner())
    theirs = pml_losses.CrossBatchMemory(pml_losses.MultiSimilarityLoss(), d, memory_size=36,
                                         miner=pml_miners.BatchHardMiner())
    previous = None
    for _ in range(3):
        x = torch.randn(12, d, dtype=torch.float64, device=device)
        labels = torch.randint(0, 3, (12,), device=device)
        given = None
        if previous is not None:  # pairs with the previous batch, as indices of its memory slots
            a1, p, a2, n = pml_miners.PairMarginMiner(0.5, 0.2, distance=CosineSimilarity())(x, labels, *previous[:2])
            given = a1, previous[2][p], a2, previous[2][n]
            assert len(a1) and len(a2)
        xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        lo, lp = ours(xo, labels, given), theirs(xp, labels, given)
        previous = x, labels, theirs.curr_batch_idx.clone()
        assert lp.item() != 0
        torch.testing.assert_close(lo, lp)
        lo.backward()
        lp.backward()
        torch.testing.assert_close(xo.grad, xp.grad)


@needs_pml
def test_pml_cross_batch_memory_enqueue_mask(device):
    d = 6
    ours = fm.CrossBatchMemory(fm.MultiSimilarityLoss(), d, memory_size=30)
    theirs = pml_losses.CrossBatchMemory(pml_losses.MultiSimilarityLoss(), d, memory_size=30)
    for _ in range(4):
        x = torch.randn(12, d, dtype=torch.float64, device=device)
        labels = torch.randint(0, 4, (12,), device=device)
        mask = torch.rand(12, device=device) < 0.5
        torch.testing.assert_close(ours(x, labels, enqueue_mask=mask), theirs(x, labels, enqueue_mask=mask))


@needs_pml
def test_pml_quirk_at_most_one_pair_gives_zero(device):
    x = torch.randn(2, 4, dtype=torch.float64, device=device)
    labels = torch.tensor([0, 1], device=device)  # one negative pair each way: two pairs -> not zero
    torch.testing.assert_close(fm.MultiSimilarityLoss()(x, labels), pml_losses.MultiSimilarityLoss()(x, labels))
    one = (torch.tensor([0], device=device), torch.tensor([1], device=device),
           torch.tensor([0], device=device), torch.tensor([1], device=device))
    labels = torch.tensor([0, 0], device=device)
    assert fm.MultiSimilarityLoss()(x, labels, one).item() == 0.0
    assert pml_losses.MultiSimilarityLoss()(x, labels, one).item() == 0.0
    x1 = x[:1]
    assert fm.MultiSimilarityLoss()(x1, labels[:1]).item() == 0.0 == pml_losses.MultiSimilarityLoss()(
        x1, labels[:1]).item()


def test_mined_pairs_fuse_only_with_their_own_inputs(device, monkeypatch):
    x, labels, r, rl = make_case(30, 40, 6, 4, device)
    miner, loss_fn = fm.MultiSimilarityMiner(0.2), fm.MultiSimilarityLoss()
    fused = fm.MultiSimilarityLoss(miner=miner)(x, labels, None, r, rl)
    lazy = miner(x, labels, r, rl)
    assert repr(lazy).startswith("MinedPairs(unread")
    with monkeypatch.context() as m:  # the fused path: the pair-list path must not run
        m.setattr(fm.MultiSimilarityLoss, "from_pairs", lambda *a: pytest.fail("pair-list path taken"))
        assert torch.equal(loss_fn(x, labels, lazy, r, rl), fused)
    assert repr(lazy).startswith("MinedPairs(unread")
    # Read (unpacked, indexed, sliced), it is PML's tuple; on other inputs it is just pairs.
    a1, p, a2, n = lazy
    want = ref.multi_similarity_mine(x, labels, r, rl, epsilon=0.2)
    assert pairs(a1, p) == pairs(*want[:2]) and pairs(*lazy[2:]) == pairs(*want[2:]) and len(lazy) == 4
    torch.testing.assert_close(loss_fn(x, labels, lazy, r, rl), fused, rtol=1e-12, atol=1e-12)
    other = x.clone()
    torch.testing.assert_close(loss_fn(other, labels, lazy, r, rl),
                               loss_fn(other, labels, tuple(lazy), r, rl), rtol=0, atol=0)


def test_classes_reject_unsupported_options():
    with pytest.raises(TypeError, match="distance"):
        fm.MultiSimilarityMiner(0.1, distance=object())
    with pytest.raises(TypeError, match="reducer"):
        fm.MultiSimilarityLoss(reducer=object())
    with pytest.raises(ValueError, match="alpha"):
        fm.MultiSimilarityLoss(alpha=-1)
    with pytest.raises(ValueError, match="memory_size"):
        fm.CrossBatchMemory(fm.MultiSimilarityLoss(), 4, memory_size=0)
