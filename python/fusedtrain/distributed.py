"""fusedtrain on torch.distributed: the public entry points of every family's distributed path.

The implementations live in the families (`spherical`, `mining`, `sae`, `optim`); this module only
gathers their public names. The maths and the communication per step: docs/distributed.md.
"""
from __future__ import annotations

__all__: list = []

# --- spherical (vocab-parallel fused linear loss) ---
from .spherical.vocab_parallel import (VocabParallelStats, vocab_parallel_linear_spherical_loss,  # noqa: E402
                                       vocab_parallel_linear_spherical_stats)

__all__ += ["VocabParallelStats", "vocab_parallel_linear_spherical_loss", "vocab_parallel_linear_spherical_stats"]

# --- mining (DistributedLossWrapper) ---

# --- sae (latent sharding) ---

# --- optim (FRUGAL seeds and FSDP2) ---
