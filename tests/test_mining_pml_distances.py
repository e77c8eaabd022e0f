"""PML's `distance=`, `reducer=`, `embedding_regularizer=` and statistics in fusedtrain.mining's
classes: against a float64 oracle built here (full matrix), and against pytorch-metric-learning 2.9.0
(skipped without it) on random and adversarial inputs (ties, duplicates, one class, zero vectors).
Every test runs on "cpu" and (marked `cuda`) on "cuda"; `small_tiles` puts tile edges everywhere.
"""
from __future__ import annotations

import pytest
import torch

from fusedtrain import mining as fm
from fusedtrain.mining import distance_tiles

from mining_helpers import make_case, pairs

try:
    import pytorch_metric_learning
    from pytorch_metric_learning import distances as pml_distances
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning import miners as pml_miners
    from pytorch_metric_learning import reducers as pml_reducers
    from pytorch_metric_learning import regularizers as pml_regularizers
    HAS_PML = pytorch_metric_learning.__version__ == "2.9.0"
except Exception:  # noqa: BLE001 - any import failure means: no parity tests
    HAS_PML = False

needs_pml = pytest.mark.skipif(not HAS_PML, reason="pytorch-metric-learning 2.9.0 not installed")

# (normalize_embeddings, power) of the LpDistance variants PML's tests use, plus unnormalized squared.
LP_VARIANTS = [(True, 1), (False, 1), (True, 2), (False, 2)]


@pytest.fixture(params=[None, 97], ids=["one_tile", "small_tiles"])
def tiles(request, monkeypatch):
    """Default tiles, or tiles of 97 elements in both the kernels and the tiled Python path."""
    if request.param is None:
        yield
        return
    monkeypatch.setattr(distance_tiles, "_TILE_ELEMENTS", request.param)
    previous = None
    if hasattr(torch.ops.fusedtrain, "_mining_tile_elements"):
        previous = torch.ops.fusedtrain._mining_tile_elements(request.param)
    try:
        yield
    finally:
        if previous is not None:
            torch.ops.fusedtrain._mining_tile_elements(previous)


def oracle_matrix(x, r, normalize, power, cosine=False):
    """PML's matrix in float64, whole: cosine similarity or ‖e − r‖₂ (**power)."""
    x = x.double()
    r = x if r is None else r.double()
    if cosine or normalize:
        x, r = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(r, dim=1)
    if cosine:
        return x @ r.t()
    return ((x[:, None, :] - r[None, :, :]) ** 2).sum(-1).sqrt() ** power


def oracle_masks(labels, rl):
    in_batch = rl is None
    rl = labels if in_batch else rl
    pos = labels[:, None] == rl[None, :]
    neg = ~pos
    if in_batch:
        pos.fill_diagonal_(False)
    return pos, neg


def midway(values):
    v = values.sort().values
    k = len(v) // 2
    return ((v[k] + v[k + 1]) / 2).item()


def as_pairs(mask):
    return pairs(*torch.where(mask))


@pytest.mark.parametrize("normalize,power", LP_VARIANTS)
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "in_batch"])
def test_lp_miners_match_float64_oracle(device, tiles, normalize, power, with_ref):
    x, labels, r, rl = make_case(37, 29, 6, 4, device, torch.float64, with_ref=with_ref)
    dist = fm.LpDistance(normalize_embeddings=normalize, power=power)
    D = oracle_matrix(x, r, normalize, power)
    pos, neg = oracle_masks(labels, rl)
    # Pair margin: margins midway between two middle values of D (so both sides mine something
    # and no entry sits on a margin, where the rounding of D would decide).
    pm, nm = midway(D[pos]), midway(D[neg])
    a1, p, a2, n = fm.PairMarginMiner(pm, nm, distance=dist)(x, labels, r, rl)
    assert pairs(a1, p) == as_pairs(pos & (D > pm)) and pairs(a2, n) == as_pairs(neg & (D < nm))
    # Multi-Similarity: ε-window around the farthest positive / closest negative.
    eps = 0.1
    min_neg = D.masked_fill(~neg, float("inf")).amin(1, keepdim=True)
    max_pos = D.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
    a1, p, a2, n = fm.MultiSimilarityMiner(eps, distance=dist)(x, labels, r, rl)
    assert pairs(a1, p) == as_pairs(pos & (D + eps > min_neg)) and pairs(a2, n) == as_pairs(neg & (D - eps < max_pos))
    # Batch hard: farthest positive, closest negative, anchors with both.
    a, p, n = fm.BatchHardMiner(distance=dist)(x, labels, r, rl)
    keep = pos.any(1) & neg.any(1)
    assert torch.equal(a, torch.where(keep)[0])
    assert torch.equal(p, D.masked_fill(~pos, float("-inf")).argmax(1)[keep])
    assert torch.equal(n, D.masked_fill(~neg, float("inf")).argmin(1)[keep])


def oracle_ms_losses(D, keep_pos, keep_neg, alpha, beta, base, inverted):
    """PML MultiSimilarityLoss per anchor from the whole matrix."""
    pos_exp = base - D if inverted else D - base
    neg_exp = D - base if inverted else base - D

    def lse1(x, mask):
        x = x.masked_fill(~mask, float("-inf"))
        out = torch.logsumexp(torch.cat([x, torch.zeros_like(x[:, :1])], 1), 1)
        return out.masked_fill(~mask.any(1), 0)
    return lse1(alpha * pos_exp, keep_pos) / alpha + lse1(beta * neg_exp, keep_neg) / beta


@pytest.mark.parametrize("normalize,power", LP_VARIANTS)
@pytest.mark.parametrize("mine", [False, True], ids=["all_pairs", "mined"])
def test_lp_ms_loss_and_gradient_match_float64_oracle(device, tiles, normalize, power, mine):
    x, labels, r, rl = make_case(23, 31, 5, 3, device, torch.float64)
    x.requires_grad_()
    r.requires_grad_()
    alpha, beta, base, eps = 2.0, 10.0, 1.0, 0.2
    dist = fm.LpDistance(normalize_embeddings=normalize, power=power)
    miner = fm.MultiSimilarityMiner(eps, distance=fm.LpDistance(normalize_embeddings=normalize, power=power))
    loss = fm.MultiSimilarityLoss(alpha, beta, base, distance=dist, miner=miner if mine else None)(x, labels, None,
                                                                                                    r, rl)
    D = oracle_matrix(x, r, normalize, power)
    pos, neg = oracle_masks(labels, rl)
    if mine:
        with torch.no_grad():
            min_neg = D.masked_fill(~neg, float("inf")).amin(1, keepdim=True)
            max_pos = D.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
        pos, neg = pos & (D + eps > min_neg), neg & (D - eps < max_pos)
    want = oracle_ms_losses(D, pos, neg, alpha, beta, base, inverted=False).mean()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(loss, (x, r))
    g_want = torch.autograd.grad(want, (x, r))
    for got, exp in zip(g, g_want):
        torch.testing.assert_close(got, exp, rtol=1e-8, atol=1e-10)


def test_nonfinite_rows_give_nan_lp_loss(device):
    x, labels, _, _ = make_case(12, 12, 4, 3, device, torch.float64, with_ref=False)
    x[3, 1] = float("nan")
    loss = fm.MultiSimilarityLoss(distance=fm.LpDistance(normalize_embeddings=False))(x, labels)
    assert torch.isnan(loss)


@pytest.mark.parametrize("bad", ["DotProductSimilarity", "SNRDistance", "p1", "power3", "subclass"])
def test_unsupported_distances_are_refused(bad):
    class DotProductSimilarity:
        p, power, normalize_embeddings, is_inverted = 2, 1, False, True

    class SNRDistance:
        p, power, normalize_embeddings, is_inverted = 2, 1, False, False

    class MyLp(fm.LpDistance):
        pass
    make = {"DotProductSimilarity": DotProductSimilarity, "SNRDistance": SNRDistance, "subclass": MyLp,
            "p1": lambda: type("LpDistance", (), dict(p=1, power=1, normalize_embeddings=True, is_inverted=False))(),
            "power3": lambda: type("LpDistance", (), dict(p=2, power=3, normalize_embeddings=True,
                                                          is_inverted=False))()}[bad]
    for cls in (fm.MultiSimilarityMiner, fm.PairMarginMiner, fm.BatchHardMiner, fm.MultiSimilarityLoss):
        with pytest.raises(TypeError, match="distance .* not supported; supported: CosineSimilarity"):
            cls(distance=make())
    with pytest.raises(TypeError, match="ThresholdConsistentMarginLoss: distance must be CosineSimilarity"):
        fm.ThresholdConsistentMarginLoss(distance=fm.LpDistance())
    with pytest.raises(TypeError, match="LpDistance"):
        fm.LpDistance(power=3)


def test_bad_reducer_and_regularizer_are_refused():
    with pytest.raises(TypeError, match="reducer"):
        fm.MultiSimilarityLoss(reducer="mean")
    with pytest.raises(TypeError, match="embedding_regularizer"):
        fm.ThresholdConsistentMarginLoss(embedding_regularizer=3)
    with pytest.raises(TypeError, match="embedding_reg_weight"):
        fm.MultiSimilarityLoss(embedding_regularizer=lambda e: e.sum(), embedding_reg_weight="1")
    with pytest.raises(TypeError, match="unsupported arguments"):
        fm.PairMarginMiner(margin=1)


def test_reducer_and_regularizer_without_pml(device):
    """A duck-typed reducer and regularizer: called as PML calls them."""
    x, labels, _, _ = make_case(10, 10, 4, 3, device, torch.float64, with_ref=False)
    seen = {}

    def total(loss_dict, embeddings, labels_):
        seen.update(loss_dict)
        entry = loss_dict["loss"]
        return entry["losses"].sum()
    base = fm.MultiSimilarityLoss(reducer=None)
    per_anchor_mean = base(x, labels)
    got = fm.MultiSimilarityLoss(reducer=total)(x, labels)
    assert seen["loss"]["reduction_type"] == "element" and seen["loss"]["losses"].shape == (10,)
    torch.testing.assert_close(got, per_anchor_mean * 10, rtol=1e-10, atol=1e-12)
    reg = fm.MultiSimilarityLoss(embedding_regularizer=lambda e: e.norm(dim=1).mean(), embedding_reg_weight=0.5)
    torch.testing.assert_close(reg(x, labels), per_anchor_mean + 0.5 * x.norm(dim=1).mean(), rtol=1e-10, atol=1e-12)


# -- against PML 2.9.0 -----------------------------------------------------------------------------

def pml_lp(normalize, power):
    return pml_distances.LpDistance(normalize_embeddings=normalize, power=power)


def adversarial_inputs(kind, device):
    """Inputs whose distances tie exactly (integer coordinates, duplicated rows) or degenerate."""
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-2, 3, (18, 3), generator=g).double()
    labels = torch.randint(0, 3, (18,), generator=g)
    if kind == "duplicates":
        x[9:] = x[:9]
    elif kind == "one_class":
        labels.zero_()
    elif kind == "zero_vectors":
        x[::3] = 0
    elif kind == "singletons":
        labels = torch.arange(18)
    return x.to(device), labels.to(device)


@needs_pml
@pytest.mark.parametrize("kind", ["random", "ties", "duplicates", "one_class", "zero_vectors", "singletons"])
@pytest.mark.parametrize("normalize,power", LP_VARIANTS + [("cosine", 1)])
def test_miners_equal_pml(device, kind, normalize, power):
    if kind == "random":
        x, labels, _, _ = make_case(40, 40, 6, 4, device, torch.float32, with_ref=False)
    else:
        x, labels = adversarial_inputs(kind, device)
    cosine = normalize == "cosine"
    ours_d = (lambda: fm.CosineSimilarity()) if cosine else (lambda: fm.LpDistance(normalize, p=2, power=power))
    theirs_d = (lambda: pml_distances.CosineSimilarity()) if cosine else (lambda: pml_lp(normalize, power))
    for ours_cls, theirs_cls, args in ((fm.PairMarginMiner, pml_miners.PairMarginMiner, (0.9, 1.5)),
                                       (fm.PairMarginMiner, pml_miners.PairMarginMiner, (0.2, 0.8)),
                                       (fm.MultiSimilarityMiner, pml_miners.MultiSimilarityMiner, (0.1,))):
        ours_m, theirs_m = ours_cls(*args, distance=ours_d()), theirs_cls(*args, distance=theirs_d())
        ours, theirs = ours_m(x, labels), theirs_m(x, labels)
        assert pairs(*ours[:2]) == pairs(*theirs[:2]) and pairs(*ours[2:]) == pairs(*theirs[2:])
        assert (ours_m.num_pos_pairs, ours_m.num_neg_pairs) == (theirs_m.num_pos_pairs, theirs_m.num_neg_pairs)
    ours_m, theirs_m = fm.BatchHardMiner(distance=ours_d()), pml_miners.BatchHardMiner(distance=theirs_d())
    ours, theirs = ours_m(x, labels), theirs_m(x, labels)
    assert all(torch.equal(o, t) for o, t in zip(ours, theirs)) and ours_m.num_triplets == theirs_m.num_triplets


@needs_pml
def test_defaults_are_pml_defaults(device):
    """The acceptance cases of issue 14: PairMarginMiner() is PML's (LpDistance), with cosine it is
    PML's with cosine; MultiSimilarityLoss(CosineSimilarity(), MeanReducer()) is PML's default."""
    x, labels, _, _ = make_case(60, 60, 8, 5, device, torch.float32, with_ref=False)
    for kw_ours, kw_theirs in (({}, {}), ({"distance": fm.CosineSimilarity()},
                                         {"distance": pml_distances.CosineSimilarity()}),
                               ({"distance": pml_distances.CosineSimilarity()},
                                {"distance": pml_distances.CosineSimilarity()})):
        ours, theirs = fm.PairMarginMiner(**kw_ours)(x, labels), pml_miners.PairMarginMiner(**kw_theirs)(x, labels)
        assert pairs(*ours[:2]) == pairs(*theirs[:2]) and pairs(*ours[2:]) == pairs(*theirs[2:])
    assert fm.BatchHardMiner().spec.kind == "lp" and fm.PairMarginMiner().spec.kind == "lp"
    assert fm.MultiSimilarityMiner().spec.kind == "cosine" and fm.MultiSimilarityLoss().spec.kind == "cosine"
    xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    lo = fm.MultiSimilarityLoss(distance=pml_distances.CosineSimilarity(), reducer=pml_reducers.MeanReducer())(xo,
                                                                                                              labels)
    lp = pml_losses.MultiSimilarityLoss()(xp, labels)
    torch.testing.assert_close(lo, lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(lo, xo)[0], torch.autograd.grad(lp, xp)[0], rtol=1e-4, atol=1e-6)


REDUCERS = ["none", "mean", "sum", "avg_non_zero", "threshold", "per_anchor"]


def make_reducer(name):
    return {"none": lambda: None, "mean": pml_reducers.MeanReducer, "sum": pml_reducers.SumReducer,
            "avg_non_zero": pml_reducers.AvgNonZeroReducer,
            "threshold": lambda: pml_reducers.ThresholdReducer(low=0.5),
            "per_anchor": pml_reducers.PerAnchorReducer}[name]()


@needs_pml
@pytest.mark.parametrize("reducer", REDUCERS)
@pytest.mark.parametrize("distance", ["cosine", "lp", "lp_squared_raw"])
def test_ms_loss_reducers_regularizers_equal_pml(device, reducer, distance):
    x, labels, r, rl = make_case(30, 25, 6, 4, device, torch.float64)
    regularizer = reducer in ("none", "sum", "threshold")
    make_d = {"cosine": (fm.CosineSimilarity, pml_distances.CosineSimilarity),
              "lp": (fm.LpDistance, pml_distances.LpDistance),
              "lp_squared_raw": (lambda: fm.LpDistance(normalize_embeddings=False, power=2),
                                 lambda: pml_lp(False, 2))}[distance]
    reg = dict(embedding_regularizer=pml_regularizers.LpRegularizer(), embedding_reg_weight=0.3) if regularizer else {}
    hyper = dict(alpha=2.0, beta=3.0, base=0.5) if distance != "cosine" else {}
    for with_miner in (False, True):
        xo, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = fm.MultiSimilarityLoss(distance=make_d[0](), reducer=make_reducer(reducer), **hyper, **reg)
        theirs = pml_losses.MultiSimilarityLoss(distance=make_d[1](), reducer=make_reducer(reducer), **hyper, **reg)
        if with_miner:
            mo = fm.MultiSimilarityMiner(0.3, distance=make_d[0]())(xo, labels, r, rl)
            mp = pml_miners.MultiSimilarityMiner(0.3, distance=make_d[1]())(xp, labels, r, rl)
        else:
            mo = mp = None
        lo, lp = ours(xo, labels, mo, r, rl), theirs(xp, labels, mp, r, rl)
        torch.testing.assert_close(lo, lp, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(lo, xo)[0], torch.autograd.grad(lp, xp)[0], rtol=1e-7,
                                   atol=1e-10)


@needs_pml
@pytest.mark.parametrize("reducer", ["mean", "sum"])
def test_tcm_reducer_and_regularizer_equal_pml(device, reducer):
    x, labels, _, _ = make_case(20, 20, 5, 3, device, torch.float64, with_ref=False)
    reg = dict(embedding_regularizer=pml_regularizers.LpRegularizer(), embedding_reg_weight=2.0)
    lo = fm.ThresholdConsistentMarginLoss(reducer=make_reducer(reducer), **reg)(x, labels)
    lp = pml_losses.ThresholdConsistentMarginLoss(reducer=make_reducer(reducer), **reg)(x, labels)
    torch.testing.assert_close(lo, lp, rtol=1e-9, atol=1e-12)


@needs_pml
@pytest.mark.parametrize("distance", ["lp", "cosine"])
def test_miner_statistics_equal_pml(device, distance):
    x, labels, _, _ = make_case(26, 26, 5, 3, device, torch.float64, with_ref=False)
    ours_d = fm.LpDistance if distance == "lp" else fm.CosineSimilarity
    theirs_d = pml_distances.LpDistance if distance == "lp" else pml_distances.CosineSimilarity
    ours = fm.BatchHardMiner(distance=ours_d(), collect_stats=True)
    theirs = pml_miners.BatchHardMiner(distance=theirs_d(), collect_stats=True)
    ours(x, labels), theirs(x, labels)
    for name in fm.BatchHardMiner._STATS + ["num_triplets"]:
        assert getattr(ours, name) == pytest.approx(getattr(theirs, name), rel=1e-12, abs=1e-12), name
    ours = fm.PairMarginMiner(0.5, 0.7, distance=ours_d(), collect_stats=True)
    theirs = pml_miners.PairMarginMiner(0.5, 0.7, distance=theirs_d(), collect_stats=True)
    ours(x, labels), theirs(x, labels)
    for name in ("pos_pair_dist", "neg_pair_dist", "num_pos_pairs", "num_neg_pairs"):
        assert getattr(ours, name) == pytest.approx(getattr(theirs, name), rel=1e-12, abs=1e-12), name
    # Without collect_stats PML has no distance statistics, only the counts.
    quiet = fm.PairMarginMiner(distance=ours_d(), collect_stats=False)
    quiet(x, labels)
    assert getattr(quiet, "pos_pair_dist", None) is None and quiet.num_pos_pairs >= 0


@needs_pml
def test_lazy_ms_miner_counts_equal_pml(device):
    """The cosine miner's lazy pairs: counts read directly, after the fused loss, and in a
    CrossBatchMemory's fused call (where PML's miner also counts each anchor's own slot)."""
    x, labels, _, _ = make_case(30, 30, 6, 4, device, torch.float32, with_ref=False)
    theirs = pml_miners.MultiSimilarityMiner(0.2)
    theirs(x, labels)
    ours = fm.MultiSimilarityMiner(0.2)
    ours(x, labels)
    assert (ours.num_pos_pairs, ours.num_neg_pairs) == (theirs.num_pos_pairs, theirs.num_neg_pairs)
    fm.MultiSimilarityLoss()(x, labels, ours(x, labels))
    assert (ours.num_pos_pairs, ours.num_neg_pairs) == (theirs.num_pos_pairs, theirs.num_neg_pairs)
    om, tm = fm.MultiSimilarityMiner(0.1), pml_miners.MultiSimilarityMiner(0.1)
    oc = fm.CrossBatchMemory(fm.MultiSimilarityLoss(), 6, memory_size=50, miner=om)
    tc = pml_losses.CrossBatchMemory(pml_losses.MultiSimilarityLoss(), 6, memory_size=50, miner=tm)
    for _ in range(3):
        e, lab = torch.randn(20, 6, device=device), torch.randint(0, 4, (20,), device=device)
        torch.testing.assert_close(oc(e, lab), tc(e, lab), rtol=1e-5, atol=1e-6)
        assert (om.num_pos_pairs, om.num_neg_pairs) == (tm.num_pos_pairs, tm.num_neg_pairs)


@needs_pml
@pytest.mark.parametrize("distance", ["lp", "lp_squared_raw"])
def test_cross_batch_memory_with_lp_equals_pml(device, distance):
    make = {"lp": (fm.LpDistance, pml_distances.LpDistance),
            "lp_squared_raw": (lambda: fm.LpDistance(False, power=2), lambda: pml_lp(False, 2))}[distance]
    oc = fm.CrossBatchMemory(fm.MultiSimilarityLoss(1.0, 2.0, 1.0, distance=make[0]()), 5, memory_size=30,
                             miner=fm.MultiSimilarityMiner(0.2, distance=make[0]()))
    tc = pml_losses.CrossBatchMemory(pml_losses.MultiSimilarityLoss(1.0, 2.0, 1.0, distance=make[1]()), 5,
                                     memory_size=30, miner=pml_miners.MultiSimilarityMiner(0.2, distance=make[1]()))
    for _ in range(4):
        e = torch.randn(12, 5, device=device, dtype=torch.float64)
        lab = torch.randint(0, 3, (12,), device=device)
        eo, et = e.clone().requires_grad_(), e.clone().requires_grad_()
        lo, lt = oc(eo, lab), tc(et, lab)
        torch.testing.assert_close(lo, lt, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(lo, eo)[0], torch.autograd.grad(lt, et)[0], rtol=1e-7,
                                   atol=1e-10)
