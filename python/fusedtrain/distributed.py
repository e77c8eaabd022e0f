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
from .mining import DistributedLossWrapper  # noqa: E402

__all__ += ["DistributedLossWrapper"]

# --- sae (latent sharding) ---
from .sae import LatentShardedSparseAutoencoder  # noqa: E402  (made by SparseAutoencoder(..., process_group=g))

__all__ += ["LatentShardedSparseAutoencoder"]

# --- optim (FRUGAL seeds and FSDP2) ---
from .optim.distributed import shared_seed  # noqa: E402

__all__ += ["shared_seed"]
