"""Statistics of the benchmark's reports. A leaf module: numbers in, numbers out, nothing of the
bench imported."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["mean", "std"]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (n-1); 0 for a single value."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
