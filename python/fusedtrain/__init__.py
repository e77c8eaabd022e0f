"""fusedtrain: fused training ops for PyTorch (C++/CUDA kernels with pure-PyTorch fallbacks)."""
from __future__ import annotations

from . import _backend
from ._version import __version__
from . import reference
from .spherical import spherical_loss
from .linear_spherical import linear_spherical_loss, linear_spherical_stats, linear_topk
from . import mining
from .mining import batch_hard_mine, multi_similarity_loss, multi_similarity_mine, pair_margin_mine, tcm_loss
from . import nn
from . import optim
from .optim import frugal_step_
from . import sae

__all__ = ["__version__", "spherical_loss", "linear_spherical_loss", "linear_spherical_stats", "linear_topk",
           "nn", "reference", "optim", "frugal_step_", "sae", "mining", "multi_similarity_loss",
           "multi_similarity_mine", "pair_margin_mine", "batch_hard_mine", "tcm_loss"]
