"""Pairwise similarity mining for metric learning, never holding the B×M similarity matrix
(maths: docs/mining.md).

Functional ops (`multi_similarity_loss`, `multi_similarity_mine`, `pair_margin_mine`, `batch_hard_mine`,
`tcm_loss`) and pytorch-metric-learning-compatible classes (`MultiSimilarityMiner`,
`MultiSimilarityLoss`, `BatchHardMiner`, `PairMarginMiner`, `ThresholdConsistentMarginLoss`,
`CrossBatchMemory`), with the distances they accept (`CosineSimilarity`, `LpDistance`; PML's own
objects work too); `DistributedLossWrapper` runs them over the batches of all ranks (docs/distributed.md).
"""
from . import registration  # noqa: F401  (attaches fake kernels and autograd to the compiled ops)
from .distributed import DistributedLossWrapper
from .ops import (batch_hard_mine, multi_similarity_loss, multi_similarity_loss_with_stats, multi_similarity_mine,
                  pair_margin_mine, tcm_loss)
from .distances import CosineSimilarity, LpDistance
from .pml import (BatchHardMiner, CrossBatchMemory, MinedPairs, MultiSimilarityLoss, MultiSimilarityMiner,
                  PairMarginMiner, ThresholdConsistentMarginLoss)

__all__ = ["multi_similarity_loss", "multi_similarity_mine", "pair_margin_mine", "batch_hard_mine", "tcm_loss",
           "MultiSimilarityMiner", "MinedPairs", "MultiSimilarityLoss", "BatchHardMiner", "PairMarginMiner",
           "ThresholdConsistentMarginLoss", "CrossBatchMemory", "CosineSimilarity", "LpDistance",
           "DistributedLossWrapper"]
