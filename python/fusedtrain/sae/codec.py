"""The fused SAE encoder `sae_encode` (GEMM + routing, the B x F pre-activations freed before
backward) and the sparse decoder `sparse_decode` (fp32 accumulation, sparse backward)."""
from __future__ import annotations

import torch

from .._core import autocast, backend
from .._core.checks import check_float_tensor, check_like
from . import reference as _reference
from .checks import check_acts, check_csr_indices, check_encoder, check_theta, routing_param
from .routing import route
from .types import SparseActs

_ops = torch.ops.fusedtrain


def encode_with_cutoff(x, W_enc, b_enc, b_dec, routing: str, param: int, theta=None) -> tuple[SparseActs, torch.Tensor]:
    if backend.use_kernel("sae_encode", x.device):
        row_ptr, feature, value, cutoff = _ops.sae_encode(x, W_enc, b_enc, b_dec, routing, param, theta)
        return SparseActs(row_ptr, feature, value), cutoff
    pre = (x - b_dec) @ W_enc + b_enc
    return route(pre, routing, param, theta)


# Autocast (docs/sae.md, "Mixed precision"): encoder and decoder are GEMMs, cast to the autocast dtype
# like nn.Linear's (theta and the CSR indices are not cast); the kernels accumulate in fp32.
@autocast.policy(autocast.LOWER, device="x", cast_args=("x", "W_enc", "b_enc", "b_dec"))
def sae_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
               routing: str = "topk", k: int | None = None, *, m: int | None = None,
               budget: int | None = None, theta=None) -> SparseActs:
    """Fused encoder: pre = (x − b_dec)·W_enc + b_enc, then the routing, as :class:`SparseActs`.

    routing "topk" (k), "feature_choice" (m, default ceil(k·B/F)), "mutual_choice" (budget,
    default k·B) or "threshold" (theta). The dense pre-activations are freed before returning;
    backward gives sparse-dense gradients for x, W_enc, b_enc and b_dec.
    """
    check_encoder(x, W_enc, b_enc, b_dec)
    if routing == "threshold":
        theta = check_theta(theta, x.new_empty(0, W_enc.shape[1]))
        return encode_with_cutoff(x, W_enc, b_enc, b_dec, "threshold", 0, theta)[0]
    param = routing_param(routing, k, m, budget, x.shape[0], W_enc.shape[1])
    return encode_with_cutoff(x, W_enc, b_enc, b_dec, routing, param)[0]


@autocast.policy(autocast.LOWER, device="W_dec", cast_args=("acts", "W_dec", "b_dec"))
def sparse_decode(acts, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None, *,
                  check_indices: bool = True) -> torch.Tensor:
    """x̂_b = Σ_{(b, f) stored} value·W_dec[f] + b_dec, accumulated in fp32 (fp64 for fp64).

    acts: :class:`SparseActs` (or a `(row_ptr, feature, value)` tuple); W_dec (F, d); b_dec (d,) or
    None. check_indices: validate row_ptr and feature (a host sync on CUDA; pass False for
    activations made by this module's routings).
    """
    check_float_tensor(W_dec, "W_dec", 2)
    acts = check_acts(acts, W_dec)
    if b_dec is not None:
        check_float_tensor(b_dec, "b_dec", 1)
        check_like(b_dec, W_dec, "b_dec", "W_dec")
        if b_dec.shape[0] != W_dec.shape[1]:
            raise ValueError(f"b_dec must have shape ({W_dec.shape[1]},), got {tuple(b_dec.shape)}")
    if check_indices:
        check_csr_indices(acts, W_dec.shape[0])
    if backend.use_kernel("sae_gather_rows", W_dec.device):
        return _ops.sae_gather_rows(acts.row_ptr, acts.feature, acts.value, W_dec, b_dec)
    out = _reference.decode(acts.to_dense(W_dec.shape[0]), W_dec, b_dec if b_dec is not None else 0)
    return out
