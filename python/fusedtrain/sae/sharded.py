"""The latent-sharded `SparseAutoencoder` (docs/distributed.md), made by
`SparseAutoencoder(..., process_group=g)`.

Each rank of `g` holds a contiguous slice of the `num_latents` latents, in rank order (rows of
`W_dec`, columns of `W_enc`, entries of `b_enc` and of the per-latent buffers); `b_dec` and the input
`x` are replicated across `g`. Every output equals the single-process SAE's, and each rank's
gradients are its slice of the single-process gradients (`b_dec`'s whole, on every rank):

* Routing is global and exact. TopK: each rank routes its slice with the fused encoder, keeping
  its best min(k, F/P) entries per token; the true top k of a token are among the union of these
  candidates, so merging them in the single process's order (larger value, then smaller global
  index) selects exactly. Mutual choice the same with the batch budget (flat index b·F + f), and its
  cutoff (the best positive value rejected globally) from the candidates and each rank's local
  cutoff. Feature choice is per latent, hence local.
* Decode: each rank decodes its latents; the partial reconstructions are summed (all-reduce whose
  backward is the identity, the loss being replicated). The encoder's input `x − b_dec` is shared
  (backward all-reduces its gradient), so `b_dec` (and `x`, when it needs one) get the whole gradient.
* FVU is computed from the summed reconstruction on every rank; AuxK selects each token's top k_aux
  dead latents globally like TopK (k_aux from the global number of dead latents).

`data_parallel_group` (optional): the replicas that see different batches. The dead-latent counters
then count the tokens of all replicas and reset where a latent fired on any, and the threshold EMA
takes the replicas' mean cutoff, so replicas keep one set of statistics.
"""
from __future__ import annotations

import math

import torch

from .._core.checks import check_int
from .._core.distributed import (all_gather_rows, all_gather_sizes, group_rank, group_size, row_offset,
                                 share_input, sum_partials)
from .checks import check_encoder, routing_param
from .codec import encode_with_cutoff, sparse_decode
from .module import ForwardOutput, SparseAutoencoder
from .types import SparseActs

_SLICED = ("W_enc", "b_enc", "W_dec", "num_tokens_since_fired", "threshold")  # per-latent tensors
_LATENT_DIM = {"W_enc": 1}  # W_enc is (d, F); every other sliced tensor has the latents first


def _best_first(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The permutation ordering entries by larger value, then smaller key (two stable sorts)."""
    by_key = torch.sort(keys, stable=True).indices
    return by_key[torch.sort(-values[by_key], stable=True).indices]


def _keep_top_per_group(values, keys, groups, k: int) -> torch.Tensor:
    """Bool mask of the k best entries (larger value, then smaller key) within each group."""
    order = _best_first(values, keys)
    order = order[torch.sort(groups[order], stable=True).indices]
    sorted_groups = groups[order]
    rank_in_group = torch.arange(order.numel(), device=order.device) - torch.searchsorted(sorted_groups, sorted_groups)
    keep = torch.zeros_like(values, dtype=torch.bool)
    keep[order] = rank_in_group < k
    return keep


def _subset(acts: SparseActs, keep: torch.Tensor, batch: int) -> SparseActs:
    """The kept entries of CSR activations (values keep their autograd history)."""
    counts = torch.bincount(acts.token()[keep], minlength=batch)
    row_ptr = torch.zeros(batch + 1, dtype=torch.int64, device=keep.device)
    row_ptr[1:] = counts.cumsum(0)
    return SparseActs(row_ptr, acts.feature[keep], acts.value[keep])


class LatentShardedSparseAutoencoder(SparseAutoencoder):
    """`SparseAutoencoder` whose latents are split over `process_group` (module docstring). Build it
    as `SparseAutoencoder(d_in, num_latents, routing, k, ..., process_group=g)`; `num_latents` is
    global and divisible by the size of `g`. Initialisation draws each rank's slice from its own
    stream (forked from the default generator and the rank); `load_full_state_dict` loads this
    rank's slice of a single-process state dict and `full_state_dict()` gathers one."""

    def __init__(self, d_in: int, num_latents: int, routing: str = "topk", k: int = 32, *,
                 process_group=None, data_parallel_group=None, device=None, dtype=None, **kw) -> None:
        sharded = process_group is not None
        count, rank = (group_size(process_group), group_rank(process_group)) if sharded else (1, 0)
        check_int(num_latents, "num_latents", 1)
        if num_latents % count:
            raise ValueError(f"num_latents ({num_latents}) must be divisible by the size of process_group ({count}): "
                             "each rank holds an equal contiguous slice of the latents")
        check_int(k, "k", 1, num_latents if routing == "topk" else None)
        # k is checked against the global count above; the slice's own checks get a k it satisfies.
        super().__init__(d_in, num_latents // count, routing, 1, device=device, dtype=dtype, **kw)
        self.k, self.num_latents, self.num_local_latents = k, num_latents, num_latents // count
        self.process_group = process_group
        self.data_parallel_group = data_parallel_group
        self.shard_count, self.shard_rank = count, rank
        self.latent_offset = rank * self.num_local_latents
        if count > 1:
            self._init_slice()

    @torch.no_grad()
    def _init_slice(self) -> None:
        # Ranks usually share a seed: a stream forked from the default generator and the rank keeps
        # the slices apart and reproducible.
        seed = int(torch.randint(0, 2 ** 62, (1,)).item()) + self.shard_rank
        gen = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(self.d_in)
        enc = torch.empty(self.num_local_latents, self.d_in, dtype=self.W_enc.dtype).uniform_(-bound, bound,
                                                                                              generator=gen)
        self.W_enc.copy_(enc.t())
        self.W_dec.copy_(enc)
        self.set_decoder_norm_to_unit_norm()

    # -- state dicts ----------------------------------------------------------------------------
    def _latent_slice(self) -> slice:
        return slice(self.latent_offset, self.latent_offset + self.num_local_latents)

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict) -> None:
        """Load this rank's slice of a single-process `SparseAutoencoder.state_dict()`."""
        own = self.state_dict()
        missing = [name for name in own if name not in state_dict]
        if missing:
            raise KeyError(f"state_dict lacks {missing} (a single-process SparseAutoencoder's state dict)")
        for name, target in own.items():
            value = state_dict[name]
            if name in _SLICED:
                dim = _LATENT_DIM.get(name, 0)
                if not isinstance(value, torch.Tensor) or value.dim() <= dim or value.shape[dim] != self.num_latents:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"state_dict[{name!r}] must have {self.num_latents} latents along dim {dim}, "
                                     f"got {got}")
                value = value.narrow(dim, self.latent_offset, self.num_local_latents)
            if not isinstance(value, torch.Tensor) or value.shape != target.shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"state_dict[{name!r}] must have shape {tuple(target.shape)} (this rank's slice), "
                                 f"got {got}")
            getattr(self, name).copy_(value)

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """The single-process state dict, gathered (every rank gets it; a collective on the group)."""
        out = {}
        for name, value in self.state_dict().items():
            if name in _SLICED and self.shard_count > 1:
                rows = value.t() if _LATENT_DIM.get(name, 0) else value
                rows = all_gather_rows(rows.contiguous(), self.process_group)
                value = rows.t() if _LATENT_DIM.get(name, 0) else rows
            out[name] = value.detach().clone()
        return out

    # -- routing ---------------------------------------------------------------------------------
    def _shared(self, t: torch.Tensor) -> torch.Tensor:
        return share_input(t, self.process_group) if self.shard_count > 1 and t.requires_grad else t

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_in) as its (B, d_in) tokens, checked against this rank's parameters."""
        rows = self._rows(x)
        check_encoder(rows, self.W_enc, self.b_enc, self.b_dec)
        return rows

    def _gather(self, *columns: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """Columns of entries (each 1-D, one length) of every rank in rank order, as float64 (exact
        for values and for flat indices b·F + f below 2**53), and where this rank's entries start."""
        packed = torch.stack([c.detach().double() for c in columns], 1)
        sizes = all_gather_sizes(packed.shape[0], self.process_group, packed.device)
        with torch.no_grad():
            gathered = all_gather_rows(packed, self.process_group, sizes)
        return list(gathered.unbind(1)), row_offset(sizes, self.shard_rank)

    def _route(self, x, b_dec):
        """(this rank's kept activations with local feature indices, cutoff for the EMA or None)."""
        if self._uses_threshold():
            return encode_with_cutoff(x, self.W_enc, self.b_enc, b_dec, "threshold", 0, self.threshold)[0], None
        B = x.shape[0]
        param = routing_param(self.routing, self.k, self.m, None, B, self.num_latents)
        if self.routing == "feature_choice" or self.shard_count == 1:
            return encode_with_cutoff(x, self.W_enc, self.b_enc, b_dec, self.routing, param)
        local_param = min(param, self.num_local_latents) if self.routing == "topk" else param
        acts, local_cut = encode_with_cutoff(x, self.W_enc, self.b_enc, b_dec, self.routing, local_param)
        token, feature, n = acts.token(), acts.feature + self.latent_offset, acts.value.numel()
        # Candidates travel as (value, flat index b·F + f): 16 bytes each.
        (value, flat), start = self._gather(acts.value, token * self.num_latents + feature)
        flat = flat.long()
        if self.routing == "topk":
            keep = _keep_top_per_group(value, flat, flat // self.num_latents, param)
            return _subset(acts, keep[start:start + n], B), None
        keep = torch.zeros_like(value, dtype=torch.bool)
        keep[_best_first(value, flat)[:param]] = True
        # The best positive value rejected globally is among the candidates and the ranks' own cutoffs.
        cuts = all_gather_rows(local_cut.detach().double().reshape(1), self.process_group, [1] * self.shard_count)
        pool = torch.cat([value, cuts])
        pool = pool[pool > 0].sort(descending=True).values
        cutoff = pool[param:param + 1] if pool.numel() > param else pool.new_zeros(1)
        return _subset(acts, keep[start:start + n], B), cutoff.to(local_cut.dtype)

    def encode(self, x: torch.Tensor) -> SparseActs:
        """This rank's entries of the single-process activations (global feature indices)."""
        x = self._tokens(x)
        return self._global(self._route(self._shared(x), self._shared(self.b_dec))[0])

    def _global(self, acts: SparseActs) -> SparseActs:
        return SparseActs(acts.row_ptr, acts.feature + self.latent_offset, acts.value)

    def decode(self, acts: SparseActs) -> torch.Tensor:
        """The reconstruction from every rank's entries: takes this rank's entries with global
        feature indices (what `encode` returns); a collective on the group."""
        local = SparseActs(acts.row_ptr, acts.feature - self.latent_offset, acts.value)
        partial = sparse_decode(local, self.W_dec, None, check_indices=False)
        summed = sum_partials(partial, self.process_group) if self.shard_count > 1 else partial
        return summed + self.b_dec

    # -- statistics and AuxK ---------------------------------------------------------------------
    def _sum_over(self, t: torch.Tensor, group_attr: str) -> torch.Tensor:
        group = getattr(self, group_attr)
        sharded = self.shard_count > 1 if group_attr == "process_group" else group is not None
        return sum_partials(t, group) if sharded else t

    @torch.no_grad()
    def _update_statistics(self, acts: SparseActs, cutoff, batch: int) -> None:
        fired = torch.bincount(acts.feature, minlength=self.num_local_latents)
        tokens = torch.tensor(batch, dtype=torch.int64, device=fired.device)
        if self.data_parallel_group is not None:  # one set of counters for all replicas
            fired, tokens = self._sum_over(fired, "data_parallel_group"), self._sum_over(tokens, "data_parallel_group")
        self.num_tokens_since_fired.add_(tokens).masked_fill_(fired > 0, 0)
        if cutoff is None or self.routing == "topk" or cutoff.numel() == 0:
            return
        cut = cutoff.float().expand(self.num_local_latents)
        valid = torch.isfinite(cut)
        if self.data_parallel_group is not None:  # the replicas' mean of their finite cutoffs
            total = self._sum_over(torch.where(valid, cut, 0.0), "data_parallel_group")
            count = self._sum_over(valid.float(), "data_parallel_group")
            cut, valid = total / count.clamp_min(1), count > 0
        self._threshold_ema(cut, valid)

    def _auxk(self, x, b_dec, residual, dead, num_dead: int) -> torch.Tensor:
        """AuxK with each token's top k_aux dead latents of all ranks."""
        k_aux = min(self.k_aux, num_dead)
        if k_aux == 0:
            return x.new_zeros(())
        idx = dead.nonzero().squeeze(1)
        pre = (x - b_dec) @ self.W_enc[:, idx] + self.b_enc[idx]  # this rank's dead columns only
        values, top = pre.topk(min(k_aux, idx.numel()), dim=1)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(top.shape[1])
        feature, values = idx[top].reshape(-1), values.reshape(-1)
        if self.shard_count > 1:
            (value_all, flat), start = self._gather(values, token * self.num_latents + feature + self.latent_offset)
            flat = flat.long()
            keep = _keep_top_per_group(value_all, flat, flat // self.num_latents, k_aux)[start:start + values.numel()]
            token, feature, values = token[keep], feature[keep], values[keep]
        recon = x.new_zeros(x.shape).index_add(0, token, values.relu().unsqueeze(1) * self.W_dec[feature])
        recon = self._sum_over(recon, "process_group")  # no b_dec
        target = residual.detach()
        total = (target - target.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
        return (recon - target).pow(2).sum() / total

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """As `SparseAutoencoder.forward`, over the latents of every rank (collectives on the group)."""
        shape, x = x.shape, self._tokens(x)
        x_shared, b_dec_shared = self._shared(x), self._shared(self.b_dec)
        acts, cutoff = self._route(x_shared, b_dec_shared)
        sae_out = self.decode(self._global(acts))
        residual = sae_out - x
        fvu = residual.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        dead = self.num_tokens_since_fired > self.dead_tokens_threshold
        num_dead = int(self._sum_over(dead.sum(), "process_group"))
        auxk = (self._auxk(x_shared, b_dec_shared, -residual, dead, num_dead) if self.training and num_dead
                else x.new_zeros(()))
        if self.training:
            self._update_statistics(acts, cutoff, x.shape[0])
        return ForwardOutput(sae_out.reshape(shape), self._global(acts), fvu, auxk, fvu + self.auxk_alpha * auxk,
                             num_dead)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", shard {self.shard_rank} of {self.shard_count} "
                f"(latents [{self.latent_offset}, {self.latent_offset + self.num_local_latents}))")


SparseAutoencoder._latent_sharded_class = LatentShardedSparseAutoencoder
