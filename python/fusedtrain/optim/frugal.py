"""The FRUGAL optimizer (maths: docs/frugal.md), a `torch.optim` drop-in.

AdamW on a subspace of density ρ of each weight matrix (state for those coordinates only),
state-free signSGD on the rest, so every update is full rank while the optimizer state is about ρ of
AdamW's. Its step is one call of the fused op `frugal_step_` per (device, dtype) of a param group:
every tensor of the group in one `at::parallel_for` (CPU) or one multi-tensor launch (CUDA), reading
p and g once and the moments only where they exist. The svd/random projections add matrix products
(BLAS/cuBLAS) per tensor and then one fused element-wise pass per tensor.

Not supported: CUDA graph capture of the step (the step counters and subspace bookkeeping are on
the host; a capture is refused with RuntimeError), sparse gradients, complex parameters, a tensor learning rate.
"""
from __future__ import annotations

from .base import FRUGALBase
from .reference import frugal_step_ as reference_step_
from .step import frugal_step_

__all__ = ["FRUGAL"]


class FRUGAL(FRUGALBase):
    """FRUGAL: memory-efficient optimization by gradient splitting (Zmushko et al., ICML 2025).

    FRUGAL(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, density=0.25,
           proj="columns", update_gap=200, reset_state=True, free_update="signsgd",
           free_lr_scale=1.0, seed=None, block_order="random", *, maximize=False, foreach=None,
           fused=None, amsgrad=False, capturable=False, differentiable=False)

    Each weight W (m×n; higher-dimensional ones are viewed as (size(0), rest)) is split into a
    state-full part, updated by AdamW with moments kept only there, and the residual, updated by
    signSGD ("signsgd"), SGD ("sgd") or not at all ("none") scaled by `free_lr_scale`. Weight decay is
    decoupled (AdamW's) and applies to all of W; its default 1e-2 is torch.optim.AdamW's, so that
    swapping AdamW for FRUGAL keeps the regularization (pass weight_decay=0 for none).

    torch.optim.AdamW's flags: maximize (FRUGAL on −g, as AdamW's); foreach / fused choose between
    our two steps: the compiled fused multi-tensor step (default, foreach=True or fused=True) and
    the pure-PyTorch step one tensor at a time (foreach=False or fused=False; `fusedtrain.reference`
    checks the compiled one against it). amsgrad, capturable and differentiable are refused when True.

    proj: "columns" / "rows": a random round(density·n) columns (rows), int32 indices, state m×ρn;
      "block": round(density·#tensors) whole tensors of the group are state-full, chosen in
      `block_order` ("random", or cycling "ascending"/"descending" like BAdam);
      "svd": top singular vectors of the gradient (GaLore), "random": a random semi-orthogonal basis,
      of the smaller side, rank round(density·min(m, n)); None: plain AdamW for the whole group
      (embeddings, output head). 1-D tensors (norms, biases) always get plain AdamW.
    update_gap: steps between subspace refreshes; reset_state: zero the moments (and restart bias
      correction) at a refresh, else keep them (GaLore's behaviour).
    seed: seeds the subspace draws (None: drawn from torch's global generator).
    Any of these can be overridden per param group, e.g. `{"params": head, "proj": None}`.
    density=1 with columns/rows/block is AdamW; density=0 is signSGD. `state_dict()` holds the
    subspaces, step counters and the generator, so a resumed run continues bit-identically.
    """

    _step_fn = staticmethod(frugal_step_)

    def _select_step(self, group: dict):
        if group.get("foreach") is False or group.get("fused") is False:
            return reference_step_
        return frugal_step_
