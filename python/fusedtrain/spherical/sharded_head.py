"""`SphericalHead` on a sharded weight: a DTensor weight placed `Shard(0)` on a 1-D device mesh (the
vocab-parallel loss, vocab_parallel.py) and FSDP2's `fully_shard(head)` (data parallel: the head's
forward sees the re-gathered whole weight). docs/distributed.md, "SphericalHead under FSDP2".

Both need the statistics cache keyed on what really identifies the weight's values:

- DTensor: an optimizer's in-place step moves the DTensor's version counter, not its local tensor's
  (DTensor ops run below autograd's version bump), so the key takes the DTensor's version with the
  local tensor's storage. The statistics are a collective (the column sums are all-reduced), so the
  decision to recompute must be the same on every rank: with `detect_data_writes` the fingerprints
  (which a `.data` write may change on one rank only) are agreed by one 1-element all-reduce.
- FSDP2: the weight seen in forward is gathered into a storage that FSDP reallocates at will and
  whose version it never moves (a stale key could match after an optimizer step). The key takes the
  storage and version of FSDP's sharded parameter (which the optimizer updates) and the fingerprint
  of the gathered values (`fsdp_key`, which stats_cache.StatsCache uses for any FSDP2-managed layer).
  A head managed by an enclosing `fully_shard` (not itself wrapped) has no sharded parameter of its
  own to read: its statistics are recomputed at every call.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .._core.distributed import all_gather_sizes, row_offset
from .linear import TopK, linear_topk
from .vocab_parallel import vocab_parallel_linear_spherical_loss, vocab_parallel_linear_spherical_stats

__all__ = ["is_vocab_sharded", "is_fsdp", "fsdp_key", "cached_stats", "vocab_parallel_forward",
           "vocab_parallel_logits", "vocab_parallel_topk"]


def _loaded_class(module: str, name: str):
    """A class of DTensor or FSDP2 when the user's program imported its module, else None: no object of
    it can exist then, and importing them here would add seconds to `import fusedtrain`."""
    return getattr(sys.modules.get(module), name, None)


def is_fsdp(head) -> bool:
    """Whether `head` is wrapped by FSDP2's fully_shard or managed by an enclosing one."""
    fsdp_module = _loaded_class("torch.distributed.fsdp", "FSDPModule")
    return fsdp_module is not None and (isinstance(head, fsdp_module) or getattr(head, "_is_fsdp_managed_module", False))


def is_vocab_sharded(head) -> bool:
    """Whether the head's weight is a DTensor to run vocab parallel (not FSDP's own sharded
    parameter, which its forward replaces by the gathered weight)."""
    dtensor = _loaded_class("torch.distributed.tensor", "DTensor")
    if dtensor is None or not isinstance(head.weight, dtensor) or is_fsdp(head):
        return False
    from torch.distributed.tensor import DTensor, Shard  # loaded: the weight is one
    weight, bias = head.weight, head.bias
    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"SphericalHead runs a DTensor weight placed (Shard(0),) on a 1-D mesh (vocab parallel), "
                         f"got placements {tuple(weight.placements)} on a {weight.device_mesh.ndim}-D mesh")
    if bias is not None and not (isinstance(bias, DTensor) and bias.device_mesh == weight.device_mesh
                                 and tuple(bias.placements) == (Shard(0),)):
        raise ValueError("SphericalHead's bias must be a DTensor placed (Shard(0),) on the weight's mesh, like "
                         "the weight")
    group = weight.device_mesh.get_group()
    if weight.device_mesh.get_local_rank() != dist.get_rank(group):
        # Shard(0) hands out shards by mesh coordinate; the loss reads offsets by group rank.
        raise NotImplementedError("SphericalHead needs a mesh whose coordinates follow its process group's ranks")
    return True


def _fsdp_sharded_params(head) -> dict | None:
    """FSDP2's sharded parameters of this head by name, or None when they cannot be found (a head
    managed by an enclosing fully_shard, or FSDP internals of another torch version)."""
    try:
        params = head._get_fsdp_state()._fsdp_param_group.fsdp_params
        return {p._module_info.param_name: p.sharded_param for p in params if p._module_info.module is head}
    except AttributeError:
        return None


def fsdp_key(module, tensor_key, fingerprint: bool) -> tuple | None:
    """The statistics cache key of an FSDP-managed module's `weight` and `bias` (module docstring):
    the storage and version of FSDP's sharded parameters (which the optimizer updates), the
    fingerprint of the gathered values. None when FSDP's sharded parameters cannot be read (a module
    managed by an enclosing fully_shard): then nothing identifies the values, recompute every call."""
    sharded = _fsdp_sharded_params(module)
    names = [n for n in ("weight", "bias") if getattr(module, n, None) is not None]
    if sharded is None or not all(n in sharded for n in names):
        return None
    return tuple(None if getattr(module, n, None) is None else
                 tensor_key(_local(sharded[n]), fingerprint, version=sharded[n]._version, values=getattr(module, n))
                 for n in ("weight", "bias"))


def _local(t):
    with torch.no_grad():
        return t.to_local()


def cached_stats(head, tensor_key, same_key):
    """The statistics (VocabParallelStats) of a head whose weight is a Shard(0) DTensor, recomputed
    when its weight or bias changed. `tensor_key` / `same_key`: the cache key of one tensor and their
    comparison (stats_cache.py, which keys an FSDP2 head itself, with `fsdp_key`)."""
    fingerprint = head.detect_data_writes
    tensors = (head.weight, head.bias)
    key = tuple(None if t is None else tensor_key(_local(t), fingerprint, version=t._version) for t in tensors)
    stale = head._stats is None or not same_key(key, head._stats_key)
    group = head.weight.device_mesh.get_group()
    if fingerprint:  # a .data write may change the sampled values on some ranks only: agree
        flag = torch.tensor([float(stale)], device=_local(head.weight).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        stale = bool(flag.item())
    if stale:
        bias = None if head.bias is None else _local(head.bias)
        head._stats = vocab_parallel_linear_spherical_stats(_local(head.weight), bias, group=group)
        head._stats_key = key
    return head._stats


def _replicated_local(t, name: str):
    dtensor = _loaded_class("torch.distributed.tensor", "DTensor")
    if dtensor is None or not isinstance(t, dtensor):
        return t
    if not all(p.is_replicate() for p in t.placements):
        raise ValueError(f"{name} must be replicated over the weight's mesh (the same on every rank), got "
                         f"placements {tuple(t.placements)}")
    return t.to_local()


def vocab_parallel_forward(head, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss of a head whose weight (and bias) are DTensors placed Shard(0): the vocab-parallel
    fused loss on the local shards, with `input` and `target` replicated. Gradients reach the
    DTensor parameters as Shard(0) DTensors."""
    stats = None if torch.compiler.is_compiling() else head.stats()
    bias = None if head.bias is None else head.bias.to_local()
    return vocab_parallel_linear_spherical_loss(
        _replicated_local(input, "input"), head.weight.to_local(), _replicated_local(target, "target"),
        linear_bias=bias, group=head.weight.device_mesh.get_group(), stats=stats, **head._loss_kwargs())


def vocab_parallel_logits(head, input: torch.Tensor):
    """`F.linear(input, weight, bias)` of a head whose weight is a Shard(0) DTensor: a DTensor of
    logits placed Shard(-1) (each rank its own classes), what torch's ColwiseParallel layers return;
    `.full_tensor()` gathers the N x D matrix. A plain `input` is read as replicated (the same on
    every rank), so its gradient is summed over the ranks in backward."""
    from torch.distributed.tensor import DTensor, Replicate  # loaded: the weight is one
    if not isinstance(input, DTensor):
        input = DTensor.from_local(input, head.weight.device_mesh, [Replicate()], run_check=False)
    return F.linear(input, head.weight, head.bias)


def vocab_parallel_topk(head, input: torch.Tensor, k: int, chunk: int) -> TopK:
    """The k best classes of the whole vocabulary per row, on every rank (replicated `input`), from a
    Shard(0) weight without forming any rank's N x D/P logits: each rank's `linear_topk` over its
    shard, its best `min(k, D_r)` gathered (all-gather of N x k values and indices) and merged.
    Ties between equal logits resolve to the smaller class index (ranks hold increasing classes)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    weight, group = head.weight.to_local(), head.weight.device_mesh.get_group()
    bias = None if head.bias is None else head.bias.to_local()
    x = _replicated_local(input, "input")
    sizes = all_gather_sizes(weight.shape[0], group, weight.device)
    if k > sum(sizes):
        raise ValueError(f"k must be <= the number of classes {sum(sizes)}, got {k}")
    mine = min(k, weight.shape[0])
    n = x.shape[:-1]
    values = torch.full((*n, k), float("-inf"), dtype=x.dtype, device=x.device)
    indices = torch.full((*n, k), -1, dtype=torch.int64, device=x.device)
    if mine:
        local = linear_topk(x, weight, mine, linear_bias=bias, chunk=chunk)
        values[..., :mine] = local.values
        indices[..., :mine] = local.indices + row_offset(sizes, dist.get_rank(group))
    world = len(sizes)
    gathered_values = [torch.empty_like(values) for _ in range(world)]
    gathered_indices = [torch.empty_like(indices) for _ in range(world)]
    dist.all_gather(gathered_values, values.contiguous(), group=group)
    dist.all_gather(gathered_indices, indices.contiguous(), group=group)
    # Every rank's real candidates first, in rank (= class) order, the padding last: a stable sort by
    # value then never prefers a pad or a larger class index at a tie.
    real = [min(k, size) for size in sizes]
    ordered_values = torch.cat([v[..., :r] for v, r in zip(gathered_values, real)], dim=-1)
    ordered_indices = torch.cat([i[..., :r] for i, r in zip(gathered_indices, real)], dim=-1)
    best_values, order = torch.sort(ordered_values, dim=-1, descending=True, stable=True)
    return TopK(best_values[..., :k], ordered_indices.gather(-1, order[..., :k]))
