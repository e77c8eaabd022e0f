"""`torch.nn` modules of the spherical family: `SphericalLoss` (over logits), `LinearSphericalLoss`
(the fused linear op) and `SphericalHead` (a classifier head that caches its weight's statistics)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import sharded_head
from .checks import DEFAULT_A, DEFAULT_B, DEFAULT_EPS, DEFAULT_VAR_EPS, check_hyperparameters
from .linear import LinearStats, TopK, linear_spherical_loss, linear_topk
from .ops import spherical_loss
from .stats_cache import StatsCache, same_key, tensor_key

__all__ = ["SphericalLoss", "LinearSphericalLoss", "SphericalHead"]


class _SphericalLossModule(torch.nn.Module):
    """The hyperparameters of a spherical loss module, checked once at construction."""

    def __init__(self, kind: str = "z", *, a: float = DEFAULT_A, b: float = DEFAULT_B,
                 eps: float = DEFAULT_EPS, var_eps: float = DEFAULT_VAR_EPS,
                 ignore_index: int = -100, reduction: str = "mean", check_target: bool = True) -> None:
        super().__init__()
        check_hyperparameters(kind, a, b, eps, var_eps, ignore_index, reduction)
        self.kind, self.a, self.b, self.eps, self.var_eps = kind, a, b, eps, var_eps
        self.ignore_index, self.reduction, self.check_target = ignore_index, reduction, check_target

    def _loss_kwargs(self) -> dict:
        return dict(kind=self.kind, a=self.a, b=self.b, eps=self.eps, var_eps=self.var_eps,
                    ignore_index=self.ignore_index, reduction=self.reduction, check_target=self.check_target)

    def extra_repr(self) -> str:
        hyper = f"a={self.a}, b={self.b}, var_eps={self.var_eps}" if self.kind == "z" else f"eps={self.eps}"
        return f"kind={self.kind!r}, {hyper}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class SphericalLoss(_SphericalLossModule):
    """Module form of :func:`fusedtrain.spherical_loss`, a drop-in for `nn.CrossEntropyLoss`.

    >>> criterion = fusedtrain.nn.SphericalLoss("z", a=0.05, b=20.0)
    >>> loss = criterion(logits, target)
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return spherical_loss(logits, target, **self._loss_kwargs())


class LinearSphericalLoss(_SphericalLossModule):
    """Module form of :func:`linear_spherical_loss`:
    `criterion(input, linear_weight, target, linear_bias=None)`."""

    def forward(self, input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                linear_bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_spherical_loss(input, linear_weight, target, linear_bias=linear_bias,
                                     **self._loss_kwargs())


class SphericalHead(LinearSphericalLoss):
    """A classifier head `o = W·h + bias` trained with a spherical loss through the fused op.

    `head(h, target)` returns the loss (float32 under torch.autocast); `head(h)` without a target
    returns the logits `F.linear(h, weight, bias)`, as the `nn.Linear` it replaces would (the same
    as `head.logits(h)`); `head.topk(h, k)` gives the k best classes without forming the logits.
    The weight's Gram matrix and column sums are cached and reused while `weight` and `bias` are
    unchanged, so gradient-accumulation micro-batches and evaluation compute them once per
    optimizer step (under autocast: those of the weight cast to the autocast dtype, cached apart).

    "Unchanged" is decided per call from the tensors' storage, layout and version (an optimizer's
    in-place step, `load_state_dict` and in-place ops under `no_grad` bump the version; `.data = ...`
    changes the storage) and, with `detect_data_writes=True` (the default), from a fingerprint of
    their values (float64 sum and norm of 4096 evenly spaced entries), which catches writes through
    `.data` (`head.weight.data.mul_(3)`, EMA or clamping loops), which move no version counter. A
    `.data` write that changes none of the sampled entries (one row, say) is not seen: call
    `invalidate_stats()` after it. The fingerprint reads a few thousand values per call and, on CUDA,
    costs one host sync; `detect_data_writes=False` drops it (no sync) for code that never writes
    through `.data`.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, kind: str = "z", *,
                 device=None, dtype=None, detect_data_writes: bool = True, **loss_kwargs) -> None:
        super().__init__(kind, **loss_kwargs)
        self.detect_data_writes = bool(detect_data_writes)
        layer = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.weight = layer.weight  # nn.Linear's initialization
        self.bias = layer.bias
        self.in_features, self.num_classes = in_features, num_classes
        # The whole weight's statistics (also under FSDP2, keyed on its sharded parameters); a
        # vocab-parallel DTensor weight keeps its own in `_stats` (sharded_head.py).
        self._cache = StatsCache()
        self._stats: LinearStats | None = None
        self._stats_key = None

    def stats(self) -> LinearStats:
        """The cached (gram, colsum), recomputed when the weight or bias changed."""
        if sharded_head.is_vocab_sharded(self):
            return sharded_head.cached_stats(self, tensor_key, same_key)
        self._cache.detect_data_writes = self.detect_data_writes
        return self._cache.get(self.weight, self.bias, module=self)

    def invalidate_stats(self) -> None:
        """Drop the cached statistics: the next call recomputes them."""
        self._cache.clear()
        self._stats = self._stats_key = None

    def forward(self, input: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The loss against `target`; without a target, the logits (as `self.logits(input)`)."""
        if target is None:
            return self.logits(input)
        if sharded_head.is_vocab_sharded(self):  # a DTensor weight placed Shard(0): vocab parallel
            return sharded_head.vocab_parallel_forward(self, input, target)
        # (Under autocast the cache holds the statistics of the cast weight, FSDP2's gathered one included.)
        stats = None if torch.compiler.is_compiling() else self.stats()
        return linear_spherical_loss(input, self.weight, target, linear_bias=self.bias, stats=stats,
                                     **self._loss_kwargs())

    def logits(self, input: torch.Tensor) -> torch.Tensor:
        """`F.linear(input, weight, bias)`: the N x D logits (evaluation, export, a softmax). With a
        Shard(0) DTensor weight: a DTensor placed Shard(-1) (`.full_tensor()` gathers it)."""
        if sharded_head.is_vocab_sharded(self):
            return sharded_head.vocab_parallel_logits(self, input)
        return F.linear(input, self.weight, self.bias)

    def topk(self, input: torch.Tensor, k: int, *, chunk: int = 8192) -> TopK:
        """The k largest logits per row and their classes, without forming the logits (`linear_topk`);
        with a Shard(0) DTensor weight, over the whole vocabulary, the same on every rank."""
        if sharded_head.is_vocab_sharded(self):
            return sharded_head.vocab_parallel_topk(self, input, k, chunk)
        return linear_topk(input, self.weight, k, linear_bias=self.bias, chunk=chunk)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"bias={self.bias is not None}, {super().extra_repr()}")
