"""`SparseAutoencoder`: TopK / feature-choice / mutual-choice / threshold SAE with SAELens parameter
names, FVU, AuxK, dead-latent counters and EMA thresholds for threshold inference (maths: docs/sae.md)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .._core import autocast
from .._core.checks import check_finite, check_float_tensor, check_int
from .checks import ROUTINGS, check_encoder, check_theta, routing_param
from .codec import encode_with_cutoff, sparse_decode
from .types import SparseActs


MODULE_ROUTINGS = ROUTINGS + ("threshold",)


class ForwardOutput(NamedTuple):
    sae_out: torch.Tensor          # (..., d) reconstruction, the shape of x
    latent_acts: SparseActs        # the kept latents; row b is token b of x.reshape(-1, d)
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


class _Weights(NamedTuple):
    """The parameters one forward reads: the module's own, or their autocast casts."""
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor


class SparseAutoencoder(nn.Module):
    """TopK / feature-choice / mutual-choice / threshold sparse autoencoder with SAELens parameter names.

    Activations `x` have shape (..., d_in): a transformer's (B, T, d) residual stream is B·T tokens.
    `sae_out` has x's shape; `latent_acts` is CSR over the tokens of `x.reshape(-1, d_in)` (row
    b·T + t is token (b, t) of a (B, T, d) input), and the batch-dependent routings choose over all
    of them. Under torch.autocast the encoder and decoder run in the autocast dtype (as nn.Linear
    layers would: x and the parameters cast, bf16/fp16 kernels with fp32 accumulation, `sae_out`
    and the latents in that dtype) and the losses are float32 (docs/sae.md, "Mixed precision").

    Parameters `W_enc (d, F)`, `b_enc (F,)`, `W_dec (F, d)`, `b_dec (d,)`. `W_enc` is stored as the
    transpose of an (F, d) matrix, so its backward rows are written whole (`load_state_dict` copies
    any layout in). Buffers: `num_tokens_since_fired (F,)` (dead-latent counters) and `threshold`
    (EMA of each feature's selection cutoff, for threshold inference of the batch-dependent
    routings; used in eval mode once trained, see `use_threshold`).

    routing: "topk" (each token keeps k latents), "feature_choice" (each latent keeps
    m = ceil(k·B/F) tokens, or the `m` given), "mutual_choice" (the k·B best entries of the batch),
    "threshold" (each token keeps the latents with pre > theta_f, and > 0; `theta` is one value or
    one per latent (F,), stored in the `threshold` buffer and used in training and eval alike; k is
    unused).
    AuxK (Gao et al.): latents that fired on none of the last `dead_tokens_threshold` tokens are
    dead; the top `k_aux` (default d/2) of them reconstruct the detached residual, weight `auxk_alpha`.

    process_group (a torch.distributed group): the latents are split over its ranks, see
    `sae.sharded.LatentShardedSparseAutoencoder` (the object made); data_parallel_group: replicas
    that keep one set of dead-latent counters and thresholds.
    """

    # process_group / data_parallel_group (torch.distributed groups) make the latent-sharded module
    # of sae/sharded.py, which registers itself here (module.py cannot import it: it subclasses this).
    _latent_sharded_class = None

    def __new__(cls, *args, process_group=None, data_parallel_group=None, **kwargs):
        if cls is SparseAutoencoder and (process_group is not None or data_parallel_group is not None):
            cls = SparseAutoencoder._latent_sharded_class
        return super().__new__(cls)

    def __init__(self, d_in: int, num_latents: int, routing: str = "topk", k: int = 32, *,
                 m: int | None = None, k_aux: int | None = None, auxk_alpha: float = 1 / 32,
                 dead_tokens_threshold: int = 10_000_000, threshold_decay: float = 0.99,
                 use_threshold: bool = True, theta=None, device=None, dtype=None,
                 process_group=None, data_parallel_group=None) -> None:
        super().__init__()
        check_int(d_in, "d_in", 1)
        check_int(num_latents, "num_latents", 1)
        if routing not in MODULE_ROUTINGS:
            raise ValueError(f"routing must be one of {MODULE_ROUTINGS}, got {routing!r}")
        if (theta is None) == (routing == "threshold"):
            raise ValueError("theta (one threshold, or one per latent) must be given for routing='threshold' "
                             f"and only for it, got theta={theta!r} with routing={routing!r}")
        if theta is not None:  # checked as threshold_route checks it, kept in fp32 (the kernels compare in fp32)
            theta = check_theta(theta.to(device) if isinstance(theta, torch.Tensor) else theta,
                                torch.empty(0, num_latents, device=device))
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
        if theta is not None:
            with torch.no_grad():
                self.threshold.copy_(theta.expand(num_latents))

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
        if self.routing == "threshold":
            return True
        return (not self.training and self.use_threshold and self.routing != "topk"
                and bool(self.threshold_steps > 0))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_in) as its (B, d_in) tokens (a view when it can be)."""
        check_float_tensor(x, "x")
        if x.dim() < 1 or x.shape[-1] != self.d_in:  # the weights are this module's: the input is wrong
            raise ValueError(f"x must have shape (..., d_in) = (..., {self.d_in}), got {tuple(x.shape)}")
        return x.reshape(-1, self.d_in)

    def _weights(self, dtype: torch.dtype | None) -> _Weights:
        return _Weights(*(autocast.cast(t, dtype) for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec)))

    def encode(self, x: torch.Tensor) -> SparseActs:
        """Sparse latents of x (..., d): CSR over the tokens of x.reshape(-1, d). In eval mode the
        batch-dependent routings switch to threshold routing with the learned EMA thresholds (when
        trained and `use_threshold`)."""
        rows = self._rows(x)
        amp = autocast.policy_dtype(autocast.LOWER, rows.device)
        with autocast.suspended(rows.device):
            return self._encode_with_cutoff(autocast.cast(rows, amp), self._weights(amp))[0]

    def _encode_with_cutoff(self, x: torch.Tensor, w: _Weights | None = None):
        """(latents, routing cutoff) of the (B, d) tokens x, with the parameters w (default: own)."""
        w = self._weights(None) if w is None else w
        check_encoder(x, w.W_enc, w.b_enc, w.b_dec)
        if self._uses_threshold():
            return encode_with_cutoff(x, w.W_enc, w.b_enc, w.b_dec, "threshold", 0, self.threshold)[0], None
        param = routing_param(self.routing, self.k, self.m, None, x.shape[0], self.num_latents)
        return encode_with_cutoff(x, w.W_enc, w.b_enc, w.b_dec, self.routing, param)

    def decode(self, acts: SparseActs) -> torch.Tensor:
        """The (B, d) reconstruction of latents over B tokens (under autocast: in the autocast dtype)."""
        amp = autocast.policy_dtype(autocast.LOWER, self.W_dec.device)
        with autocast.suspended(self.W_dec.device):
            return self._decode(autocast.cast(acts, amp), self._weights(amp))

    @staticmethod
    def _decode(acts: SparseActs, w: _Weights) -> torch.Tensor:
        return sparse_decode(acts, w.W_dec, w.b_dec, check_indices=False)

    @torch.no_grad()
    def _update_statistics(self, acts: SparseActs, cutoff: torch.Tensor | None, batch: int) -> None:
        fired = torch.bincount(acts.feature, minlength=self.num_latents) > 0
        self.num_tokens_since_fired.add_(batch).masked_fill_(fired, 0)
        if cutoff is None or self.routing == "topk" or cutoff.numel() == 0:
            return
        cut = cutoff.float().expand(self.num_latents)
        self._threshold_ema(cut, torch.isfinite(cut))

    @torch.no_grad()
    def _threshold_ema(self, cut: torch.Tensor, valid: torch.Tensor) -> None:
        """One EMA step of the thresholds toward this batch's cutoffs where `valid` (the first step
        takes the cutoffs as they are)."""
        first = self.threshold_steps == 0
        w = torch.where(first, torch.ones((), device=cut.device), torch.full((), 1 - self.threshold_decay,
                                                                              device=cut.device))
        self.threshold.copy_(torch.where(valid, self.threshold + w * (cut - self.threshold), self.threshold))
        self.threshold_steps.add_(1)

    def _auxk_loss(self, x: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor,
                   w: _Weights | None = None) -> torch.Tensor:
        w = self._weights(None) if w is None else w
        num_dead = int(dead.sum())
        k_aux = min(self.k_aux, num_dead)
        if k_aux == 0:
            return residual.new_zeros(())
        idx = dead.nonzero().squeeze(1)
        pre = (x - w.b_dec) @ w.W_enc[:, idx] + w.b_enc[idx]  # dead columns only
        values, top = pre.topk(k_aux, dim=1, sorted=False)
        recon = (values.relu().unsqueeze(2) * w.W_dec[idx][top]).sum(1)  # no b_dec
        target = residual.detach()
        total = (target - target.mean(0)).pow(2).sum().clamp_min(torch.finfo(target.dtype).tiny)
        return (recon.to(target.dtype) - target).pow(2).sum() / total

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """Reconstruction (x's shape), latents, FVU, AuxK loss (training only) and the dead-latent
        count. In training mode also updates the dead-latent counters and the EMA thresholds."""
        rows = self._rows(x)
        amp = autocast.policy_dtype(autocast.LOWER, rows.device)
        with autocast.suspended(rows.device):
            out = self._forward(rows, self._weights(amp), amp)
        return out._replace(sae_out=out.sae_out.reshape(x.shape))

    def _forward(self, x: torch.Tensor, w: _Weights, amp: torch.dtype | None) -> ForwardOutput:
        """forward on the (B, d) tokens; `amp`: the autocast dtype the encoder and decoder run in
        (the losses are then float32 against the uncast x, as after nn.Linear layers under autocast)."""
        acts, cutoff = self._encode_with_cutoff(autocast.cast(x, amp), w)
        sae_out = self._decode(acts, w)
        if amp is not None:  # the losses in float32
            x = autocast.widen(x)
        residual = (autocast.widen(sae_out) if amp is not None else sae_out) - x
        total_variance = (x - x.mean(0)).pow(2).sum()
        fvu = residual.pow(2).sum() / total_variance
        dead = self.num_tokens_since_fired > self.dead_tokens_threshold
        num_dead = int(dead.sum())
        auxk = (self._auxk_loss(autocast.cast(x, amp), -residual, dead, w) if self.training and num_dead
                else residual.new_zeros(()))
        if self.training:
            self._update_statistics(acts, cutoff, x.shape[0])
        return ForwardOutput(sae_out, acts, fvu, auxk, fvu + self.auxk_alpha * auxk, num_dead)

    def extra_repr(self) -> str:
        m = f", m={self.m}" if self.m is not None else ""
        k = "" if self.routing == "threshold" else f", k={self.k}"
        return f"d_in={self.d_in}, num_latents={self.num_latents}, routing={self.routing!r}{k}{m}"

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
