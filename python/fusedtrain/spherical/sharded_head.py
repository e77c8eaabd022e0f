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
  of the gathered values. A head managed by an enclosing `fully_shard` (not itself wrapped) has no
  sharded parameter of its own to read: its statistics are recomputed at every call.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from .linear import linear_spherical_stats
from .vocab_parallel import vocab_parallel_linear_spherical_loss, vocab_parallel_linear_spherical_stats

__all__ = ["is_sharded", "is_vocab_sharded", "cached_stats", "vocab_parallel_forward"]


def _loaded_class(module: str, name: str):
    """A class of DTensor or FSDP2 when the user's program imported its module, else None: no object of
    it can exist then, and importing them here would add seconds to `import fusedtrain`."""
    return getattr(sys.modules.get(module), name, None)


def _is_fsdp(head) -> bool:
    fsdp_module = _loaded_class("torch.distributed.fsdp", "FSDPModule")
    return fsdp_module is not None and (isinstance(head, fsdp_module) or getattr(head, "_is_fsdp_managed_module", False))


def is_vocab_sharded(head) -> bool:
    """Whether the head's weight is a DTensor to run vocab parallel (not FSDP's own sharded
    parameter, which its forward replaces by the gathered weight)."""
    dtensor = _loaded_class("torch.distributed.tensor", "DTensor")
    if dtensor is None or not isinstance(head.weight, dtensor) or _is_fsdp(head):
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


def is_sharded(head) -> bool:
    """Whether the head's statistics are cached here (FSDP2 or a vocab-parallel DTensor weight)."""
    return _is_fsdp(head) or is_vocab_sharded(head)


def _fsdp_sharded_params(head) -> dict | None:
    """FSDP2's sharded parameters of this head by name, or None when they cannot be found (a head
    managed by an enclosing fully_shard, or FSDP internals of another torch version)."""
    try:
        params = head._get_fsdp_state()._fsdp_param_group.fsdp_params
        return {p._module_info.param_name: p.sharded_param for p in params if p._module_info.module is head}
    except AttributeError:
        return None


def _local(t):
    with torch.no_grad():
        return t.to_local()


def cached_stats(head, tensor_key, same_key):
    """The head's statistics (LinearStats under FSDP2, VocabParallelStats for a DTensor weight),
    recomputed when its weight or bias changed. `tensor_key` / `same_key`: SphericalHead's cache key
    of one tensor and their comparison (modules.py)."""
    fingerprint = head.detect_data_writes
    if not is_vocab_sharded(head):  # FSDP2: the weight in forward is the gathered one
        sharded = _fsdp_sharded_params(head)
        key = None
        if sharded is not None and all(n in sharded for n, t in (("weight", head.weight), ("bias", head.bias))
                                       if t is not None):
            key = tuple(None if getattr(head, n) is None else
                        tensor_key(_local(sharded[n]), fingerprint, version=sharded[n]._version, values=getattr(head, n))
                        for n in ("weight", "bias"))
        if key is None or head._stats is None or not same_key(key, head._stats_key):
            head._stats, head._stats_key = linear_spherical_stats(head.weight, head.bias), key
        return head._stats
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
