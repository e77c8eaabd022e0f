"""DistributedLossWrapper on 2 and 3 gloo ranks equals one process on the concatenated batch (fp64):
losses, gradients of the embeddings, DDP parameters after a few steps, CrossBatchMemory's memory."""
from __future__ import annotations

import pytest
import torch

import fusedtrain.mining

from distributed_utils import run_on_ranks
from fusedtrain.mining import (BatchHardMiner, CrossBatchMemory, DistributedLossWrapper, MultiSimilarityLoss,
                               MultiSimilarityMiner, PairMarginMiner, ThresholdConsistentMarginLoss)

D_IN, D = 6, 5
# Uneven slices (an empty one on 3 ranks); labels with a class seen once (an anchor without positive).
SIZES = {2: [5, 8], 3: [6, 0, 7]}


def _batch(seed: int, n: int, d: int = D):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    labels[n // 2] = 99
    return torch.randn(n, d, generator=g, dtype=torch.float64), labels


def _configs():
    """name -> (loss, wrapper miner): every path of the wrapper."""
    return {
        "ms+ms_miner": (MultiSimilarityLoss(), MultiSimilarityMiner(0.1)),
        "ms_all_pairs": (MultiSimilarityLoss(), None),
        "ms_own_miner": (MultiSimilarityLoss(miner=MultiSimilarityMiner(0.3)), None),
        "ms+pair_margin": (MultiSimilarityLoss(), PairMarginMiner(0.6, 0.1)),
        "ms+batch_hard": (MultiSimilarityLoss(), BatchHardMiner()),
    }


def _single(name, emb, labels, ref=None):
    loss, miner = _configs()[name]
    ref_emb, ref_labels = ref if ref is not None else (None, None)
    pairs = miner(emb, labels, ref_emb, ref_labels) if miner is not None else None
    return loss(emb, labels, pairs, ref_emb, ref_labels)


def _slice(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def _ddp_steps(model, x, labels, steps, loss_fn):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model(x[step]), labels[step]).backward()
        opt.step()


def _ranks(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel as DDP
    sizes, out = SIZES[world_size], {}
    emb, labels = _batch(0, sum(sizes))
    for name, (loss, miner) in _configs().items():
        e = _slice(emb, sizes, rank).clone().requires_grad_()
        value = DistributedLossWrapper(loss, miner)(e, _slice(labels, sizes, rank))
        value.backward()
        out[name] = (value.detach(), e.grad)
    # A reference set of its own (gathered in rank order as well).
    ref_emb, ref_labels = _batch(1, 3 * world_size)
    e = _slice(emb, sizes, rank).clone().requires_grad_()
    r = ref_emb[rank * 3:rank * 3 + 3].clone().requires_grad_()
    value = DistributedLossWrapper(*_configs()["ms+ms_miner"])(
        e, _slice(labels, sizes, rank), ref_emb=r, ref_labels=ref_labels[rank * 3:rank * 3 + 3])
    value.backward()
    out["ref"] = (value.detach(), e.grad, r.grad)
    # One triplet per rank: the class alone would call each rank's lists "at most one pair" and give 0.
    tiny_emb, tiny_labels = _batch(2, world_size + 1)
    tiny_labels[:] = torch.tensor([0, 0, 1, 1][:world_size + 1])
    tiny_sizes = [2] + [1] * (world_size - 1)
    e = _slice(tiny_emb, tiny_sizes, rank).clone().requires_grad_()
    value = DistributedLossWrapper(MultiSimilarityLoss(), BatchHardMiner())(e, _slice(tiny_labels, tiny_sizes, rank))
    value.backward()
    out["tiny"] = (value.detach(), e.grad)
    # CrossBatchMemory: fused (MS miner) and pair-list (pair-margin miner) paths, two calls each.
    for name, miner in (("cbm_fused", MultiSimilarityMiner(0.1)), ("cbm_pairs", PairMarginMiner(0.6, 0.1))):
        cbm = CrossBatchMemory(MultiSimilarityLoss(), D, memory_size=20, miner=miner)
        wrapper, grads, values = DistributedLossWrapper(cbm), [], []
        for call in range(2):
            emb_c, labels_c = _batch(10 + call, sum(sizes))
            e = _slice(emb_c, sizes, rank).clone().requires_grad_()
            value = wrapper(e, _slice(labels_c, sizes, rank))
            value.backward()
            grads.append(e.grad)
            values.append(value.detach())
        out[name] = (values, grads, cbm.embedding_memory.clone(), cbm.label_memory.clone())
    # A build without the compiled kernels (the reference ops; counts from the dense masks).
    import fusedtrain._core.backend as backend
    use_kernel, backend.use_kernel = backend.use_kernel, lambda *args: False
    try:
        e = _slice(emb, sizes, rank).clone().requires_grad_()
        value = DistributedLossWrapper(*_configs()["ms+ms_miner"])(e, _slice(labels, sizes, rank))
        value.backward()
        out["reference_build"] = (value.detach(), e.grad)
    finally:
        backend.use_kernel = use_kernel
    # The shared gather's backward without a reduce-scatter (gloo builds that lack it): all-reduce path.
    import fusedtrain._core.distributed as core
    x = _slice(emb, sizes, rank).clone().requires_grad_()
    (core.all_gather_rows(x) ** 2).sum().backward()
    def refuse(*args, **kwargs):
        raise RuntimeError("reduce_scatter is not supported")
    names = ("reduce_scatter_single", "reduce_scatter_tensor")
    saved = {n: getattr(core.dist, n) for n in names if hasattr(core.dist, n)}
    for n in saved:
        setattr(core.dist, n, refuse)
    try:
        y = x.detach().clone().requires_grad_()
        (core.all_gather_rows(y) ** 2).sum().backward()
    finally:
        for n, f in saved.items():
            setattr(core.dist, n, f)
    out["gather"] = (x.grad, y.grad, x.detach())
    # The acceptance run: DDP over a linear model, MS loss + MS miner, 3 SGD steps.
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(D_IN, D).double())
    xs, ls = zip(*[_batch(20 + s, sum(sizes), D_IN) for s in range(3)])
    wrapper = DistributedLossWrapper(MultiSimilarityLoss(), miner=MultiSimilarityMiner(0.1))
    _ddp_steps(model, [_slice(x, sizes, rank) for x in xs], [_slice(lab, sizes, rank) for lab in ls], 3, wrapper)
    out["ddp"] = [p.detach().clone() for p in model.module.parameters()]
    return out


def _check_share(values, grads, single, emb_grad, world_size):
    """Mean over ranks of the losses = the single loss; gradients / P, concatenated = its gradient."""
    torch.testing.assert_close(torch.stack(values).mean(), single.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(grads) / world_size, emb_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world_size", [2, 3])
def test_wrapper_equals_single_process(world_size):
    results = run_on_ranks(_ranks, world_size)  # one spawn: every check below
    _check_losses(results, world_size)
    _check_cross_batch_memory(results, world_size)
    _check_gather(results, world_size)
    _check_ddp(results, world_size)


def _check_losses(results, world_size):
    sizes = SIZES[world_size]
    emb, labels = _batch(0, sum(sizes))
    for name in _configs():
        e = emb.clone().requires_grad_()
        single = _single(name, e, labels)
        single.backward()
        assert single.item() != 0 and e.grad.abs().sum() > 0, name  # the comparison must mean something
        _check_share([r[name][0] for r in results], [r[name][1] for r in results], single, e.grad, world_size)

    e = emb.clone().requires_grad_()
    single = _single("ms+ms_miner", e, labels)
    single.backward()
    _check_share([x["reference_build"][0] for x in results], [x["reference_build"][1] for x in results], single,
                 e.grad, world_size)

    ref_emb, ref_labels = _batch(1, 3 * world_size)
    e, r = emb.clone().requires_grad_(), ref_emb.clone().requires_grad_()
    single = _single("ms+ms_miner", e, labels, (r, ref_labels))
    single.backward()
    _check_share([x["ref"][0] for x in results], [x["ref"][1] for x in results], single, e.grad, world_size)
    torch.testing.assert_close(torch.cat([x["ref"][2] for x in results]) / world_size, r.grad, rtol=1e-10, atol=1e-12)

    tiny_emb, tiny_labels = _batch(2, world_size + 1)
    tiny_labels[:] = torch.tensor([0, 0, 1, 1][:world_size + 1])
    e = tiny_emb.clone().requires_grad_()
    single = MultiSimilarityLoss()(e, tiny_labels, BatchHardMiner()(e, tiny_labels))
    single.backward()
    assert single.item() != 0
    _check_share([x["tiny"][0] for x in results], [x["tiny"][1] for x in results], single, e.grad, world_size)


def _check_cross_batch_memory(results, world_size):
    sizes = SIZES[world_size]
    for name, miner in (("cbm_fused", MultiSimilarityMiner(0.1)), ("cbm_pairs", PairMarginMiner(0.6, 0.1))):
        cbm = CrossBatchMemory(MultiSimilarityLoss(), D, memory_size=20, miner=miner)
        for call in range(2):
            emb_c, labels_c = _batch(10 + call, sum(sizes))
            e = emb_c.clone().requires_grad_()
            single = cbm(e, labels_c)
            single.backward()
            assert single.item() != 0
            _check_share([r[name][0][call] for r in results], [r[name][1][call] for r in results], single, e.grad,
                         world_size)
        for r in results:  # one memory on every rank: the single process's
            torch.testing.assert_close(r[name][2], cbm.embedding_memory, rtol=0, atol=0)
            assert torch.equal(r[name][3], cbm.label_memory)



def _check_gather(results, world_size):
    for grad, fallback_grad, x in (r["gather"] for r in results):
        torch.testing.assert_close(grad, 2 * world_size * x, rtol=1e-14, atol=0)  # P ranks' losses each use x
        torch.testing.assert_close(fallback_grad, grad, rtol=1e-14, atol=0)


def _check_ddp(results, world_size):
    sizes = SIZES[world_size]
    torch.manual_seed(0)
    model = torch.nn.Linear(D_IN, D).double()
    before = [p.detach().clone() for p in model.parameters()]
    xs, ls = zip(*[_batch(20 + s, sum(sizes), D_IN) for s in range(3)])
    loss, miner = MultiSimilarityLoss(), MultiSimilarityMiner(0.1)
    _ddp_steps(model, xs, ls, 3, lambda emb, lab: loss(emb, lab, miner(emb, lab)))
    for r in results:
        for got, want, start in zip(r["ddp"], model.parameters(), before):
            assert not torch.equal(want, start)
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)


def _tcm_configs():
    """Active pairs on both sides; `wide` makes every pair active, so a self pair would count."""
    return {"tcm": ThresholdConsistentMarginLoss(margin_plus=0.3, margin_minus=0.1),
            "tcm_wide": ThresholdConsistentMarginLoss(lambda_plus=0.7, lambda_minus=1.3, margin_plus=1.5,
                                                      margin_minus=-1.5)}


def _tcm_ranks(rank, world_size):
    import fusedtrain._core.backend as backend
    sizes, out = SIZES[world_size], {}
    emb, labels = _batch(0, sum(sizes))
    ref_emb, ref_labels = _batch(1, 3 * world_size)
    kernels = backend.use_kernel
    for build in ("kernels", "reference_build"):
        if build == "reference_build":  # a build without the compiled kernels: dense masks and autograd
            backend.use_kernel = lambda *args: False
        try:
            for name, loss in _tcm_configs().items():
                e = _slice(emb, sizes, rank).clone().requires_grad_()
                value = DistributedLossWrapper(loss)(e, _slice(labels, sizes, rank))
                value.backward()
                out[name, build] = (value.detach(), e.grad)
            e = _slice(emb, sizes, rank).clone().requires_grad_()
            r = ref_emb[rank * 3:rank * 3 + 3].clone().requires_grad_()
            value = DistributedLossWrapper(_tcm_configs()["tcm"])(e, _slice(labels, sizes, rank), ref_emb=r,
                                                                  ref_labels=ref_labels[rank * 3:rank * 3 + 3])
            value.backward()
            out["tcm_ref", build] = (value.detach(), e.grad, r.grad)
        finally:
            backend.use_kernel = kernels
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_tcm_wrapper_equals_single_process(world_size):
    # TCM is a mean over active pairs: each rank's share is its anchors' sums over the global counts.
    results = run_on_ranks(_tcm_ranks, world_size)
    emb, labels = _batch(0, sum(SIZES[world_size]))
    ref_emb, ref_labels = _batch(1, 3 * world_size)
    for build in ("kernels", "reference_build"):
        for name, loss in _tcm_configs().items():
            e = emb.clone().requires_grad_()
            single = loss(e, labels)
            single.backward()
            assert single.item() != 0 and e.grad.abs().sum() > 0, name
            _check_share([r[name, build][0] for r in results], [r[name, build][1] for r in results], single, e.grad,
                         world_size)
        e, r = emb.clone().requires_grad_(), ref_emb.clone().requires_grad_()
        single = _tcm_configs()["tcm"](e, labels, ref_emb=r, ref_labels=ref_labels)
        single.backward()
        _check_share([x["tcm_ref", build][0] for x in results], [x["tcm_ref", build][1] for x in results], single,
                     e.grad, world_size)
        torch.testing.assert_close(torch.cat([x["tcm_ref", build][2] for x in results]) / world_size, r.grad,
                                   rtol=1e-10, atol=1e-12)


def test_single_process_and_bad_arguments():
    emb, labels = _batch(0, 9)
    torch.testing.assert_close(DistributedLossWrapper(MultiSimilarityLoss(), MultiSimilarityMiner(0.1))(emb, labels),
                               _single("ms+ms_miner", emb, labels))
    with pytest.raises(TypeError, match="loss must be"):
        DistributedLossWrapper(torch.nn.MSELoss())
    with pytest.raises(TypeError, match="miner must be"):
        DistributedLossWrapper(MultiSimilarityLoss(), miner=torch.nn.Identity())
    with pytest.raises(ValueError, match="miner: give it to CrossBatchMemory"):
        DistributedLossWrapper(CrossBatchMemory(MultiSimilarityLoss(), D), miner=MultiSimilarityMiner())
    with pytest.raises(ValueError, match="labels must have shape"):
        DistributedLossWrapper(MultiSimilarityLoss())(emb, labels[:3])
    with pytest.raises(ValueError, match="enqueue_mask"):
        DistributedLossWrapper(MultiSimilarityLoss())(emb, labels, enqueue_mask=torch.ones(9, dtype=torch.bool))
    tcm = ThresholdConsistentMarginLoss()
    torch.testing.assert_close(DistributedLossWrapper(tcm)(emb, labels), tcm(emb, labels))
    with pytest.raises(ValueError, match="miner: ThresholdConsistentMarginLoss"):
        DistributedLossWrapper(tcm, miner=MultiSimilarityMiner())
    with pytest.raises(ValueError, match="loss: DistributedLossWrapper splits ThresholdConsistentMarginLoss"):
        DistributedLossWrapper(ThresholdConsistentMarginLoss(reducer=_SumReducer()))


@pytest.mark.parametrize("make", [
    lambda: MultiSimilarityLoss(distance=fusedtrain.mining.LpDistance()),
    lambda: MultiSimilarityLoss(reducer=_SumReducer()),
    lambda: MultiSimilarityLoss(miner=MultiSimilarityMiner(0.1, distance=fusedtrain.mining.LpDistance())),
], ids=["lp_distance", "sum_reducer", "lp_miner"])
def test_losses_the_split_cannot_honour_raise(make):
    # The per-rank split computes the fused cosine/mean MS loss: anything else must not run silently.
    with pytest.raises(ValueError, match="loss: DistributedLossWrapper"):
        DistributedLossWrapper(make())


class _SumReducer:
    """A PML-style reducer (duck-typed): the sum of the per-anchor losses."""

    def __call__(self, loss_dict, embeddings, labels):
        return sum(entry["losses"].sum() for entry in loss_dict.values())
