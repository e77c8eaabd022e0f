"""The mining family's autocast policy (docs/README.md, "Mixed precision"): inside torch.autocast,
float embeddings and reference embeddings are cast to float32, as torch casts cosine_similarity's,
before any check, so bf16 embeddings with an fp32 memory mix as they do in torch; the body runs with
autocast off (the reference's matmuls stay float32) and a loss comes back as float32.

Applied to the public functional ops (`ops.py`) and to the PML classes' Python paths (pair lists,
distance tiles); the raw `torch.ops.fusedtrain.*` mining ops carry the same policy as Autocast
kernels (`registration.py`)."""
from __future__ import annotations

from .._core import autocast

_CAST = ("embeddings", "ref_emb")
fp32_mining = autocast.policy(autocast.FP32, device="embeddings", cast_args=_CAST)
fp32_loss = autocast.policy(autocast.FP32, device="embeddings", cast_args=_CAST, loss=True)

__all__ = ["fp32_mining", "fp32_loss"]
