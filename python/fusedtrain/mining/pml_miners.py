"""pytorch-metric-learning-compatible miners: `MultiSimilarityMiner`, `PairMarginMiner`,
`BatchHardMiner` (maths and differences from PML: docs/mining.md).

Each takes PML's `distance=` (default: PML's default for that class — cosine for Multi-Similarity,
`LpDistance()` for pair-margin and batch-hard) and `collect_stats=`. Cosine similarity runs the
compiled kernels; `LpDistance` runs the tiled path (`distance_tiles`). After each call the miner
holds PML's statistics: `num_pos_pairs` / `num_neg_pairs` (pair miners) or `num_triplets`, and, with
collect_stats, PML's distance statistics of that miner.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._core import autocast
from .._core.checks import check_finite
from . import distance_tiles as _tiles
from . import ops as _ops
from .checks import operands
from .pml_common import (COSINE, LP, Recorder, fp32_mining, labels_to, no_extra_kwargs, reference_set,
                         resolve_distance)

_PAIR_COUNTS = ["num_pos_pairs", "num_neg_pairs", "num_triplets"]


# The Multi-Similarity miner's eager check of its (lazily mined) input, under the mining policy.
_fp32_operands = fp32_mining(operands)


class _Miner(Recorder, torch.nn.Module):
    def __init__(self, distance, default_spec, collect_stats, stat_names=()):
        torch.nn.Module.__init__(self)
        self.distance, self.spec = resolve_distance(distance, default_spec, type(self).__name__)
        self._init_stats(collect_stats, _PAIR_COUNTS + list(stat_names))

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        self.reset_stats()
        ref_emb, ref_labels = reference_set(embeddings, labels, ref_emb, ref_labels)
        labels = labels_to(labels, embeddings)
        out = self.mine(embeddings, labels, ref_emb, ref_labels)
        if not isinstance(out, MinedPairs):  # MinedPairs counts on demand (see MultiSimilarityMiner)
            if len(out) == 3:
                self.num_triplets = len(out[0])
            else:
                self.num_pos_pairs, self.num_neg_pairs = len(out[0]), len(out[2])
        return out

    def _tiles(self, embeddings, labels, ref_emb, ref_labels):
        return _tiles.Tiles(*operands(embeddings, labels, ref_emb, ref_labels), self.spec)


class MinedPairs(Sequence):
    """What `MultiSimilarityMiner` (cosine) returns: the `(a1, p, a2, n)` int64 tuple, mined on first access.

    It behaves as PML's tuple (len 4, indexing, slicing, unpacking). Handed unread to
    `MultiSimilarityLoss` with the same embeddings/labels/reference objects it was mined from — PML's
    usual `loss(emb, labels, miner(emb, labels))` — the loss runs the fused mining + loss op and the
    B·M-sized index lists are never built. Mining reads the embeddings' values at first access.
    """

    def __init__(self, miner, embeddings, labels, ref_emb, ref_labels):
        self.miner, self._source = miner, (embeddings, labels, ref_emb, ref_labels)
        # Mined inside autocast: read later (perhaps outside) as the fp32 policy reads it now.
        self._fp32 = autocast.policy_dtype(autocast.FP32, embeddings.device) is not None
        self._pairs = None
        self._counts = None  # (positives, negatives) as tensors, set by a fused loss that mined them

    def _get(self) -> tuple:
        if self._pairs is None:
            embeddings, labels, ref_emb, ref_labels = self._source
            if self._fp32:
                embeddings, ref_emb = autocast.cast(embeddings, torch.float32), autocast.cast(ref_emb, torch.float32)
            self._pairs = _ops.multi_similarity_mine(embeddings, labels, ref_emb, ref_labels,
                                                     epsilon=self.miner.epsilon)
        return self._pairs

    def counts(self) -> tuple[int, int]:
        """(mined positive pairs, mined negative pairs), from the fused loss's counts when it ran."""
        if self._pairs is None and self._counts is not None:
            return int(self._counts[0]), int(self._counts[1])
        pairs = self._get()
        return len(pairs[0]), len(pairs[2])

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index):
        return self._get()[index]

    def __iter__(self):
        return iter(self._get())

    def __repr__(self) -> str:
        return f"MinedPairs({'unread' if self._pairs is None else self._pairs})"

    def mined_from(self, embeddings, labels, ref_emb, ref_labels) -> bool:
        return all(a is b for a, b in zip(self._source, (embeddings, labels, ref_emb, ref_labels)))


class _Counts:
    """A pair count known without pair lists (CrossBatchMemory's fused call)."""

    def __init__(self, n_pos, n_neg):
        self._counts = (n_pos, n_neg)

    def counts(self):
        return int(self._counts[0]), int(self._counts[1])


class MultiSimilarityMiner(_Miner):
    """PML `MultiSimilarityMiner(epsilon, distance=CosineSimilarity())`: returns `(a1, p, a2, n)`
    (int64); with cosine as a lazy `MinedPairs`, with `LpDistance` as a tuple."""

    def __init__(self, epsilon: float = 0.1, distance=None, collect_stats=None, **kwargs):
        no_extra_kwargs("MultiSimilarityMiner", kwargs)
        super().__init__(distance, COSINE, collect_stats)
        self.epsilon = check_finite("epsilon", epsilon)
        self._last = None

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        if self.spec == COSINE:
            _fp32_operands(embeddings, labels, ref_emb, ref_labels)  # bad input fails here, not later
            self._last = MinedPairs(self, embeddings, labels, ref_emb, ref_labels)
            return self._last
        return self._mine_tiles(embeddings, labels, ref_emb, ref_labels)

    @fp32_mining
    def _mine_tiles(self, embeddings, labels, ref_emb, ref_labels):
        tiles = self._tiles(embeddings, labels, ref_emb, ref_labels)
        eps, inverted = self.epsilon, self.spec.is_inverted
        self._last = None
        return _tiles.mine_pairs(tiles, lambda b, e, mat, pos, neg: _tiles.ms_keep(mat, pos, neg, eps, inverted))

    def record_counts(self, n_pos, n_neg):
        """Counts of a mining done inside a fused call (CrossBatchMemory), read on demand."""
        self._last = _Counts(n_pos, n_neg)

    # PML sets these after each call; a lazy MinedPairs counts when they are read.
    @property
    def num_pos_pairs(self):
        return self._count(0)

    @num_pos_pairs.setter
    def num_pos_pairs(self, value):
        self._last = None
        self.__dict__["_num_pos"] = value

    @property
    def num_neg_pairs(self):
        return self._count(1)

    @num_neg_pairs.setter
    def num_neg_pairs(self, value):
        self._last = None
        self.__dict__["_num_neg"] = value

    def _count(self, i: int):
        if self.__dict__.get("_last") is not None:
            return self._last.counts()[i]
        key = ("_num_pos", "_num_neg")[i]
        if key not in self.__dict__:
            raise AttributeError(f"{('num_pos_pairs', 'num_neg_pairs')[i]}: the miner has not been called yet")
        return self.__dict__[key]


class PairMarginMiner(_Miner):
    """PML `PairMarginMiner(pos_margin, neg_margin, distance=LpDistance())`: positive pairs farther
    than pos_margin and negative pairs closer than neg_margin (with a similarity: less similar than
    pos_margin, more similar than neg_margin), strict. Returns `(a1, p, a2, n)`."""

    def __init__(self, pos_margin: float = 0.2, neg_margin: float = 0.8, distance=None, collect_stats=None,
                 **kwargs):
        no_extra_kwargs("PairMarginMiner", kwargs)
        super().__init__(distance, LP, collect_stats, ["pos_pair_dist", "neg_pair_dist"])
        self.pos_margin = check_finite("pos_margin", pos_margin)
        self.neg_margin = check_finite("neg_margin", neg_margin)

    @fp32_mining
    def mine(self, embeddings, labels, ref_emb, ref_labels):
        tiles = None
        if self.collect_stats:
            tiles = self._tiles(embeddings, labels, ref_emb, ref_labels)
            pos_sum, n_pos, neg_sum, n_neg = _tiles.all_pair_values(tiles)
            self.pos_pair_dist = pos_sum / n_pos if n_pos else 0
            self.neg_pair_dist = neg_sum / n_neg if n_neg else 0
        if self.spec == COSINE:
            return _ops.pair_margin_mine(embeddings, labels, ref_emb, ref_labels, pos_margin=self.pos_margin,
                                         neg_margin=self.neg_margin)
        tiles = tiles or self._tiles(embeddings, labels, ref_emb, ref_labels)
        pm, nm = self.pos_margin, self.neg_margin
        return _tiles.mine_pairs(tiles, lambda b, e, mat, pos, neg: (pos & (mat > pm), neg & (mat < nm)))


class BatchHardMiner(_Miner):
    """PML `BatchHardMiner(distance=LpDistance())`: per anchor the hardest positive and hardest
    negative; returns `(a, p, n)`."""

    _STATS = ["easiest_triplet", "hardest_triplet", "easiest_pos_pair", "hardest_pos_pair", "easiest_neg_pair",
              "hardest_neg_pair"]

    def __init__(self, distance=None, collect_stats=None, **kwargs):
        no_extra_kwargs("BatchHardMiner", kwargs)
        super().__init__(distance, LP, collect_stats, self._STATS)

    @fp32_mining
    def mine(self, embeddings, labels, ref_emb, ref_labels):
        if self.spec == COSINE and not self.collect_stats:
            return _ops.batch_hard_mine(embeddings, labels, ref_emb, ref_labels)
        a, p, n, pos_val, neg_val = _tiles.batch_hard(self._tiles(embeddings, labels, ref_emb, ref_labels))
        if self.collect_stats:
            self._set_stats(pos_val, neg_val)
        return a, p, n

    def _set_stats(self, pos, neg):
        """PML BatchEasyHardMiner.set_stats: easiest/hardest of the mined pairs and of pos − neg."""
        hardest = torch.min if self.spec.is_inverted else torch.max  # hardest positive, easiest negative
        easiest = torch.max if self.spec.is_inverted else torch.min
        if len(pos) and len(neg):
            self.easiest_triplet, self.hardest_triplet = easiest(pos - neg).item(), hardest(pos - neg).item()
        if len(pos):
            self.easiest_pos_pair, self.hardest_pos_pair = easiest(pos).item(), hardest(pos).item()
        if len(neg):
            self.easiest_neg_pair, self.hardest_neg_pair = hardest(neg).item(), easiest(neg).item()
