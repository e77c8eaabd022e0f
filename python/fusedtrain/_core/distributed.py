"""Collectives shared by the families' distributed paths, built on torch.distributed.

Every helper also works without an initialised process group (one process: rank 0 of 1), so a
family has one code path. Only equal-size tensor collectives are used (rows are padded where ranks
hold different numbers): NCCL and gloo both implement those, while gloo refuses uneven `all_gather`
lists. The autograd functions follow the tensor-parallel pattern:

* `all_gather_rows`: forward concatenates every rank's rows in rank order; backward sums the
  gradient of the whole concatenation over the ranks and returns this rank's rows (a reduce-scatter).
* `sum_partials`: forward sums each rank's partial result (all-reduce); backward is the identity,
  because the consumer of the sum runs replicated on every rank and hands each the same gradient.
* `share_input`: forward is the identity on a replicated input; backward sums the gradient over the
  ranks, because each rank's computation used the input for its own part (its slice of the latents).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def group_rank(group=None) -> int:
    """This process's rank in `group` (0 without a process group)."""
    return dist.get_rank(group) if is_distributed() else 0


def group_size(group=None) -> int:
    """The number of ranks in `group` (1 without a process group)."""
    return dist.get_world_size(group) if is_distributed() else 1


def _all_gather_equal(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # torch >= 2.10 renamed all_gather_into_tensor to all_gather_single (the old name warns).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp.contiguous(), group=group)


def _reduce_scatter_equal(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """out = this rank's chunk of the sum over ranks of `inp` (P equal chunks along dim 0)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        scatter(out, inp.contiguous(), group=group)
    except (RuntimeError, NotImplementedError):
        # Some gloo builds lack reduce-scatter on CPU. The refusal comes before any data moves and
        # is the same on every rank, so all of them take this all-reduce (twice the traffic) instead.
        total = inp.contiguous().clone()
        dist.all_reduce(total, group=group)
        out.copy_(total.chunk(group_size(group))[group_rank(group)])


def all_gather_sizes(n: int, group=None, device=None) -> list[int]:
    """[n of rank 0, n of rank 1, ...]: each rank's count, in rank order (one small all-gather)."""
    P = group_size(group)
    if P == 1:
        return [int(n)]
    mine = torch.tensor([int(n)], dtype=torch.int64, device=device)
    out = torch.empty(P, dtype=torch.int64, device=device)
    _all_gather_equal(out, mine, group)
    return [int(v) for v in out.tolist()]


def _gather_padded(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    P, width = len(sizes), max(sizes)
    padded = x.new_zeros((width,) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    out = x.new_empty((P * width,) + tuple(x.shape[1:]))
    _all_gather_equal(out, padded, group)
    return torch.cat([chunk[:n] for chunk, n in zip(out.chunk(P), sizes)])


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, group = ctx.sizes, ctx.group
        P, width, rank = len(sizes), max(sizes), group_rank(group)
        padded = grad.new_zeros((P * width,) + tuple(grad.shape[1:]))
        for r, (start, n) in enumerate(zip(_offsets(sizes), sizes)):
            padded[r * width:r * width + n] = grad[start:start + n]
        out = grad.new_empty((width,) + tuple(grad.shape[1:]))
        _reduce_scatter_equal(out, padded, group)
        return out[:sizes[rank]], None, None


def _offsets(sizes: list[int]) -> list[int]:
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += n
    return starts


def row_offset(sizes: list[int], rank: int) -> int:
    """The first global row of `rank` when rows are concatenated in rank order."""
    return sum(sizes[:rank])


def all_gather_rows(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Every rank's `x` (rows may differ per rank; trailing dims must agree) concatenated in rank order.

    Differentiable: backward sums the gradient of the concatenation over the ranks and returns this
    rank's rows, so a loss computed from the gathered rows on every rank gives each rank the gradient
    of the sum of those losses with respect to its own rows. `sizes` (each rank's row count, from
    `all_gather_sizes`) saves one small collective when the caller already has it.
    """
    if group_size(group) == 1:
        return x
    if sizes is None:
        sizes = all_gather_sizes(x.shape[0], group, x.device)
    if sizes[group_rank(group)] != x.shape[0]:
        raise ValueError(f"sizes[{group_rank(group)}] = {sizes[group_rank(group)]} but this rank has "
                         f"{x.shape[0]} rows")
    return _AllGatherRows.apply(x, group, list(sizes))


class _SumPartials(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        total = x.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_partials(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum over ranks of each rank's partial `x` (all-reduce). Backward is the identity: use it
    when everything computed from the sum is replicated on every rank (row-parallel layers)."""
    return x if group_size(group) == 1 else _SumPartials.apply(x, group)


class _ShareInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def share_input(x: torch.Tensor, group=None) -> torch.Tensor:
    """`x` unchanged; backward sums its gradient over the ranks. Use it on an input replicated
    across ranks that each use it for their own part (column-parallel layers)."""
    return x if group_size(group) == 1 else _ShareInput.apply(x, group)
