"""`SparseAutoencoder`: TopK / feature-choice / mutual-choice SAE with SAELens parameter names, FVU,
AuxK, dead-latent counters and EMA thresholds for threshold inference (maths: docs/sae.md)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .._core.checks import check_finite, check_float_tensor, check_int
from .checks import ROUTINGS, check_encoder, routing_param
from .codec import encode_with_cutoff, sparse_decode
from .types import SparseActs


class ForwardOutput(NamedTuple):
    sae_out: torch.Tensor          # (B, d) reconstruction
    latent_acts: SparseActs        # the kept latents
    fvu: torch.Tensor              # fraction of variance unexplained
    auxk_loss: torch.Tensor        # AuxK loss of the dead latents (0 when none are dead)
    loss: torch.Tensor             # fvu + auxk_alpha · auxk_loss
    num_dead: int                  # latents dead before this batch


def _require_keys(state_dict: dict, convention: str, *names_and_shapes: tuple[str, str]) -> None:
    """KeyError naming every missing key of a `convention` state dict, with the expected shapes."""
    missing = [name for name, _ in names_and_shapes if name not in state_dict]
    if missing:
        expected = ", ".join(f"{name} {shape}" for name, shape in names_and_shapes)
        raise KeyError(f"state_dict lacks {missing} ({convention} names: {expected})")


class SparseAutoencoder(nn.Module):
    """TopK / feature-choice / mutual-choice sparse autoencoder with SAELens parameter names.

    Parameters `W_enc (d, F)`, `b_enc (F,)`, `W_dec (F, d)`, `b_dec (d,)`. `W_enc` is stored as the
    transpose of an (F, d) matrix, so its backward rows are written whole (`load_state_dict` copies
    any layout in). Buffers: `num_tokens_since_fired (F,)` (dead-latent counters) and `threshold`
    (EMA of each feature's selection cutoff, for threshold inference of the batch-dependent
    routings; used in eval mode once trained, see `use_threshold`).

    routing: "topk" (each token keeps k latents), "feature_choice" (each latent keeps
    m = ceil(k·B/F) tokens, or the `m` given), "mutual_choice" (the k·B best entries of the batch).
    AuxK (Gao et al.): latents that fired on none of the last `dead_tokens_threshold` tokens are
    dead; the top `k_aux` (default d/2) of them reconstruct the detached residual, weight `auxk_alpha`.
    """

    def __init__(self, d_in: int, num_latents: int, routing: str = "topk", k: int = 32, *,
                 m: int | None = None, k_aux: int | None = None, auxk_alpha: float = 1 / 32,
                 dead_tokens_threshold: int = 10_000_000, threshold_decay: float = 0.99,
                 use_threshold: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        check_int(d_in, "d_in", 1)
        check_int(num_latents, "num_latents", 1)
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        check_int(k, "k", 1, num_latents if routing == "topk" else None)
        if m is not None:
            check_int(m, "m", 0)
        if k_aux is not None:
            check_int(k_aux, "k_aux", 0)
        if isinstance(dead_tokens_threshold, int):
            check_int(dead_tokens_threshold, "dead_tokens_threshold", 0)
        else:
            check_finite("dead_tokens_threshold", dead_tokens_threshold)
        auxk_alpha = check_finite("auxk_alpha", auxk_alpha)
        if not 0.0 <= check_finite("threshold_decay", threshold_decay) < 1.0:
            raise ValueError(f"threshold_decay must be in [0, 1), got {threshold_decay}")
        self.d_in, self.num_latents, self.routing, self.k, self.m = d_in, num_latents, routing, k, m
        self.k_aux = k_aux if k_aux is not None else d_in // 2
        self.auxk_alpha, self.dead_tokens_threshold = auxk_alpha, dead_tokens_threshold
        self.threshold_decay, self.use_threshold = threshold_decay, use_threshold
        kw = dict(device=device, dtype=dtype)
        enc = torch.empty(num_latents, d_in, **kw)
        nn.init.uniform_(enc, -1 / math.sqrt(d_in), 1 / math.sqrt(d_in))  # nn.Linear's default
        self.W_enc = nn.Parameter(enc.t())
        self.b_enc = nn.Parameter(torch.zeros(num_latents, **kw))
        self.W_dec = nn.Parameter(enc.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        self.set_decoder_norm_to_unit_norm()
        self.register_buffer("num_tokens_since_fired", torch.zeros(num_latents, dtype=torch.int64, device=device))
        self.register_buffer("threshold", torch.zeros(num_latents, dtype=torch.float32, device=device))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.int64, device=device))

    # -- loaders ------------------------------------------------------------------------------
    @classmethod
    def from_saelens_state_dict(cls, state_dict: dict, routing: str = "topk", k: int = 32, **kw):
        """From SAELens names: W_enc (d, F), W_dec (F, d), b_enc (F,), b_dec (d,)."""
        _require_keys(state_dict, "SAELens", ("W_enc", "(d, F)"), ("b_enc", "(F,)"), ("W_dec", "(F, d)"),
                      ("b_dec", "(d,)"))
        W_enc = state_dict["W_enc"]
        if not isinstance(W_enc, torch.Tensor) or W_enc.dim() != 2:
            raise ValueError(f"state_dict['W_enc'] must be a (d, F) tensor, got "
                             f"{tuple(W_enc.shape) if isinstance(W_enc, torch.Tensor) else type(W_enc).__name__}")
        d, F = W_enc.shape
        sae = cls(d, F, routing, k, device=W_enc.device, dtype=W_enc.dtype, **kw)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "num_tokens_since_fired", "threshold", "threshold_steps"):
                if name not in state_dict:
                    continue  # the buffers are optional
                target, value = getattr(sae, name), state_dict[name]
                if not isinstance(value, torch.Tensor) or value.shape != target.shape:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"state_dict[{name!r}] must have shape {tuple(target.shape)} (d = {d}, F = {F} "
                                     f"from W_enc), got {got}")
                target.copy_(value)
        return sae

    @classmethod
    def from_sparsify_state_dict(cls, state_dict: dict, routing: str = "topk", k: int = 32, **kw):
        """From sparsify's `SparseCoder` names: encoder.weight (F, d), encoder.bias (F,), W_dec (F, d), b_dec (d,)."""
        _require_keys(state_dict, "sparsify", ("encoder.weight", "(F, d)"), ("encoder.bias", "(F,)"),
                      ("W_dec", "(F, d)"), ("b_dec", "(d,)"))
        weight = state_dict["encoder.weight"]
        return cls.from_saelens_state_dict({"W_enc": weight.t(), "b_enc": state_dict["encoder.bias"],
                                            "W_dec": state_dict["W_dec"], "b_dec": state_dict["b_dec"]},
                                           routing, k, **kw)

    # -- decoder constraints ------------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(eps))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of W_dec.grad each row's component along its (unit) decoder direction."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    # -- encode / decode ------------------------------------------------------------------------
    def _uses_threshold(self) -> bool:
        return (not self.training and self.use_threshold and self.routing != "topk"
                and bool(self.threshold_steps > 0))

    def encode(self, x: torch.Tensor) -> SparseActs:
        """Sparse latents of x (B, d). In eval mode the batch-dependent routings switch to
        threshold routing with the learned EMA thresholds (when trained and `use_threshold`)."""
        return self._encode_with_cutoff(x)[0]

    def _encode_with_cutoff(self, x: torch.Tensor):
        check_float_tensor(x, "x", 2)
        if x.shape[1] != self.d_in:  # the weights are this module's: the input is what is wrong
            raise ValueError(f"x must have shape (B, d_in) = (B, {self.d_in}), got {tuple(x.shape)}")
        check_encoder(x, self.W_enc, self.b_enc, self.b_dec)
        if self._uses_threshold():
            return encode_with_cutoff(x, self.W_enc, self.b_enc, self.b_dec, "threshold", 0, self.threshold)[0], None
        param = routing_param(self.routing, self.k, self.m, None, x.shape[0], self.num_latents)
        return encode_with_cutoff(x, self.W_enc, self.b_enc, self.b_dec, self.routing, param)

    def decode(self, acts: SparseActs) -> torch.Tensor:
        return sparse_decode(acts, self.W_dec, self.b_dec, check_indices=False)

    @torch.no_grad()
    def _update_statistics(self, acts: SparseActs, cutoff: torch.Tensor | None, batch: int) -> None:
        fired = torch.bincount(acts.feature, minlength=self.num_latents) > 0
        self.num_tokens_since_fired.add_(batch).masked_fill_(fired, 0)
        if cutoff is None or self.routing == "topk" or cutoff.numel() == 0:
            return
        cut = cutoff.float().expand(self.num_latents)
        valid = torch.isfinite(cut)
        first = self.threshold_steps == 0
        w = torch.where(first, torch.ones((), device=cut.device), torch.full((), 1 - self.threshold_decay,
                                                                              device=cut.device))
        self.threshold.copy_(torch.where(valid, self.threshold + w * (cut - self.threshold), self.threshold))
        self.threshold_steps.add_(1)

    def _auxk_loss(self, x: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        num_dead = int(dead.sum())
        k_aux = min(self.k_aux, num_dead)
        if k_aux == 0:
            return x.new_zeros(())
        idx = dead.nonzero().squeeze(1)
        pre = (x - self.b_dec) @ self.W_enc[:, idx] + self.b_enc[idx]  # dead columns only
        values, top = pre.topk(k_aux, dim=1, sorted=False)
        recon = (values.relu().unsqueeze(2) * self.W_dec[idx][top]).sum(1)  # no b_dec
        target = residual.detach()
        total = (target - target.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
        return (recon - target).pow(2).sum() / total

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """Reconstruction, latents, FVU, AuxK loss (training only) and the dead-latent count.
        In training mode also updates the dead-latent counters and the EMA thresholds."""
        acts, cutoff = self._encode_with_cutoff(x)
        sae_out = self.decode(acts)
        residual = sae_out - x
        total_variance = (x - x.mean(0)).pow(2).sum()
        fvu = residual.pow(2).sum() / total_variance
        dead = self.num_tokens_since_fired > self.dead_tokens_threshold
        num_dead = int(dead.sum())
        auxk = self._auxk_loss(x, -residual, dead) if self.training and num_dead else x.new_zeros(())
        if self.training:
            self._update_statistics(acts, cutoff, x.shape[0])
        return ForwardOutput(sae_out, acts, fvu, auxk, fvu + self.auxk_alpha * auxk, num_dead)

    def extra_repr(self) -> str:
        m = f", m={self.m}" if self.m is not None else ""
        return f"d_in={self.d_in}, num_latents={self.num_latents}, routing={self.routing!r}, k={self.k}{m}"

    # -- persistence: sparsify's folder layout (sae/persistence.py, docs/integrations.md) ------------
    def save_to_disk(self, path) -> None:
        """Write `cfg.json` + `sae.safetensors` (sparsify's layout, which sparsify's
        `SparseCoder.load_from_disk` reads) and `fusedtrain_state.safetensors` (the buffers) to `path`."""
        from .persistence import save_sae
        save_sae(self, path)

    @classmethod
    def load_from_disk(cls, path, device=None, dtype=None) -> "SparseAutoencoder":
        """Read a folder written by `save_to_disk` or by sparsify's `SparseCoder.save_to_disk`."""
        from .persistence import load_sae
        return load_sae(cls, path, device=device, dtype=dtype)
