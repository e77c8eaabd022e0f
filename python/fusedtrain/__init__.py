"""fusedtrain: fused training ops for PyTorch (C++/CUDA kernels with pure-PyTorch fallbacks).

Layout and import rules: ARCHITECTURE.md; the maths of each family: docs/.
"""
from __future__ import annotations

from ._version import __version__
from . import spherical, linear_spherical, mining, sae, optim  # noqa: I001  (the CLI lists ops in this order)
from . import nn, reference
from .mining import batch_hard_mine, multi_similarity_loss, multi_similarity_mine, pair_margin_mine, tcm_loss
from .optim import frugal_step_
from .spherical import linear_spherical_loss, linear_spherical_stats, linear_topk, spherical_loss

__all__ = ["__version__", "spherical_loss", "linear_spherical_loss", "linear_spherical_stats", "linear_topk",
           "nn", "reference", "optim", "frugal_step_", "sae", "mining", "multi_similarity_loss",
           "multi_similarity_mine", "pair_margin_mine", "batch_hard_mine", "tcm_loss"]
