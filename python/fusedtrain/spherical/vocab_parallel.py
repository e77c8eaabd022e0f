"""The fused linear spherical loss with the classifier's rows sharded over a process group
(vocab parallel; maths: docs/spherical.md, "Fused linear op", and docs/distributed.md).

Rank r holds the contiguous rows [offset_r, offset_r + D_r) of the weight W' = [W | bias] (uneven
shards allowed, empty ones too); `input` and `target` (global class ids) are the same on every
rank. A spherical loss reads three numbers per row: s = h'·w̄', the spread Σ_k (o_k − μ)² = h'ᵀCh'
and o_c. All three split over the shards:

- w̄' = Σ_r w̄'_r: one all-reduce of the column sums per weight version (with the shard sizes, so
  every rank learns the offsets);
- C = Σ_r Ĉ_r with Ĉ_r = C_r + D_r·(m_r − m)(m_r − m)ᵀ, the shard's centred Gram matrix moved from
  its own mean row m_r to the global one m (Chan's parallel-variance correction): no cancellation;
- o_c lives on the rank that owns class c.

So the forward is one all-reduce of an (N, 2) buffer [h'ᵀĈ_r h', o_c on the owning rank]; every rank
then has the whole problem's (s, spread, o_c) and computes the loss and its coefficients
(α, β, γ) itself. The weight gradient of the shard's rows, 1·(a − M'm)ᵀ + W'_r·M' + Σ_n γ_n e_{c_n} h'_nᵀ,
needs only the replicated input and the coefficients: no communication (the fused op's backward
kernel computes it on the shard, given D_r·m as its column sums). The input gradient
α·w̄ + β·C·h' + γ·W_c is a sum over shards of α·D_r·m + β·Ĉ_r·h' + γ·W_c·[c owned]: a partial per rank,
all-reduced asynchronously while the weight gradient is computed.
"""
from __future__ import annotations

import collections

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .._core import backend
from .._core.checks import check_float_tensor, check_like, check_tensor
from .._core.dtypes import accumulate_dtype
from .checks import (DEFAULT_A, DEFAULT_B, DEFAULT_EPS, DEFAULT_VAR_EPS, check_hyperparameters,
                     check_saved, check_target_dtype)
from .linear import linear_spherical_stats

__all__ = ["VocabParallelStats", "vocab_parallel_linear_spherical_stats", "vocab_parallel_linear_spherical_loss"]

# gram: this shard's centred Gram matrix re-centred about the global mean row, Ĉ_r (d', d');
# colsum: the whole weight's column sums w̄' (d',), the same on every rank; shard_sizes: D_r of
# every rank of the group, in rank order (the offsets are their prefix sums).
VocabParallelStats = collections.namedtuple("VocabParallelStats", ["gram", "colsum", "shard_sizes"])


def _group_rank_and_size(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("the vocab-parallel loss needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_shard(weight_shard, linear_bias) -> None:
    check_float_tensor(weight_shard, "weight_shard")
    if weight_shard.dim() != 2:
        raise ValueError(f"weight_shard must have shape (D_r, d), got {tuple(weight_shard.shape)}")
    if linear_bias is None:
        return
    check_tensor(linear_bias, "linear_bias")
    if tuple(linear_bias.shape) != (weight_shard.shape[0],):
        raise ValueError(f"linear_bias must be this rank's bias shard of shape ({weight_shard.shape[0]},), "
                         f"got {tuple(linear_bias.shape)}")
    check_like(linear_bias, weight_shard, "linear_bias", "weight_shard")


def vocab_parallel_linear_spherical_stats(weight_shard: torch.Tensor, linear_bias: torch.Tensor | None = None,
                                          *, group=None) -> VocabParallelStats:
    """The statistics the vocab-parallel loss reads, for this rank's rows `weight_shard` (D_r, d) (and
    bias shard (D_r,)): a collective (one all-reduce of d' + P float64 values), so every rank of
    `group` must call it. Reuse them (`stats=`) while the weight is unchanged: a new weight version
    needs new statistics, else the loss is silently wrong."""
    _check_shard(weight_shard, linear_bias)
    rank, world = _group_rank_and_size(group)
    rows, d = weight_shard.shape
    dp = d + (linear_bias is not None)
    acc = accumulate_dtype(weight_shard.dtype)
    if rows:
        gram, colsum = linear_spherical_stats(weight_shard, linear_bias)
    else:  # an empty shard (D < P under torch.chunk's split) contributes nothing
        gram = weight_shard.new_zeros((dp, dp), dtype=acc)
        colsum = weight_shard.new_zeros((dp,), dtype=acc)
    # Column sums and shard sizes in one float64 all-reduce: sizes are exact, and the sum of the
    # column sums is rounded once, to the accumulate type, as the single-process sum is.
    buffer = weight_shard.new_zeros((dp + world,), dtype=torch.float64)
    buffer[:dp] = colsum
    buffer[dp + rank] = rows
    dist.all_reduce(buffer, group=group)
    sizes = tuple(int(x) for x in buffer[dp:].round().tolist())
    total = sum(sizes)
    if total == 0:
        raise ValueError("the sharded weight has no rows on any rank (D = 0)")
    if rows:  # Chan: Σ_{k∈r} (W'_k − m)(W'_k − m)ᵀ = C_r + D_r·(m_r − m)(m_r − m)ᵀ
        shift = (colsum.double() / rows - buffer[:dp] / total).to(acc)
        gram = gram + rows * torch.outer(shift, shift)
    return VocabParallelStats(gram, buffer[:dp].to(acc), sizes)


def _check_stats(stats, weight_shard, linear_bias, world: int, rank: int) -> None:
    if not isinstance(stats, VocabParallelStats):
        raise TypeError(f"stats must be vocab_parallel_linear_spherical_stats(weight_shard, linear_bias, "
                        f"group=group), got {type(stats).__name__}")
    dp = weight_shard.shape[1] + (linear_bias is not None)
    acc = accumulate_dtype(weight_shard.dtype)
    for name, t, shape in (("stats.gram", stats.gram, (dp, dp)), ("stats.colsum", stats.colsum, (dp,))):
        check_saved(t, name, shape, acc)
        if t.device != weight_shard.device:
            raise ValueError(f"{name} is on {t.device} but weight_shard is on {weight_shard.device}")
    if len(stats.shard_sizes) != world or stats.shard_sizes[rank] != weight_shard.shape[0]:
        raise ValueError(f"stats.shard_sizes {stats.shard_sizes} do not describe this group of {world} ranks "
                         f"with {weight_shard.shape[0]} rows on rank {rank}")


def _row_losses(s, spread, oc, D: int, kind: str, a, b, eps, var_eps):
    """Per-row loss from s = Σo, spread = Σ(o − μ)² and o_c (float64), the same formulas as the
    single-process op (docs/spherical.md, the kind table); autograd of it gives the coefficients."""
    mu = s / D
    if kind == "z":  # shift invariant: statistics about the row mean, no cancellation
        sigma = torch.sqrt(torch.clamp(spread / D, min=0.0) + var_eps)
        return F.softplus(a * (b - (oc - mu) / sigma)) / a
    q = spread + s * mu  # Σo² as a sum of two non-negative terms
    if kind == "spherical":
        return torch.log(q + D * eps) - torch.log(oc * oc + eps)
    if kind == "taylor":
        return torch.log(D + s + 0.5 * q) - torch.log(1.0 + oc + 0.5 * oc * oc)
    return q - 2.0 * oc + 1.0  # "mse"


def _loss_and_coefficients(s, spread, oc, target, D: int, hyper: dict):
    """Row losses (N,) and centred coefficients (N, 3) = (α, β, γ) with ∂L/∂o_k = α + β(o_k − μ) + γ[k = c]
    (so α = ∂L/∂s, β = 2·∂L/∂spread, γ = ∂L/∂o_c: ∂spread/∂o_k = 2(o_k − μ)), in float64, the
    reduction weight included; ignored rows 0, out-of-range targets NaN, as the fused op."""
    ignore_index = hyper["ignore_index"]
    keep = target != ignore_index
    valid = keep & (target >= 0) & (target < D)
    with torch.enable_grad():
        stats = [x.detach().double().requires_grad_() for x in (s, spread, oc)]
        rows = _row_losses(*stats, D, hyper["kind"], hyper["a"], hyper["b"], hyper["eps"], hyper["var_eps"])
        grads = torch.autograd.grad(rows.sum(), stats, allow_unused=True)
    rows = rows.detach()
    coef = torch.stack([torch.zeros_like(rows) if g is None else g for g in grads], dim=1)
    coef[:, 1] *= 2.0
    finite = torch.isfinite(stats[0]) & torch.isfinite(stats[1]) & torch.isfinite(stats[2])
    nan = torch.full_like(rows, float("nan"))
    # Non-finite statistics: a non-finite loss, and NaN coefficients (a β of 2/inf = 0 would leave
    # the weight gradient finite).
    rows = torch.where(finite | ~torch.isfinite(rows), rows, nan)
    coef = torch.where(finite.unsqueeze(1), coef, nan.unsqueeze(1))
    rows = torch.where(valid, rows, torch.where(keep, nan, torch.zeros_like(rows)))
    coef = torch.where(valid.unsqueeze(1), coef, torch.where(keep, nan, torch.zeros_like(rows)).unsqueeze(1))
    reduction = hyper["reduction"]
    if reduction == "none":
        return rows, coef
    total = rows.sum()
    if reduction == "sum":
        return total, coef
    count = keep.sum().double()
    return total / count, torch.where(keep.unsqueeze(1), coef / count, coef)


def _weight_grads(h, weight, bias, shard_colsum, alpha, beta, gamma, owned, safe):
    """The shard's rows of ∂L/∂W' = 1·(a − M'·m)ᵀ + W'·M' + Σ_n γ_n e_{c_n} h'_nᵀ in PyTorch ops (no
    compiled kernel for this device; an empty shard), accumulate type; upstream-scaled coefficients."""
    acc, d = h.dtype, h.shape[1]
    hp = h if bias is None else torch.cat([h, h.new_ones((h.shape[0], 1))], dim=1)
    wp = weight.to(acc) if bias is None else torch.cat([weight.to(acc), bias.to(acc).unsqueeze(1)], dim=1)
    m_prime = hp.t() @ (beta.unsqueeze(1) * hp)  # M' = H'ᵀ·diag(β)·H'
    mean = shard_colsum / max(weight.shape[0], 1)  # the global mean row m (shard_colsum = D_r·m)
    row = hp.t() @ alpha - m_prime @ mean          # a − M'·m, the same for every row
    grad = torch.addmm(row.unsqueeze(0).expand(wp.shape[0], -1), wp, m_prime)
    grad.index_add_(0, safe[owned], gamma[owned].unsqueeze(1) * hp[owned])
    return grad[:, :d].to(weight.dtype), None if bias is None else grad[:, d].to(bias.dtype)


class _VocabParallelLoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, input, weight, bias, target, gram, colsum, shard_colsum, offset, total, group, hyper):
        acc = accumulate_dtype(input.dtype)
        d, rows = input.shape[1], weight.shape[0]
        h = input.to(acc)
        # proj = H'·Ĉ_r (N, d'): this shard's share of C·h', kept for the input gradient.
        proj = h @ gram[:d]
        if bias is not None:
            proj += gram[d]
        partial = torch.empty((h.shape[0], 2), dtype=acc, device=h.device)
        partial[:, 0] = torch.linalg.vecdot(proj[:, :d], h)
        if bias is not None:
            partial[:, 0] += proj[:, d]
        local = target - offset
        owned = (target != hyper["ignore_index"]) & (local >= 0) & (local < rows)
        safe = torch.where(owned, local, torch.zeros_like(local))
        if rows:
            oc = torch.linalg.vecdot(weight[safe].to(acc), h)
            if bias is not None:
                oc += bias[safe].to(acc)
            partial[:, 1] = torch.where(owned, oc, torch.zeros_like(oc))
        else:
            partial[:, 1] = 0
        dist.all_reduce(partial, group=group)  # [spread, o_c]: the one collective of the forward
        s = h @ colsum[:d]
        if bias is not None:
            s += colsum[d]
        loss, coef = _loss_and_coefficients(s, partial[:, 0], partial[:, 1], target, total, hyper)
        keep = target != hyper["ignore_index"]
        ctx.save_for_backward(input, weight, bias, shard_colsum, proj, coef.to(acc), owned, safe, keep)
        ctx.group = group
        return loss.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        input, weight, bias, shard_colsum, proj, raw_coef, owned, safe, keep = ctx.saved_tensors
        acc = raw_coef.dtype
        d = input.shape[1]
        coef = raw_coef * grad_loss.to(acc).reshape(-1, 1)  # a scalar, or (N,) for reduction="none"
        alpha, beta = coef[:, 0], coef[:, 1]
        gamma = torch.where(owned, coef[:, 2], torch.zeros_like(coef[:, 2]))
        h = input.to(acc)
        grad_input = None
        if ctx.needs_input_grad[0]:
            # This shard's share of α·w̄ + β·C·h' + γ·W_c, summed over the group while the weight
            # gradient is formed.
            partial = torch.outer(alpha, shard_colsum[:d]) + beta.unsqueeze(1) * proj[:, :d]
            if weight.shape[0]:
                partial += gamma.unsqueeze(1) * weight[safe].to(acc)
            # Ignored rows get exact zeros, as the fused op (0·NaN would not be 0).
            partial = torch.where(keep.unsqueeze(1), partial, torch.zeros_like(partial))
            work = dist.all_reduce(partial, group=ctx.group, async_op=True)
        grad_weight = grad_bias = None
        want = [bool(ctx.needs_input_grad[1]), bias is not None and bool(ctx.needs_input_grad[2])]
        if any(want) and weight.shape[0] and backend.use_kernel("linear_spherical_loss", weight.device):
            # The fused op's own backward on the shard: its `colsum / D` is the mean row it centres
            # about, so D_r·m makes it the global one; rows whose class another rank owns (or that
            # are ignored) get target -1 = ignore_index: no scatter, their α and β still count.
            local_target = torch.where(owned, safe, torch.full_like(safe, -1))
            _, grad_weight, grad_bias = torch.ops.fusedtrain._linear_spherical_loss_backward(
                grad_loss, input, weight, bias, local_target, shard_colsum, raw_coef, proj, -1, [False] + want)
        elif any(want):
            grad_weight, grad_bias = _weight_grads(h, weight, bias, shard_colsum, alpha, beta, gamma, owned, safe)
        grad_weight = grad_weight if want[0] else None
        grad_bias = grad_bias if want[1] else None
        if ctx.needs_input_grad[0]:
            work.wait()
            grad_input = partial.to(input.dtype)
        return (grad_input, grad_weight, grad_bias) + (None,) * 8


def vocab_parallel_linear_spherical_loss(input: torch.Tensor, weight_shard: torch.Tensor, target: torch.Tensor, *,
                                         linear_bias: torch.Tensor | None = None, group=None, kind: str = "z",
                                         a: float = DEFAULT_A, b: float = DEFAULT_B, eps: float = DEFAULT_EPS,
                                         var_eps: float = DEFAULT_VAR_EPS, ignore_index: int = -100,
                                         reduction: str = "mean", check_target: bool = True,
                                         stats: VocabParallelStats | None = None) -> torch.Tensor:
    """:func:`fusedtrain.linear_spherical_loss` of the whole weight, whose rows are sharded over `group`.

    weight_shard (D_r, d): this rank's contiguous rows of the weight, shards in rank order (uneven
      sizes allowed; the offsets come from the sizes); linear_bias (D_r,): the matching bias shard.
    input (..., d), target (...) global class ids: the same on every rank.
    Returns, on every rank, the loss of the whole weight (arguments and defaults as
    linear_spherical_loss). Backward gives `input` the whole gradient (all-reduced) and the shards
    their rows of the whole gradient. A collective: every rank of `group` calls it.
    stats: :func:`vocab_parallel_linear_spherical_stats` of this very weight (reuse across
      micro-batches); computed here (one more all-reduce) when None.
    Communication: one all-reduce of N x 2 accumulate-type values forward, one of N x d backward.
    """
    check_hyperparameters(kind, a, b, eps, var_eps, ignore_index, reduction)
    for name, t in (("input", input), ("target", target)):
        check_tensor(t, name)
    _check_shard(weight_shard, linear_bias)
    check_target_dtype(target)
    d = weight_shard.shape[1]
    if input.dtype != weight_shard.dtype:
        raise TypeError(f"input must have weight_shard's dtype {weight_shard.dtype}, got {input.dtype}")
    if input.dim() < 1 or input.shape[-1] != d:
        raise ValueError(f"input must have shape (..., {d}) for weight_shard of shape "
                         f"{tuple(weight_shard.shape)}, got {tuple(input.shape)}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} for input of shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)}")
    for name, t in (("input", input), ("target", target)):
        if t.device != weight_shard.device:
            raise ValueError(f"{name} is on {t.device} but weight_shard is on {weight_shard.device}")
    rank, world = _group_rank_and_size(group)
    if stats is None:
        stats = vocab_parallel_linear_spherical_stats(weight_shard, linear_bias, group=group)
    else:
        _check_stats(stats, weight_shard, linear_bias, world, rank)
    total = sum(stats.shard_sizes)
    flat_target = target.reshape(-1)
    if check_target:  # the target is replicated: every rank raises, before any collective is left waiting
        keep = flat_target != ignore_index
        if bool(((flat_target < 0) | (flat_target >= total))[keep].any()):
            raise ValueError(f"target holds class indices outside [0, {total}) that are not ignore_index "
                             f"({ignore_index})")
    hyper = dict(kind=kind, a=float(a), b=float(b), eps=float(eps), var_eps=float(var_eps),
                 ignore_index=int(ignore_index), reduction=reduction)
    rows = weight_shard.shape[0]
    # D_r·m: this shard's share of w̄' in the input gradient, and (divided by D_r) the global mean row.
    shard_colsum = stats.colsum * (rows / total)
    loss = _VocabParallelLoss.apply(input.reshape(flat_target.numel(), d), weight_shard, linear_bias, flat_target,
                                    stats.gram.detach(), stats.colsum.detach(), shard_colsum.detach(),
                                    sum(stats.shard_sizes[:rank]), total, group, hyper)
    return loss.reshape(target.shape) if reduction == "none" else loss
