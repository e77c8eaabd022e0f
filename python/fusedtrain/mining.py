"""Pairwise similarity mining without the B×M matrix (spec/mining.md): functional ops, autograd and
fake kernels. The PML-compatible classes (`MultiSimilarityMiner`, `MultiSimilarityLoss`,
`BatchHardMiner`, `PairMarginMiner`, `ThresholdConsistentMarginLoss`, `CrossBatchMemory`) are
re-exported here from `fusedtrain._mining_classes`.

Every op normalizes the rows (F.normalize) and walks the batch in row chunks: one at::mm gives a tile
of S = Ê·R̂ᵀ (bounded rows × all M reference columns) that a C++/CUDA kernel reduces per row
(thresholds, log-sum-exps, counts). When a gradient will be wanted, the Multi-Similarity forward
turns each tile into dL/dS right after its rows' statistics and multiplies it into the gradients
(backward only scales them); otherwise, and for TCM, backward recomputes the tiles. Extra memory: the
normalized copies, one tile (8 MiB of fp32 on CPU, 16 MiB on CUDA), the gradients, O(B) statistics.

Reference set: `ref_emb=None` (or `ref_emb is embeddings`) means the batch itself, self pairs
excluded. bfloat16/float16 inputs are computed in float32 (S included) and the loss returned in the
input dtype; float32 and float64 are computed in their own precision, as PML does.
"""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

from . import _backend
from .reference import mining as _reference

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_STATS = 6  # per-row statistics saved by the forward ops (csrc/mining/mining_math.h)


def _check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_labels(name: str, labels, n: int, n_name: str, device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match {n_name}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but embeddings is on {device}")
    return labels.long()


def _check_embeddings(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")


def _operands(embeddings, labels, ref_emb, ref_labels):
    """Checked (embeddings, labels, ref_emb, ref_labels); the reference is None for the batch itself."""
    _check_embeddings("embeddings", embeddings)
    labels = _check_labels("labels", labels, embeddings.shape[0], "embeddings", embeddings.device)
    if ref_emb is embeddings:  # PML's rule: the same object is the batch itself (self pairs excluded)
        if ref_labels is not None:
            _check_labels("ref_labels", ref_labels, embeddings.shape[0], "ref_emb", embeddings.device)
        return embeddings, labels, None, None
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels was given without ref_emb")
        return embeddings, labels, None, None
    _check_embeddings("ref_emb", ref_emb)
    if ref_labels is None:
        raise ValueError("ref_emb needs ref_labels (the labels of the reference embeddings)")
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(f"ref_emb must have {embeddings.shape[1]} columns like embeddings, "
                         f"got shape {tuple(ref_emb.shape)}")
    if ref_emb.dtype != embeddings.dtype:
        raise TypeError(f"ref_emb must have the dtype of embeddings ({embeddings.dtype}), got {ref_emb.dtype}")
    if ref_emb.device != embeddings.device:
        raise ValueError(f"ref_emb is on {ref_emb.device} but embeddings is on {embeddings.device}")
    ref_labels = _check_labels("ref_labels", ref_labels, ref_emb.shape[0], "ref_emb", embeddings.device)
    return embeddings, labels, ref_emb, ref_labels


def _ms_hyper(alpha, beta, base, epsilon):
    alpha, beta = _check_finite("alpha", alpha), _check_finite("beta", beta)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return alpha, beta, _check_finite("base", base), _check_finite("epsilon", epsilon)


def multi_similarity_loss(embeddings: torch.Tensor, labels: torch.Tensor, ref_emb: torch.Tensor | None = None,
                          ref_labels: torch.Tensor | None = None, *, alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5, epsilon: float = 0.1, mine: bool = True,
                          self_index: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-Similarity loss over Multi-Similarity-mined pairs, fused, never holding B×M.

    Equals PML's `MultiSimilarityLoss(alpha, beta, base)(emb, labels,
    MultiSimilarityMiner(epsilon)(emb, labels, ref_emb, ref_labels), ref_emb, ref_labels)` (without
    PML's "0 when every index list has at most one pair" quirk, which the PML-compatible class keeps).
    mine=False: all pairs (PML's loss without a miner). Gradients flow to `embeddings` and, when it
    requires grad, to `ref_emb`. self_index (B,) int64: each anchor's own column in `ref_emb`
    (cross-batch memory); it counts for the mining thresholds but is dropped from the positives.
    """
    embeddings, labels, ref_emb, ref_labels = _operands(embeddings, labels, ref_emb, ref_labels)
    alpha, beta, base, epsilon = _ms_hyper(alpha, beta, base, epsilon)
    if self_index is not None:
        if ref_emb is None:
            raise ValueError("self_index needs ref_emb (it names each anchor's column in ref_emb)")
        self_index = _check_labels("self_index", self_index, embeddings.shape[0], "embeddings",
                                   embeddings.device)
    if not _backend.use_kernel("multi_similarity_loss", embeddings.device):
        return _reference.multi_similarity_loss(embeddings, labels, ref_emb, ref_labels, alpha=alpha,
                                                beta=beta, base=base, epsilon=epsilon, mine=bool(mine),
                                                self_index=self_index)
    loss, _, _, _ = torch.ops.fusedtrain.multi_similarity_loss(embeddings, labels, ref_emb, ref_labels, self_index,
                                                               alpha, beta, base, epsilon, bool(mine),
                                                               *_grad_flags(embeddings, ref_emb))
    return loss


def _grad_flags(embeddings, ref_emb) -> tuple[bool, bool]:
    """(compute_grad, ref_grad): when a gradient will be wanted, the forward computes it from its own
    tiles of S (backward then only scales it), saving the recomputation of S."""
    ref_grad = torch.is_grad_enabled() and ref_emb is not None and ref_emb.requires_grad
    return (torch.is_grad_enabled() and embeddings.requires_grad) or ref_grad, ref_grad


def multi_similarity_loss_with_stats(embeddings, labels, ref_emb=None, ref_labels=None, **kw):
    """(loss, row_stats) of the compiled op; row_stats (B, 6) holds per anchor the thresholds, the two
    log(1 + Σ exp) and the numbers of mined positives and negatives. Needs the compiled kernels."""
    embeddings, labels, ref_emb, ref_labels = _operands(embeddings, labels, ref_emb, ref_labels)
    alpha, beta, base, epsilon = _ms_hyper(kw.get("alpha", 2.0), kw.get("beta", 50.0), kw.get("base", 0.5),
                                           kw.get("epsilon", 0.1))
    loss, stats, _, _ = torch.ops.fusedtrain.multi_similarity_loss(
        embeddings, labels, ref_emb, ref_labels, kw.get("self_index"), alpha, beta, base, epsilon,
        bool(kw.get("mine", True)), *_grad_flags(embeddings, ref_emb))
    return loss, stats


def _mine(rule: str, embeddings, labels, ref_emb, ref_labels, epsilon=0.1, pos_margin=0.2, neg_margin=0.8):
    embeddings, labels, ref_emb, ref_labels = _operands(embeddings, labels, ref_emb, ref_labels)
    epsilon = _check_finite("epsilon", epsilon)
    pos_margin, neg_margin = _check_finite("pos_margin", pos_margin), _check_finite("neg_margin", neg_margin)
    with torch.no_grad():
        if not _backend.use_kernel("mine_pairs", embeddings.device):
            if rule == "multi_similarity":
                return _reference.multi_similarity_mine(embeddings, labels, ref_emb, ref_labels, epsilon=epsilon)
            return _reference.pair_margin_mine(embeddings, labels, ref_emb, ref_labels,
                                               pos_margin=pos_margin, neg_margin=neg_margin)
        return tuple(torch.ops.fusedtrain.mine_pairs(embeddings, labels, ref_emb, ref_labels, rule, epsilon,
                                                     pos_margin, neg_margin))


def multi_similarity_mine(embeddings, labels, ref_emb=None, ref_labels=None, *, epsilon: float = 0.1):
    """Multi-Similarity mining (PML MultiSimilarityMiner): int64 `(a1, p, a2, n)`; anchors index
    `embeddings`, p/n the reference set. Order within the tuple is unspecified (compare as sets)."""
    return _mine("multi_similarity", embeddings, labels, ref_emb, ref_labels, epsilon=epsilon)


def pair_margin_mine(embeddings, labels, ref_emb=None, ref_labels=None, *, pos_margin: float = 0.2,
                     neg_margin: float = 0.8):
    """Pair-margin mining with cosine similarity (PML PairMarginMiner): positives with S < pos_margin,
    negatives with S > neg_margin. int64 `(a1, p, a2, n)`."""
    return _mine("pair_margin", embeddings, labels, ref_emb, ref_labels, pos_margin=pos_margin,
                 neg_margin=neg_margin)


def batch_hard_mine(embeddings, labels, ref_emb=None, ref_labels=None):
    """Batch-hard mining (PML BatchHardMiner, cosine): int64 `(a, p, n)`, per anchor the lowest-S
    positive and highest-S negative (first index on ties); anchors lacking either are dropped."""
    embeddings, labels, ref_emb, ref_labels = _operands(embeddings, labels, ref_emb, ref_labels)
    with torch.no_grad():
        if not _backend.use_kernel("batch_hard_mine", embeddings.device):
            return _reference.batch_hard_mine(embeddings, labels, ref_emb, ref_labels)
        return tuple(torch.ops.fusedtrain.batch_hard_mine(embeddings, labels, ref_emb, ref_labels))


def tcm_loss(embeddings, labels, ref_emb=None, ref_labels=None, *, lambda_plus: float = 1.0,
             lambda_minus: float = 1.0, margin_plus: float = 0.9, margin_minus: float = 0.5) -> torch.Tensor:
    """Threshold-consistent margin regularizer (PML ThresholdConsistentMarginLoss), fused:
    λ⁺·mean_{s∈S⁺, s<=m⁺}(m⁺ − s) + λ⁻·mean_{s∈S⁻, s>=m⁻}(s − m⁻) over all pairs. Unlike PML 2.9.0,
    `ref_emb` is honoured."""
    embeddings, labels, ref_emb, ref_labels = _operands(embeddings, labels, ref_emb, ref_labels)
    hyper = [_check_finite(n, v) for n, v in (("lambda_plus", lambda_plus), ("lambda_minus", lambda_minus),
                                              ("margin_plus", margin_plus), ("margin_minus", margin_minus))]
    if not _backend.use_kernel("tcm_loss", embeddings.device):
        return _reference.tcm_loss(embeddings, labels, ref_emb, ref_labels, lambda_plus=hyper[0],
                                   lambda_minus=hyper[1], margin_plus=hyper[2], margin_minus=hyper[3])
    loss, _ = torch.ops.fusedtrain.tcm_loss(embeddings, labels, ref_emb, ref_labels, *hyper)
    return loss


# ---------------------------------------------------------------------------------------------
# Autograd and fake (meta) kernels for the compiled ops. Registered only when `_C` defines them.

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_loss(embeddings, labels, ref_emb, ref_labels, *_):
    return embeddings.new_empty(()), embeddings.new_empty((embeddings.shape[0], _STATS),
                                                          dtype=_acc_dtype(embeddings.dtype))


def _fake_ms_loss(embeddings, labels, ref_emb, ref_labels, self_index, alpha, beta, base, epsilon, mine,
                  compute_grad, ref_grad):
    loss, stats = _fake_loss(embeddings, labels, ref_emb, ref_labels)
    grad_x = embeddings.new_empty(embeddings.shape if compute_grad else (0,))
    grad_r = (ref_emb.new_empty(ref_emb.shape) if compute_grad and ref_grad and ref_emb is not None
              else embeddings.new_empty((0,)))
    return loss, stats, grad_x, grad_r


def _fake_backward(grad_loss, embeddings, labels, ref_emb, ref_labels, *rest):
    ref_grad = rest[-1]
    grad_ref = (ref_emb.new_empty(ref_emb.shape) if ref_grad and ref_emb is not None
                else embeddings.new_empty((0,)))
    return embeddings.new_empty(embeddings.shape), grad_ref


def _fake_mine(embeddings, labels, ref_emb, ref_labels, rule, epsilon, pos_margin, neg_margin):
    ctx = torch.library.get_ctx()
    n_pos, n_neg = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    new = lambda n: labels.new_empty((n,), dtype=torch.long)  # noqa: E731
    return new(n_pos), new(n_pos), new(n_neg), new(n_neg)


def _fake_batch_hard(embeddings, labels, ref_emb, ref_labels):
    n = torch.library.get_ctx().new_dynamic_size()
    return tuple(labels.new_empty((n,), dtype=torch.long) for _ in range(3))


def _refuse_double_backward(op: str, t: torch.Tensor) -> None:
    # create_graph=True: the kernels' gradient has no graph of its own, and returning it detached
    # would make every second-order term silently zero.
    if torch.is_grad_enabled() and not (torch.compiler.is_compiling() or is_fake(t)):
        raise NotImplementedError(f"fusedtrain.{op} does not support double backward (create_graph=True); "
                                  f"use fusedtrain.reference.mining.{op}")


def _setup_ms(ctx, inputs, output):
    (embeddings, labels, ref_emb, ref_labels, self_index, alpha, beta, base, epsilon, mine, compute_grad,
     ref_grad) = inputs
    _, stats, grad_x, grad_r = output
    ctx.hyper = (alpha, beta, base, epsilon, mine)
    ctx.computed = (compute_grad, compute_grad and ref_grad and ref_emb is not None)
    ctx.mark_non_differentiable(stats, grad_x, grad_r)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(embeddings, labels, ref_emb, ref_labels, self_index, stats, grad_x, grad_r)


def _backward_ms(ctx, grad_loss, *_grads_of_non_differentiable):
    embeddings, labels, ref_emb, ref_labels, self_index, stats, grad_x, grad_r = ctx.saved_tensors
    need_x, need_r = ctx.needs_input_grad[0], ref_emb is not None and ctx.needs_input_grad[2]
    if grad_loss is None or not (need_x or need_r):
        return (None,) * 12
    _refuse_double_backward("multi_similarity_loss", embeddings)
    if ctx.computed[0] and (ctx.computed[1] or not need_r):
        # The forward computed the gradients for an upstream gradient of 1: scale them.
        gx, gr = grad_x * grad_loss, (grad_r * grad_loss if need_r else None)
    else:
        gx, gr = torch.ops.fusedtrain._multi_similarity_loss_backward(
            grad_loss, embeddings, labels, ref_emb, ref_labels, self_index, stats, *ctx.hyper, need_r)
    return (gx if need_x else None, None, gr if need_r else None) + (None,) * 9


def _setup_tcm(ctx, inputs, output):
    embeddings, labels, ref_emb, ref_labels, *hyper = inputs
    _, stats = output
    ctx.hyper = tuple(hyper)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(embeddings, labels, ref_emb, ref_labels, stats)


def _backward_tcm(ctx, grad_loss, _grad_stats):
    embeddings, labels, ref_emb, ref_labels, stats = ctx.saved_tensors
    need_x, need_r = ctx.needs_input_grad[0], ref_emb is not None and ctx.needs_input_grad[2]
    if grad_loss is None or not (need_x or need_r):
        return (None,) * 8
    _refuse_double_backward("tcm_loss", embeddings)
    gx, gr = torch.ops.fusedtrain._tcm_loss_backward(grad_loss, embeddings, labels, ref_emb, ref_labels,
                                                     stats, *ctx.hyper, need_r)
    return (gx if need_x else None, None, gr if need_r else None) + (None,) * 5


def _register() -> None:
    if not _backend.has_extension() or not hasattr(torch.ops.fusedtrain, "multi_similarity_loss"):
        return
    lib = "fusedtrain::"
    torch.library.register_fake(lib + "multi_similarity_loss")(_fake_ms_loss)
    torch.library.register_fake(lib + "_multi_similarity_loss_backward")(_fake_backward)
    torch.library.register_fake(lib + "tcm_loss")(_fake_loss)
    torch.library.register_fake(lib + "_tcm_loss_backward")(_fake_backward)
    torch.library.register_fake(lib + "mine_pairs")(_fake_mine)
    torch.library.register_fake(lib + "batch_hard_mine")(_fake_batch_hard)
    torch.library.register_autograd(lib + "multi_similarity_loss", _backward_ms, setup_context=_setup_ms)
    torch.library.register_autograd(lib + "tcm_loss", _backward_tcm, setup_context=_setup_tcm)


_register()

from ._mining_classes import (  # noqa: E402  (the classes use the functional ops above)
    BatchHardMiner, CrossBatchMemory, MinedPairs, MultiSimilarityLoss, MultiSimilarityMiner, PairMarginMiner,
    ThresholdConsistentMarginLoss)

__all__ = ["multi_similarity_loss", "multi_similarity_mine", "pair_margin_mine", "batch_hard_mine", "tcm_loss",
           "MultiSimilarityMiner", "MinedPairs", "MultiSimilarityLoss", "BatchHardMiner", "PairMarginMiner",
           "ThresholdConsistentMarginLoss", "CrossBatchMemory"]
