"""The latent-sharded SparseAutoencoder on 2 and 3 gloo ranks equals the single-process SAE (fp64):
outputs, activations, gradient slices, dead-latent counters, thresholds, threshold inference; ties
between ranks break as in one process; counters agree across data-parallel replicas."""
from __future__ import annotations

import pytest
import torch

from distributed_utils import run_on_ranks
from fusedtrain.sae import SparseAutoencoder

D, F, B, K = 8, 12, 10, 5          # k = 5 > F/3: a rank's candidates can be fewer than k
DEAD = [0, 8, 11]                   # dead latents (AuxK), spread over the ranks
ROUTINGS = ("topk", "feature_choice", "mutual_choice", "threshold")
THETA = dict(threshold=dict(theta=0.3))  # threshold routing: per latent, hence local to each rank
KW = dict(k_aux=2, dead_tokens_threshold=100, dtype=torch.float64)


def _state(routing: str) -> dict:
    """A single-process state dict on a coarse grid, so that every GEMM gives exact pre-activations
    and ties are true ties: latents f and f + 6 are equal (ties across ranks). The dead latents
    (AuxK) are continuous: one process's torch.topk breaks ties arbitrarily."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(D, F, routing, K, **KW, **THETA.get(routing, {}))
    sd = {name: t.clone() for name, t in sae.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    grid = lambda shape, scale: torch.randint(-3, 4, shape, generator=g).double() / scale  # noqa: E731
    sd["W_enc"] = grid((D, F), 8)
    sd["W_enc"][:, 6:] = sd["W_enc"][:, :6]
    sd["W_enc"][:, DEAD] = torch.randn(D, len(DEAD), generator=g, dtype=torch.float64)
    sd["b_enc"] = grid((F,), 16) + 0.25  # mostly positive: mutual choice rejects some (a cutoff > 0)
    sd["b_enc"][6:] = sd["b_enc"][:6]
    sd["b_dec"] = grid((D,), 4)
    sd["num_tokens_since_fired"][DEAD] = 1000
    return sd


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(-3, 4, (B, D), generator=g).double() / 2 for _ in range(2))


def _step(sae, x, x_eval):
    """One training forward/backward, then an eval forward (threshold inference)."""
    x = x.clone().reshape(2, B // 2, D).requires_grad_()  # (B, T, d) activations, as a transformer's
    out = sae(x)
    out.loss.backward()
    sae.eval()
    with torch.no_grad():
        out_eval = sae(x_eval)
    sae.train()
    dense = out.latent_acts.to_dense(F).detach()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    grads["x"] = x.grad
    return dict(out=(out.sae_out.detach(), out.fvu.detach(), out.auxk_loss.detach(), out.num_dead), acts=dense,
                grads=grads, eval_out=out_eval.sae_out, eval_acts=out_eval.latent_acts.to_dense(F))


def _ranks(rank, world_size):
    import torch.distributed as dist
    results = {}
    for routing in ROUTINGS:
        sae = SparseAutoencoder(D, F, routing, K, process_group=dist.group.WORLD, **KW,
                                **THETA.get(routing, {}))
        sae.load_full_state_dict(_state(routing))
        results[routing] = _step(sae, *_inputs(1))
        results[routing]["state"] = sae.full_state_dict()
        results[routing]["latents"] = (sae.num_local_latents, sae.latent_offset)
    try:
        SparseAutoencoder(D, 13, "topk", K, process_group=dist.group.WORLD)
    except ValueError as e:
        results["error"] = str(e)
    # Data-parallel replicas (each its own latent group of one): one set of counters for both batches.
    own = [dist.new_group([r]) for r in range(world_size)][rank]
    sae = SparseAutoencoder(D, F, "topk", 1, process_group=own, data_parallel_group=dist.group.WORLD, **KW)
    sae.load_full_state_dict(_state("topk"))
    x = torch.randn(world_size * 3, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sae(x[rank * 3:rank * 3 + 3])
    results["replicas"] = sae.num_tokens_since_fired.clone()
    return results


def _single(routing):
    sae = SparseAutoencoder(D, F, routing, K, **KW, **THETA.get(routing, {}))
    sae.load_state_dict(_state(routing))
    return sae, _step(sae, *_inputs(1))


@pytest.mark.parametrize("world_size", [2, 3])
def test_latent_sharded_equals_single_process(world_size):
    results = run_on_ranks(_ranks, world_size)  # one spawn: every check below
    close = dict(rtol=1e-12, atol=1e-13)
    for routing in ROUTINGS:
        sae, want = _single(routing)
        assert want["out"][2].item() > 0 and want["out"][3] == len(DEAD)  # AuxK ran
        assert want["acts"].count_nonzero() > 0
        for r in results:
            got, (n, start) = r[routing], r[routing]["latents"]
            for a, b in zip(got["out"], want["out"]):
                torch.testing.assert_close(a, b, **close)
            torch.testing.assert_close(got["eval_out"], want["eval_out"], **close)
            torch.testing.assert_close(got["grads"]["b_dec"], want["grads"]["b_dec"], **close)
            torch.testing.assert_close(got["grads"]["x"], want["grads"]["x"], **close)
            torch.testing.assert_close(got["grads"]["W_enc"], want["grads"]["W_enc"][:, start:start + n], **close)
            torch.testing.assert_close(got["grads"]["b_enc"], want["grads"]["b_enc"][start:start + n], **close)
            torch.testing.assert_close(got["grads"]["W_dec"], want["grads"]["W_dec"][start:start + n], **close)
            for name, value in sae.state_dict().items():  # counters, thresholds and weights, gathered
                torch.testing.assert_close(got["state"][name], value, rtol=0, atol=0)
        # Each rank holds the entries of its own latents; together, the single process's activations.
        torch.testing.assert_close(sum(r[routing]["acts"] for r in results), want["acts"], **close)
        torch.testing.assert_close(sum(r[routing]["eval_acts"] for r in results), want["eval_acts"], **close)
        if routing != "topk":
            assert sae.threshold.abs().sum() > 0  # the cutoffs were compared, not zeros
    assert all("divisible" in r["error"] and "13" in r["error"] for r in results)

    sae = SparseAutoencoder(D, F, "topk", 1, **KW)
    sae.load_state_dict(_state("topk"))
    sae(torch.randn(world_size * 3, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    for r in results:
        assert torch.equal(r["replicas"], sae.num_tokens_since_fired)


def _replica_steps(sae, x, replica: int) -> list:
    """Two training steps of `replica` on its batches x[0 + replica], x[2 + replica]: each step's
    output and input gradient."""
    steps = []
    for step in range(2):
        xr = x[2 * step + replica].clone().requires_grad_()
        result = sae(xr)
        result.loss.backward()
        steps.append((result.sae_out.detach(), xr.grad))
    return steps


def _hybrid(rank, world_size):
    """2 x 2: latents sharded over ranks {0, 1} and {2, 3}, the two latent groups data-parallel
    replicas ({0, 2}, {1, 3}), each replica its own half of the batch."""
    import torch.distributed as dist
    latent_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    replica_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    replica = rank // 2
    x = torch.randn(4, B, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = {}
    for routing in ("topk", "mutual_choice"):
        sae = SparseAutoencoder(D, F, routing, K, process_group=latent_groups[replica],
                                data_parallel_group=replica_groups[rank % 2], **KW)
        sae.load_full_state_dict(_state(routing))
        out[routing] = (_replica_steps(sae, x, replica), sae.full_state_dict())
    return out


def test_latents_sharded_and_replicated_on_a_2_by_2_grid():
    results = run_on_ranks(_hybrid, 4)
    x = torch.randn(4, B, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    close = dict(rtol=1e-12, atol=1e-13)
    for routing in ("topk", "mutual_choice"):
        replicas = []  # each replica's batches through a single-process SAE of its own
        for replica in range(2):
            sae = SparseAutoencoder(D, F, routing, K, **KW)
            sae.load_state_dict(_state(routing))
            replicas.append((_replica_steps(sae, x, replica), sae))
        whole = SparseAutoencoder(D, F, routing, K, **KW)  # one set of counters for both replicas' tokens
        whole.load_state_dict(_state(routing))
        with torch.no_grad():
            for step in range(2):
                whole(torch.cat([x[2 * step], x[2 * step + 1]]))
        for rank, (steps, state) in enumerate(r[routing] for r in results):
            want_steps, single = replicas[rank // 2]
            for (got_out, got_grad), (want_out, want_grad) in zip(steps, want_steps):
                torch.testing.assert_close(got_out, want_out, **close)
                torch.testing.assert_close(got_grad, want_grad, **close)
            assert torch.equal(state["num_tokens_since_fired"], whole.num_tokens_since_fired)
            if routing == "mutual_choice":  # the replicas' mean of their cutoffs, step by step
                mean = (replicas[0][1].threshold + replicas[1][1].threshold) / 2
                assert replicas[0][1].threshold.abs().sum() > 0
                torch.testing.assert_close(state["threshold"], mean, **close)


def test_single_process_group_of_one_and_errors():
    sae = SparseAutoencoder(D, F, "mutual_choice", K, process_group=None, **KW)
    assert type(sae) is SparseAutoencoder
    with pytest.raises(KeyError, match="state_dict lacks"):
        SparseAutoencoder(D, F, "topk", K, data_parallel_group=object(), **KW).load_full_state_dict({})
