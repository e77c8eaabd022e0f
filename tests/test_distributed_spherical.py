"""The vocab-parallel fused linear spherical loss and SphericalHead on sharded weights, on gloo ranks.

Every rank builds the same global problem from one seed, computes the single-process op on the whole
weight (float64) and the distributed path on its shard, and returns the relative errors; the parent
asserts. Several checks share one spawn (starting ranks costs seconds).
"""
from __future__ import annotations

import pytest
import torch

import fusedtrain
from fusedtrain.distributed import (VocabParallelStats, vocab_parallel_linear_spherical_loss,
                                    vocab_parallel_linear_spherical_stats)
from fusedtrain.spherical import KINDS, REDUCTIONS

from distributed_utils import run_on_ranks
from utils import rel_err

TOL = 1e-10  # float64: only the order of summation differs from the single-process op


def _problem(seed, n, d, D, bias, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(D, d, generator=g, dtype=torch.float64) / d ** 0.5 + offset
    b = torch.randn(D, generator=g, dtype=torch.float64) * 0.5 + offset if bias else None
    t = torch.randint(0, D, (n,), generator=g)
    t[1] = -100  # an ignored row
    t[3] = t[2]  # two rows of one class
    up = torch.randn(n, generator=g, dtype=torch.float64)
    return h, w, b, t, up


def _loss_and_grads(fn, h, w, b, t, up, reduction, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w)] + ([b.detach().clone().requires_grad_()]
                                                                       if b is not None else [])
    loss = fn(leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None else None, reduction=reduction, **kw)
    (loss * up if reduction == "none" else loss * -1.7).sum().backward()
    return [loss.detach()] + [x.grad for x in leaves]


def _shard(x, sizes, rank):
    start = sum(sizes[:rank])
    return None if x is None else x[start:start + sizes[rank]]


def _check_against_single_process(rank, world, seed, size_sets):
    """Errors of (loss, input grad, weight-shard grad, bias-shard grad) against the whole-weight op,
    for each kind, reduction, bias and shard layout, plus the checks that must fail loudly."""
    errors = {}
    for layout, sizes in enumerate(size_sets):
        D = sum(sizes)
        for bias in (False, True):
            h, w, b, t, up = _problem(seed + layout, 9, 6, D, bias, offset=0.3)
            for kind in KINDS:
                for reduction in REDUCTIONS:
                    ref = _loss_and_grads(fusedtrain.linear_spherical_loss, h, w, b, t, up, reduction, kind=kind)
                    got = _loss_and_grads(
                        vocab_parallel_linear_spherical_loss, h, _shard(w, sizes, rank), _shard(b, sizes, rank),
                        t, up, reduction, kind=kind)
                    ref[2:] = [_shard(x, sizes, rank) for x in ref[2:]]
                    key = f"{sizes} bias={bias} {kind} {reduction}"
                    errors[key] = max(rel_err(x, y) for x, y in zip(got, ref))
    # (batch, sequence) input, a custom ignore_index, and statistics passed in.
    sizes = size_sets[0]
    h, w, b, t, up = _problem(seed, 8, 5, sum(sizes), True)
    t[0], t[1] = 7, 7  # ignored rows: the class id 7 is ignore_index below
    stats = vocab_parallel_linear_spherical_stats(_shard(w, sizes, rank), _shard(b, sizes, rank))
    kw = dict(kind="z", ignore_index=7)
    ref = fusedtrain.linear_spherical_loss(h.view(2, 4, 5), w, t.view(2, 4), linear_bias=b, **kw)
    got = vocab_parallel_linear_spherical_loss(h.view(2, 4, 5), _shard(w, sizes, rank), t.view(2, 4),
                                               linear_bias=_shard(b, sizes, rank), stats=stats, **kw)
    errors["3-d input, ignore_index=7, stats="] = rel_err(got, ref)
    # Statistics of another weight give another loss: the comparisons above can fail.
    stale = vocab_parallel_linear_spherical_stats(_shard(w * 1.5, sizes, rank), _shard(b, sizes, rank))
    wrong = vocab_parallel_linear_spherical_loss(h, _shard(w, sizes, rank), t, linear_bias=_shard(b, sizes, rank),
                                                 stats=stale, **kw)
    return errors, rel_err(wrong, fusedtrain.linear_spherical_loss(h, w, t, linear_bias=b, **kw))


def test_vocab_parallel_loss_equals_single_process_two_ranks():
    seed = int(torch.randint(0, 2**30, ()))
    results = run_on_ranks(_check_against_single_process, 2, seed, [(4, 7), (11, 1)])
    for errors, stale_err in results:
        bad = {k: v for k, v in errors.items() if not v < TOL}
        assert not bad, bad
        assert stale_err > 1e-3


def test_vocab_parallel_loss_uneven_and_empty_shards_three_ranks():
    seed = int(torch.randint(0, 2**30, ()))
    results = run_on_ranks(_check_against_single_process, 3, seed, [(5, 2, 4), (6, 0, 5)])
    for errors, stale_err in results:
        bad = {k: v for k, v in errors.items() if not v < TOL}
        assert not bad, bad
        assert stale_err > 1e-3
