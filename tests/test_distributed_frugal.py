"""FRUGAL under DDP and FSDP2 on gloo ranks, against single-process FRUGAL in float64 (docs/distributed.md).

- DDP, per-rank RNG state, no `seed`: the replicas stay bitwise equal (the seed is rank 0's, broadcast);
  a control with per-rank seeds drifts, so the check can fail.
- FSDP2 (`fully_shard` on a CPU mesh, 2 and 3 ranks: uneven shards, one of them empty) with the same
  gradients as one process: columns / rows / block give the single-process parameters bit for bit;
  svd / random (whose projections sum over the shards in another order) to 1e-14 relative.
- Checkpoints saved at P = 2 (the full state dict of get_optimizer_state_dict, and a sharded
  torch.distributed.checkpoint) resume in one process bit-identically.

Each spawn runs many checks (a spawn of gloo ranks costs seconds).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed_utils import run_on_ranks
from fusedtrain.optim import FRUGAL

# Uneven under 2 and 3 ranks; (2, 9) leaves rank 2 of 3 an empty shard; (5, 12) takes the left
# (row-side) basis of svd/random, the others the right one; (6, 2, 3) is viewed as 6 × 6.
SHAPES = {"a": (7, 10), "b": (10, 5), "c": (5, 12), "d": (6, 2, 3), "e": (2, 9), "f": (9, 4), "bias": (7,)}
STEPS = 7  # refreshes at steps 0, 3, 6 (update_gap 3)
BASE = dict(lr=1e-2, weight_decay=0.1, density=0.4, update_gap=3)
CONFIGS = {
    "columns": dict(proj="columns"),
    "rows": dict(proj="rows"),
    "rows_keep": dict(proj="rows", reset_state=False),  # moments follow their slots across a redraw
    "block": dict(proj="block", density=0.5),
    "svd": dict(proj="svd"),
    "random": dict(proj="random"),
    "rows_maximize": dict(proj="rows", maximize=True),  # the negated gradient, on each shard
}
EXACT = ("columns", "rows", "rows_keep", "block", "rows_maximize")
LOW_RANK_TOL = 1e-14  # svd/random: max |difference| / max |parameter| (measured ~1e-16)


class Weights(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for name, shape in SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64)))


def gradients(seed: int, steps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [{name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in SHAPES.items()}
            for _ in range(steps)]


def checkpoint_groups(model) -> list[dict]:
    """Every kind in one optimizer: the checkpoint carries them all (and one shared generator)."""
    return [{"params": [model.a], "proj": "columns"},
            {"params": [model.b], "proj": "rows", "reset_state": False},
            {"params": [model.d, model.f], "proj": "block", "density": 0.5},
            {"params": [model.c], "proj": "svd"},
            {"params": [model.e, model.bias], "proj": "random"}]


def single_process(seed: int, config: dict, grads: list[dict], rng_seed: int) -> dict:
    """The oracle: FRUGAL in one process, its seed drawn (no `seed=`) after torch.manual_seed(rng_seed)."""
    model = Weights(seed)
    torch.manual_seed(rng_seed)
    opt = FRUGAL(model.parameters(), **{**BASE, **config})
    step_all(model, opt, grads)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def step_all(model, opt, grads, shard=None) -> None:
    for g in grads:
        for name, p in model.named_parameters():
            p.grad = g[name] if shard is None else shard(g[name], p)
        opt.step()


# ---------------------------------------------------------------------------------------------
# On the ranks

def _shard_like(full, p):
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)


def _fsdp_model(seed, world, mesh_shape=None):
    """fully_shard over all ranks, or over a 2-D (replicate, shard) mesh: HSDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = Weights(seed)
    names = ("replicate", "shard") if mesh_shape is not None else None
    fully_shard(model, mesh=init_device_mesh("cpu", mesh_shape or (world,), mesh_dim_names=names))
    return model


def _full(model) -> dict:
    return {name: p.full_tensor() for name, p in model.named_parameters()}


def _fsdp_runs(rank, world, seed, rng_seed, mesh_shape=None, configs=None):
    """Every config (or those named) under fully_shard, RNG state per rank, no seed: the full
    parameters after STEPS."""
    from torch.distributed.tensor import DTensor
    out = {}
    grads = gradients(seed, STEPS)
    for name, config in CONFIGS.items():
        if configs is not None and name not in configs:
            continue
        model = _fsdp_model(seed, world, mesh_shape)
        torch.manual_seed(rng_seed + rank)  # rank 0's state is the oracle's; the others differ
        opt = FRUGAL(model.parameters(), **{**BASE, **config})
        step_all(model, opt, grads, _shard_like)
        out[name] = _full(model)
        if name in ("columns", "block", "svd"):  # the moments are DTensors placed like their param
            moments = [(opt.state[p][key], p) for p in model.parameters() if "exp_avg" in opt.state[p]
                       for key in ("exp_avg", "exp_avg_sq")]
            out[f"{name}_placed"] = bool(moments) and all(
                isinstance(m, DTensor) and m.placements == p.placements for m, p in moments)
    return out


def _checkpoint_run(rank, world, seed, rng_seed, folder):
    """P = 2: STEPS steps, save (full state dict and DCP), STEPS more; returns the saves and the end."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    model = _fsdp_model(seed, world)
    torch.manual_seed(rng_seed + rank)
    opt = FRUGAL(checkpoint_groups(model), **BASE)
    grads = gradients(seed, 2 * STEPS)
    step_all(model, opt, grads[:STEPS], _shard_like)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    saved = dict(model=get_model_state_dict(model, options=full), optim=get_optimizer_state_dict(model, opt, options=full))
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=folder)
    step_all(model, opt, grads[STEPS:], _shard_like)
    return dict(saved=saved if rank == 0 else None, end=_full(model))


def _ddp_runs(rank, world, seed):
    """DDP on a small MLP (a projection per layer), each rank its own data and RNG state: the
    parameters after 6 steps, with no seed (shared) and with per-rank seeds (the control, must drift)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    for case in ("shared", "control"):
        torch.manual_seed(seed)
        layers = [nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 14), nn.Linear(14, 10)]
        model = nn.Sequential(*layers).double()
        ddp = DDP(model)
        torch.manual_seed(seed + 1 + rank)  # as a per-rank data loader leaves it
        groups = [{"params": layer.parameters(), "proj": proj}
                  for layer, proj in zip(layers, ("columns", "rows", "svd", "random"))]
        opt = FRUGAL(groups, lr=1e-2, density=0.5, update_gap=2, **({"seed": rank} if case == "control" else {}))
        for _ in range(6):
            x = torch.randn(8, 12, dtype=torch.float64)
            opt.zero_grad()
            ddp(x).tanh().pow(2).mean().backward()
            opt.step()
        out[case] = [p.detach().clone() for p in model.parameters()]
    return out


def _errors(rank, world):
    """Refusals on a sharded param: a placement other than dim-0 sharding, a plain gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    messages = []
    for placement, plain_grad in ((Shard(1), False), (Shard(0), True)):
        p = nn.Parameter(distribute_tensor(torch.randn(4, 6, dtype=torch.float64), mesh, [placement]))
        p.grad = torch.zeros(p.shape, dtype=p.dtype) if plain_grad else torch.zeros_like(p)
        try:
            FRUGAL([p], seed=0).step()
            messages.append(None)
        except (NotImplementedError, TypeError) as exc:
            messages.append(f"{type(exc).__name__}: {exc}")
    return messages


def _two_ranks(rank, world, seed, rng_seed, folder):
    return dict(ddp=_ddp_runs(rank, world, seed), fsdp=_fsdp_runs(rank, world, seed, rng_seed),
                checkpoint=_checkpoint_run(rank, world, seed, rng_seed, folder), errors=_errors(rank, world))


# ---------------------------------------------------------------------------------------------
# In the test process

def _compare(got: dict, want: dict, name: str) -> None:
    for key, w in want.items():
        g = got[key]
        if name in EXACT:
            assert torch.equal(g, w), f"{name}: param {key} differs by {(g - w).abs().max().item():.3g}"
        else:
            err = ((g - w).abs().max() / w.abs().max()).item()
            assert err <= LOW_RANK_TOL, f"{name}: param {key} off by {err:.3g} (relative)"


def _check_fsdp(results: list, seed: int, rng_seed: int, configs=None) -> None:
    grads = gradients(seed, STEPS)
    for rank_out in results:
        for name, config in CONFIGS.items():
            if configs is None or name in configs:
                _compare(rank_out[name], single_process(seed, config, grads, rng_seed), name)
        assert all(rank_out[f"{name}_placed"] for name in ("columns", "block", "svd") if f"{name}_placed" in rank_out)


def _resume_one_process(saved_load, seed, rng_seed) -> dict:
    """P = 1: a plain model and FRUGAL (another seed: the generator must come from the checkpoint)
    loaded from the P = 2 save, then the last STEPS steps."""
    model = Weights(seed + 7)  # other weights: they must come from the checkpoint too
    torch.manual_seed(rng_seed + 99)
    opt = FRUGAL(checkpoint_groups(model), **{**BASE, "seed": 12345})
    saved_load(model, opt)
    step_all(model, opt, gradients(seed, 2 * STEPS)[STEPS:])
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _check_checkpoint(results: list, seed: int, rng_seed: int, folder: str) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    import torch.distributed.checkpoint as dcp
    saved = results[0]["checkpoint"]["saved"]
    end = results[0]["checkpoint"]["end"]
    assert all(torch.equal(end[k], r["checkpoint"]["end"][k]) for r in results for k in end)
    full = StateDictOptions(full_state_dict=True)

    def load_full(model, opt):
        set_model_state_dict(model, saved["model"], options=full)
        set_optimizer_state_dict(model, opt, saved["optim"], options=full)
        reloaded = get_optimizer_state_dict(model, opt)  # what was loaded is what was saved, bit for bit
        for fqn, state in saved["optim"]["state"].items():
            for key, value in state.items():
                mine = reloaded["state"][fqn][key]
                assert (torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value), (fqn, key)

    def load_dcp(model, opt):
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=folder)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])

    for how, load in (("full state dict", load_full), ("distributed checkpoint", load_dcp)):
        resumed = _resume_one_process(load, seed, rng_seed)
        for key, want in end.items():  # P = 2 continued: the same maths; svd/random's sums in another order
            tol = 0.0 if key in ("a", "b", "d", "f", "bias") else LOW_RANK_TOL * want.abs().max().item()
            assert (resumed[key] - want).abs().max().item() <= tol, f"{how}: param {key}"


def _check_ddp(results: list) -> None:
    first, second = (r["ddp"] for r in results)
    for i, (a, b) in enumerate(zip(first["shared"], second["shared"])):
        assert torch.equal(a, b), f"DDP: replicas differ in param {i} by {(a - b).abs().max().item():.3g}"
    assert not all(torch.equal(a, b) for a, b in zip(first["control"], second["control"])), \
        "per-rank seeds should make DDP replicas drift (the control)"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # dcp.load in one process
def test_two_ranks_ddp_fsdp_checkpoint(tmp_path):
    seed, rng_seed = (int(x) for x in torch.randint(0, 2**31, (2,)))
    folder = os.fspath(tmp_path / "dcp")
    results = run_on_ranks(_two_ranks, 2, seed, rng_seed, folder)
    _check_ddp(results)
    _check_fsdp([r["fsdp"] for r in results], seed, rng_seed)
    _check_checkpoint(results, seed, rng_seed, folder)
    for messages in (r["errors"] for r in results):
        assert messages[0] and messages[0].startswith("NotImplementedError") and "Shard(dim=1)" in messages[0]
        assert messages[1] and messages[1].startswith("TypeError") and "DTensor gradient" in messages[1]


def test_three_ranks_fsdp_uneven_shards():
    seed, rng_seed = (int(x) for x in torch.randint(0, 2**31, (2,)))
    _check_fsdp(run_on_ranks(_fsdp_runs, 3, seed, rng_seed), seed, rng_seed)


def test_shared_seed_without_a_group_is_the_global_draw():
    from fusedtrain.optim.distributed import shared_seed
    assert not dist.is_initialized()
    state = torch.get_rng_state()
    expected = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    torch.set_rng_state(state)
    assert shared_seed() == expected


def test_four_ranks_hsdp_replicate_by_shard_mesh():
    # HSDP: fully_shard over a 2 x 2 (replicate, shard) mesh, parameters placed (Replicate(), Shard(0)):
    # each replica steps its shards as one process steps the whole tensor.
    seed, rng_seed = (int(x) for x in torch.randint(0, 2**31, (2,)))
    configs = ("columns", "rows", "block", "svd")
    _check_fsdp(run_on_ranks(_fsdp_runs, 4, seed, rng_seed, (2, 2), configs), seed, rng_seed, configs)
