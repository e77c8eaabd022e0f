"""Names of the per-row statistics the mining ops return (mirrors `MsStat`, `TcmStat` and
`kStatCount` in csrc/mining/mining_math.h; `tests/test_architecture.py` checks the two agree)."""
from __future__ import annotations

import enum

STAT_COUNT = 6  # columns of the (rows, STAT_COUNT) statistics tensor, accumulate dtype


class MsStat(enum.IntEnum):
    """Multi-Similarity: the mining thresholds, log(1 + Σ exp) of each side, the mined pair counts."""
    MIN_POS = 0
    MAX_NEG = 1
    LSE_POS = 2
    LSE_NEG = 3
    NUM_POS = 4
    NUM_NEG = 5


class TcmStat(enum.IntEnum):
    """TCM: Σ(m⁺ − s) and count over positives with s <= m⁺; Σ(s − m⁻) and count over negatives s >= m⁻."""
    SUM_POS = 0
    NUM_POS = 1
    SUM_NEG = 2
    NUM_NEG = 3
