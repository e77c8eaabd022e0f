"""FRUGAL on torch.distributed (docs/distributed.md, "FRUGAL under DDP and FSDP2").

- `shared_seed`: the subspace seed when the user passes none. Under an initialised process group
  every rank must draw the same subspaces (DDP replicas drift apart otherwise, and the shards of one
  FSDP2 parameter must agree on its columns), so rank 0's draw is broadcast: a collective at
  construction, which every rank of the default group must therefore reach.
- `prepare_shard`: `FRUGALBase._prepare` for a DTensor parameter sharded on dim 0 (FSDP2's
  `fully_shard`; HSDP adds replicated mesh dimensions). The step runs on this rank's shard
  (`to_local()`); subspaces are drawn over the full matrix's indices, exactly as in one process, and
  mapped to the shard's rows, so columns / rows / block give the single-process trajectory. Moments
  are DTensors with the parameter's placements, except the rows projection's (below).
- `export_sharded_state`: the `state_dict()` form of the rows projection's moments.

The rows projection's moment slot j belongs to the selected row `indices[j]`: a shard owns the slots
of its selected rows, a contiguous range whose length varies with the draw, which a DTensor (whose
shards split a dimension evenly) cannot describe. In memory they are the plain tensor of those
slots; `state_dict()` gathers them into DTensors of the usual layout (a collective), and a loaded
DTensor or full tensor is sliced back at the next step.
"""
from __future__ import annotations

import math

import sys

import torch
import torch.distributed as dist

from .._core.dtypes import accumulate_dtype
from .subspace import (COLUMNS, DENSE, RESIDUAL, ROWS,
                       matrix_shape, random_basis, select_indices, subspace_size, svd_basis)


def _dt():
    """torch.distributed.tensor, imported on first use: only a DTensor parameter needs it (it is then
    loaded already), and importing it costs plain FRUGAL users over a second."""
    import torch.distributed.tensor as dt
    return dt

__all__ = ["shared_seed", "is_sharded", "prepare_shard", "export_sharded_state"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


def shared_seed() -> int:
    """A seed drawn from torch's global generator; under an initialised process group of more than one
    rank, rank 0's draw, broadcast over the default group (every rank draws, so each rank's global
    generator advances as it would in one process). A collective: every rank must call it."""
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)  # on the group's device: runs on NCCL and gloo alike
        seed = int(box[0])
    return seed


def is_sharded(p: torch.Tensor) -> bool:
    dt = sys.modules.get("torch.distributed.tensor")  # never loaded: p cannot be a DTensor
    return dt is not None and isinstance(p, dt.DTensor)


# ---------------------------------------------------------------------------------------------
# Where a rank's shard lies

def _shard_mesh_dim(p) -> int | None:
    """The mesh dimension that shards p on dim 0 (None: p is replicated). Anything else (another
    tensor dimension, several sharded mesh dimensions, as tensor parallelism makes) is refused."""
    placements = tuple(p.placements)
    sharded = [i for i, pl in enumerate(placements) if not isinstance(pl, _dt().Replicate)]
    Shard = _dt().Shard
    if len(sharded) > 1 or any(not (type(placements[i]) is Shard and placements[i].dim == 0) for i in sharded):
        raise NotImplementedError(
            f"FRUGAL steps DTensor parameters sharded on dim 0 over at most one mesh dimension (FSDP2's "
            f"fully_shard, HSDP); got placements {placements} for a param of shape {tuple(p.shape)}")
    return sharded[0] if sharded else None


def _chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of chunk `index` of `size` split as torch.chunk splits it (DTensor's Shard)."""
    step = -(-size // parts)
    start = min(index * step, size)
    return start, min(start + step, size)


def _local_range(p, size: int, mesh_dim=None, index=None) -> tuple[int, int]:
    """This rank's [start, stop) of a dim-0 extent `size` laid out with p's placements."""
    mesh_dim = _shard_mesh_dim(p) if mesh_dim is None else mesh_dim
    if mesh_dim is None:
        return 0, size
    mesh = p.device_mesh
    return _chunk(size, mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim) if index is None else index)


def _sharded(local: torch.Tensor, p, shape) -> torch.Tensor:  # a DTensor
    """A DTensor of global `shape` with p's placements, from this rank's (dim-0) piece."""
    shape = torch.Size(shape)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return _dt().DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def _sharded_zeros(p, local: torch.Tensor, shape) -> torch.Tensor:  # a DTensor
    start, stop = _local_range(p, shape[0])
    return _sharded(local.new_zeros((stop - start, *shape[1:])), p, shape)


def _as_shard(value, p):
    """A state tensor as a DTensor with p's placements: a full tensor (from a full state dict) is
    sliced on every rank without communication."""
    if isinstance(value, _dt().DTensor):
        if value.placements == p.placements:
            return value
        return value.redistribute(value.device_mesh, p.placements)
    return _dt().distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)


# ---------------------------------------------------------------------------------------------
# The rows projection: slots of the selected rows a shard owns

def _row_slots(opt, p, indices: torch.Tensor):
    """(first slot, end slot, local indices) of this rank's selected rows, computed once per draw."""
    cache = opt.__dict__.setdefault("_shard_row_slots", {})
    hit = cache.get(p)
    if hit is not None and hit[0] is indices:
        return hit[1:]
    start, stop = _local_range(p, p.shape[0])
    host = indices.detach().cpu().long()
    first, end = (int(torch.searchsorted(host, torch.tensor(x))) for x in (start, stop))
    local = (host[first:end] - start).to(device=indices.device, dtype=torch.int32)
    cache[p] = (indices, first, end, local)
    return first, end, local


def _gather_slots(p, local: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The full (k, cols) rows moment from every shard's slots: one all-gather (padded to the
    largest shard's slot count) over the sharding mesh dimension."""
    mesh_dim = _shard_mesh_dim(p)
    if mesh_dim is None:
        return local
    host = indices.detach().cpu().long()
    parts = p.device_mesh.size(mesh_dim)
    counts = []
    for i in range(parts):
        start, stop = _local_range(p, p.shape[0], mesh_dim, i)
        counts.append(int(torch.searchsorted(host, torch.tensor(stop)) - torch.searchsorted(host, torch.tensor(start))))
    width = max(counts)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[:local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(parts)]
    dist.all_gather(pieces, padded, group=p.device_mesh.get_group(mesh_dim))
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])


def _adopt_row_moments(opt, p, state) -> None:
    """Loaded rows moments (a DTensor of the state_dict layout, or full tensors) as this rank's slots."""
    if "exp_avg" not in state or "indices" not in state:
        return
    first, end, _ = _row_slots(opt, p, state["indices"])
    for key in _MOMENTS:
        value = state[key]
        if isinstance(value, _dt().DTensor):
            value = value.full_tensor()
        elif value.shape[0] != state["indices"].numel() or value.shape[0] == end - first:
            continue  # already this rank's slots
        state[key] = value[first:end].clone()


def export_sharded_state(opt, state_dict: dict) -> dict:
    """`state_dict()` with the rows moments of sharded params as DTensors of the parameter's
    placements over the full (k, cols) moment, as torch.distributed.checkpoint saves and reshards
    them. A collective (an all-gather per such tensor) when there are any."""
    for saved, group in zip(state_dict["param_groups"], opt.param_groups):
        if group["proj"] != "rows":
            continue
        for pid, p in zip(saved["params"], group["params"]):
            state = state_dict["state"].get(pid)
            if not is_sharded(p) or p.dim() < 2 or state is None or "exp_avg" not in state:
                continue
            state = dict(state)  # the packed state shares the live dicts
            for key in _MOMENTS:
                if not isinstance(state[key], _dt().DTensor):
                    full = _gather_slots(p, state[key], state["indices"])
                    state[key] = _dt().distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            state_dict["state"][pid] = state
    return state_dict


# ---------------------------------------------------------------------------------------------
# The step of a sharded parameter (mirrors FRUGALBase._prepare, which steps plain tensors)

def _zero_moments(state, p, local, shape, sharded=True) -> None:
    for key in _MOMENTS:
        state[key] = _sharded_zeros(p, local, shape) if sharded else local.new_zeros(shape)
    state["adam_step"] = 0


def prepare_shard(opt, p, group: dict) -> dict:
    """This step's work for a DTensor param p: the fused op's list entries for this rank's shard."""
    if not is_sharded(p.grad):
        raise TypeError(f"a DTensor param of shape {tuple(p.shape)} has a {type(p.grad).__name__} gradient; "
                        "FRUGAL steps a sharded param with a DTensor gradient of the same placements")
    state = opt.state[p]
    local = p.to_local()  # under no_grad: the shard itself, updated in place
    refresh, work = opt._begin_step(state, group, local, p.grad.to_local())
    grad, maximize = work["grads"], group.get("maximize", False)
    proj = group["proj"]
    rows, cols = matrix_shape(p)
    if proj is None or p.dim() < 2 or (proj == "block" and state.get("active", False)):
        for key in _MOMENTS:
            if key in state:
                state[key] = _as_shard(state[key], p)
        if "exp_avg" not in state:
            for key in _MOMENTS:
                state[key] = torch.zeros_like(p)  # a DTensor with p's placements
            state["adam_step"] = 0
        state["adam_step"] += 1
        work.update(kinds=DENSE, exp_avgs=state["exp_avg"].to_local(), exp_avg_sqs=state["exp_avg_sq"].to_local(),
                    steps=state["adam_step"])
    elif proj == "columns":
        k = subspace_size(group["density"], cols)
        if refresh:
            state["indices"] = select_indices(cols, k, opt._generator).to(local.device)
            if k > 0 and ((group["reset_state"] and k < cols) or "exp_avg" not in state):
                _zero_moments(state, p, local, (rows, k))
        if k > 0:
            for key in _MOMENTS:
                state[key] = _as_shard(state[key], p)
            state["adam_step"] += 1
            work.update(kinds=COLUMNS, exp_avgs=state["exp_avg"].to_local(),
                        exp_avg_sqs=state["exp_avg_sq"].to_local(), indices=state["indices"],
                        steps=state["adam_step"])
    elif proj == "rows":
        _prepare_rows(opt, p, local, state, group, refresh, work)
    elif proj in ("svd", "random"):
        _prepare_low_rank(opt, p, local, grad, state, group, refresh, work, maximize)
    return work


def _prepare_rows(opt, p, local, state, group, refresh, work) -> None:
    rows, cols = matrix_shape(p)
    k = subspace_size(group["density"], rows)
    _adopt_row_moments(opt, p, state)
    if refresh:
        old = state.get("indices")
        state["indices"] = select_indices(rows, k, opt._generator).to(local.device)
        first, end, _ = _row_slots(opt, p, state["indices"])
        if k > 0 and ((group["reset_state"] and k < rows) or "exp_avg" not in state):
            _zero_moments(state, p, local, (end - first, cols), sharded=False)
        elif k > 0 and k < rows:
            # Moments kept across a redraw (reset_state=False): slot j now serves another row, on
            # another shard maybe, so the slots are gathered and re-split (at refreshes only).
            for key in _MOMENTS:
                state[key] = _gather_slots(p, state[key], old)[first:end].clone()
    if k > 0:
        _, _, local_indices = _row_slots(opt, p, state["indices"])
        state["adam_step"] += 1
        work.update(kinds=ROWS, exp_avgs=state["exp_avg"], exp_avg_sqs=state["exp_avg_sq"],
                    indices=local_indices, steps=state["adam_step"])


def _prepare_low_rank(opt, p, local, grad, state, group, refresh, work, maximize) -> None:
    """svd/random on a shard. Right basis (rows >= cols, cols × r): replicated, the projection is
    local (rows are independent). Left basis (rows × r): sharded like p; Pᵀ·G sums over the shards
    (an all-reduce of r × cols) and the direction's shards are gathered (an all-gather)."""
    rows, cols = matrix_shape(p)
    right = rows >= cols
    r = subspace_size(group["density"], min(rows, cols))
    if r == 0:
        return
    start, stop = _local_range(p, rows)
    G = grad.reshape(stop - start, cols)
    if refresh:
        if group["proj"] == "svd":  # from the full gradient, as in one process: an all-gather
            full = p.grad.full_tensor().reshape(rows, cols)
            basis = svd_basis(-full if maximize else full, r, right)
        else:
            basis = random_basis(cols if right else rows, r, opt._generator, accumulate_dtype(p.dtype))
        basis = basis.to(device=local.device, dtype=p.dtype)
        state["projection"] = basis if right else _sharded(basis[start:stop].contiguous(), p, (rows, r))
        if group["reset_state"] or "exp_avg" not in state:
            _zero_moments(state, p, local, (rows, r) if right else (r, cols))
    for key in _MOMENTS:
        state[key] = _as_shard(state[key], p)
    basis = state["projection"]
    if right and is_sharded(basis):  # loaded as a DTensor: the right basis is replicated
        state["projection"] = basis = basis.full_tensor()
    elif not right:
        state["projection"] = basis = _as_shard(basis, p)
        basis = basis.to_local()
    if right:
        low = G @ basis
        part = low
    else:
        partial = [_dt().Partial() if i == _shard_mesh_dim(p) else pl for i, pl in enumerate(p.placements)]
        low = _dt().DTensor.from_local(basis.T @ G, p.device_mesh, partial, run_check=False).full_tensor()
        first, end = _local_range(p, r)
        part = low[first:end]
    beta1, beta2 = group["betas"]
    m, v = state["exp_avg"].to_local(), state["exp_avg_sq"].to_local()
    state["adam_step"] += 1
    t = state["adam_step"]
    m.lerp_(part, 1.0 - beta1)
    v.mul_(beta2).addcmul_(part, part, value=1.0 - beta2)
    direction = (m / (1.0 - beta1 ** t)) / (v.sqrt() / math.sqrt(1.0 - beta2 ** t) + group["eps"])
    if right:
        back = lambda x: x @ basis.T  # noqa: E731
    else:
        direction = _sharded(direction, p, (r, cols)).full_tensor()
        back = lambda x: basis @ x  # noqa: E731
    base = G if r == min(rows, cols) else back(low)  # full rank: a zero residual, as in one process
    work.update(kinds=RESIDUAL, residual_bases=base.reshape(local.shape).contiguous(),
                dense_updates=back(direction).reshape(local.shape).contiguous())
