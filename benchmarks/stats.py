"""
The arithmetic every figure goes through.

A ratio is a speed ratio, the median over rounds of (the other's seconds / ours) for the
same round, so above 1 means ours is faster; pairing by round cancels the drift of a shared
machine that medians taken separately would keep.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence


def paired(seconds: Mapping[str, Sequence[float]], faster: str, slower: str) -> list[float]:
    """How many times faster ``faster`` ran than ``slower``, in each round."""
    return [b / a for a, b in zip(seconds[faster], seconds[slower], strict=True)]


def speed(seconds: Mapping[str, Sequence[float]], faster: str, slower: str) -> float:
    """The median of the per-round ratios."""
    return statistics.median(paired(seconds, faster, slower))


def micros(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1e6


def minus(values: Sequence[float], others: Sequence[float]) -> list[float]:
    """Round by round, each value less the other of the same round."""
    return [value - other for value, other in zip(values, others, strict=True)]


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    first, _, third = statistics.quantiles(values, n=4)
    return first, third


def geometric_mean(ratios: Sequence[float]) -> float:
    return math.exp(sum(math.log(ratio) for ratio in ratios) / len(ratios))
