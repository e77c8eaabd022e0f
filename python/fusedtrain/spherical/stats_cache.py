"""The cache of a classifier weight's statistics (`linear_spherical_stats`: Gram matrix and column
sums), shared by `SphericalHead` and the Hugging Face patch: computing them reads the whole D x d
weight (2·D·d² flops, more than the loss of a micro-batch of N < D tokens costs), so gradient
accumulation micro-batches and evaluation batches reuse them until the weight changes.

"Unchanged" is decided per call from the tensors' storage (held weakly), layout and version counter
(an optimizer's in-place step, `load_state_dict`, in-place ops under `no_grad` bump it; `.data = ...`
changes the storage) and, with `detect_data_writes`, a fingerprint of the values (float64 sum and
norm of 4096 evenly spaced entries), which catches writes through `.data`, which move no version
counter. Inside autocast the loss reads the weight cast to the autocast dtype: its statistics are
those of the cast weight, kept apart from the full-precision ones. Under FSDP2 the key is that of
FSDP's sharded parameters (sharded_head.py).
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .._core import autocast
from . import sharded_head
from .linear import LinearStats, linear_spherical_stats

__all__ = ["StatsCache", "tensor_key", "same_key"]

# Entries of a weight read for its fingerprint: evenly spaced over the whole tensor.
_FINGERPRINT_SAMPLES = 4096


def tensor_key(t: torch.Tensor | None, fingerprint: bool, *, version: int | None = None,
               values: torch.Tensor | None = None):
    """What identifies a tensor's values for the cache: storage (held weakly, so a freed storage's
    address cannot be mistaken for it), layout, version and, when asked, a fingerprint of the values
    (writes through `.data` move no version counter): the float64 sum and norm of evenly spaced
    entries, a read of a few thousand values whatever the weight's size. `version` / `values`: a
    sharded weight's (sharded_head.py) version counter and the tensor to fingerprint, when they
    are not `t`'s own."""
    if t is None:
        return None
    values_of = t if values is None else values
    values = None
    if fingerprint:
        with torch.no_grad():
            flat = values_of.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // _FINGERPRINT_SAMPLES)]
            values = torch.stack([sample.sum(dtype=torch.float64),
                                  torch.linalg.vector_norm(sample, dtype=torch.float64)]).tolist()
    return (StorageWeakRef(t.untyped_storage()), t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device,
            t._version if version is None else version, values)


def same_key(a: tuple, b: tuple | None) -> bool:
    if b is None:
        return False
    for x, y in zip(a, b):
        if (x is None) != (y is None):
            return False
        if x is not None and (y[0].expired() or x[0].cdata != y[0].cdata or x[1:] != y[1:]):
            return False
    return True


class StatsCache:
    """`linear_spherical_stats(weight, bias)`, recomputed only when `weight` or `bias` changed (module
    docstring) or the autocast dtype they are read in did."""

    def __init__(self, detect_data_writes: bool = True) -> None:
        self.detect_data_writes = detect_data_writes
        self.clear()

    # Copies and pickles (copy.deepcopy of a model, torch.save) start empty: the key holds weak
    # references to this process's storages, which mean nothing elsewhere.
    def __getstate__(self) -> dict:
        return {"detect_data_writes": self.detect_data_writes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def clear(self) -> None:
        self._stats: LinearStats | None = None
        self._key = self._dtype = None

    def get(self, weight: torch.Tensor, bias: torch.Tensor | None, module=None) -> LinearStats:
        """`module`: the layer that owns `weight` and `bias`; under FSDP2 the weight its forward sees is
        gathered into a storage FSDP reuses without moving its version, so the key is that of FSDP's
        sharded parameters (`sharded_head.fsdp_key`), and without them the statistics are computed
        at every call."""
        if module is not None and sharded_head.is_fsdp(module):
            key = sharded_head.fsdp_key(module, tensor_key, self.detect_data_writes)
            if key is None:
                self.clear()
                return linear_spherical_stats(weight, bias)
        else:
            key = tuple(tensor_key(t, self.detect_data_writes) for t in (weight, bias))
        dtype = autocast.policy_dtype(autocast.LOWER, weight.device)
        if self._stats is None or dtype != self._dtype or not same_key(key, self._key):
            self._stats = linear_spherical_stats(weight, bias)
            self._key, self._dtype = key, dtype
        return self._stats
