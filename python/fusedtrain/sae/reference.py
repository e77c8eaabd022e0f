"""Pure-PyTorch, float64-capable references of the SAE routings and the dense SAE step (docs/sae.md).

Selection ranks entries by value (descending) and then index (ascending): a stable sort of the
negated values gives exactly that order, so these references are deterministic under ties (where
`torch.topk` is not). Only entries with pre > 0 are ever kept. Everything here is dense B x F: the
ground truth the fused kernels are tested against, and the baseline they are timed against.
"""
from __future__ import annotations

import math

import torch

ROUTINGS = ("topk", "feature_choice", "mutual_choice", "threshold")


def _rank_order(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices along `dim` ordered by (value descending, index ascending); NaN ranks as -inf (ties
    with it by index, as in the kernels). Infinities are kept: nan_to_num's defaults would turn them
    into the largest finite values and rank -inf above NaN."""
    key = torch.nan_to_num(values.double(), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    return torch.sort(-key, dim=dim, stable=True).indices


def topk_select(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best entries of each row (raw values, not rectified) and their int64 indices, best first."""
    idx = _rank_order(pre, 1)[:, :k]
    return pre.gather(1, idx), idx


def topk_mask(pre: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(pre, dtype=torch.bool)
    mask.scatter_(1, topk_select(pre, k)[1], True)
    return mask & (pre > 0)


def feature_choice_mask(pre: torch.Tensor, m: int) -> torch.Tensor:
    B = pre.shape[0]
    mask = torch.zeros_like(pre, dtype=torch.bool)
    if m > 0 and pre.numel():
        idx = _rank_order(pre, 0)[:min(m, B)]
        mask.scatter_(0, idx, True)
    return mask & (pre > 0)


def mutual_choice_mask(pre: torch.Tensor, budget: int) -> torch.Tensor:
    flat = torch.zeros(pre.numel(), dtype=torch.bool, device=pre.device)
    if budget > 0 and pre.numel():
        flat[_rank_order(pre.reshape(-1), 0)[:budget]] = True
    return flat.reshape(pre.shape) & (pre > 0)


def threshold_mask(pre: torch.Tensor, theta) -> torch.Tensor:
    """pre > θ (and > 0), compared in float64: θ is not rounded to pre's dtype."""
    theta = torch.as_tensor(theta, dtype=torch.float64, device=pre.device)
    return (pre.double() > theta) & (pre > 0)


def route_mask(pre: torch.Tensor, routing: str, k: int | None = None, theta=None) -> torch.Tensor:
    """Boolean (B, F) mask of the kept entries. `k` is TopK's k, feature choice's m or mutual
    choice's budget."""
    if routing == "topk":
        return topk_mask(pre, k)
    if routing == "feature_choice":
        return feature_choice_mask(pre, k)
    if routing == "mutual_choice":
        return mutual_choice_mask(pre, k)
    if routing == "threshold":
        return threshold_mask(pre, theta)
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")


def _first_rejected(values: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """The (m + 1)-th best positive value along `dim`, 0 where at most m entries are positive
    (every positive entry is kept): the cutoff of docs/sae.md, the best positive value the routing
    rejected. `pre > cutoff` keeps exactly the selection, but for kept entries tied with it."""
    pos = torch.where(values > 0, values.double(), torch.zeros((), dtype=torch.float64, device=values.device))
    n = values.shape[dim]
    if m >= n:
        shape = list(values.shape)
        del shape[dim]
        return torch.zeros(shape, dtype=torch.float64, device=values.device)
    return pos.sort(dim=dim, descending=True).values.select(dim, m)


def feature_choice_cutoff(pre: torch.Tensor, m: int) -> torch.Tensor:
    """Per feature, the best positive value feature choice rejects: the (m + 1)-th best positive
    value of the column, 0 where at most m are positive (float64)."""
    return _first_rejected(pre, m, 0)


def mutual_choice_cutoff(pre: torch.Tensor, budget: int) -> torch.Tensor:
    """The best positive value mutual choice rejects, shape (1,): the (budget + 1)-th best positive
    value of the matrix, 0 where at most `budget` are positive (float64)."""
    return _first_rejected(pre.reshape(-1), budget, 0).reshape(1)


def csr_from_dense(acts: torch.Tensor, mask: torch.Tensor):
    """(row_ptr, feature, value) of the masked entries, features ascending within each row."""
    counts = mask.sum(1)
    row_ptr = torch.zeros(acts.shape[0] + 1, dtype=torch.int64, device=acts.device)
    row_ptr[1:] = counts.cumsum(0)
    token, feature = mask.nonzero(as_tuple=True)
    return row_ptr, feature, acts[token, feature]


def entry_tokens(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """Each stored entry's token (row), reading row_ptr as every op does (docs/sae.md): clamped to
    [0, nnz], then its running maximum. An entry in no row gets -1 (before row 0) or B (after the
    last row); a valid row_ptr gives each entry its row. No host sync, no index can leave a tensor."""
    offsets = row_ptr.clamp(0, nnz).cummax(0).values
    entries = torch.arange(nnz, device=row_ptr.device, dtype=row_ptr.dtype)
    return torch.searchsorted(offsets, entries, right=True) - 1


def dense_from_csr(row_ptr: torch.Tensor, feature: torch.Tensor, value: torch.Tensor, num_latents: int):
    """The (B, F) dense matrix of a CSR-by-token result (differentiable in `value`). Entries in no
    row, or with a feature outside [0, F), are dropped (a spare row and column take them)."""
    B = row_ptr.numel() - 1
    token = entry_tokens(row_ptr, feature.numel())
    token = torch.where((token >= 0) & (token < B), token, B)
    feature = torch.where((feature >= 0) & (feature < num_latents), feature, num_latents)
    out = value.new_zeros(B + 1, num_latents + 1)
    return out.index_put((token, feature), value)[:B, :num_latents]


def encode(x, W_enc, b_enc, b_dec, routing: str, k: int | None = None, theta=None) -> torch.Tensor:
    """Dense (B, F) latent activations: pre = (x − b_dec)·W_enc + b_enc, kept entries only."""
    pre = (x - b_dec) @ W_enc + b_enc
    return pre * route_mask(pre.detach(), routing, k, theta)


def decode(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """Dense decode x̂ = acts·W_dec + b_dec."""
    return acts @ W_dec + b_dec


def sae_step(x, W_enc, b_enc, W_dec, b_dec, routing: str = "topk", k: int | None = None) -> torch.Tensor:
    """The dense training step's loss: ‖x − decode(encode(x))‖² summed, the baseline the benchmark times."""
    recon = decode(encode(x, W_enc, b_enc, b_dec, routing, k), W_dec, b_dec)
    return (recon - x).pow(2).sum()
