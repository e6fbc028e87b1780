"""Nearest-rank quantiles: exact, deterministic, and always one of the observed values."""

from __future__ import annotations

import math
from typing import Sequence, TypeVar

Number = TypeVar("Number", int, float)


def nearest_rank(values: Sequence[Number], q: float) -> Number:
    """The smallest observed value with at least a fraction ``q`` of ``values`` at or below it.

    ``values`` must be non-empty and ``0 <= q <= 1``; ``q = 0`` gives the minimum, ``q = 1`` the
    maximum. The rank is rounded to 9 decimals before ``ceil`` so that ``0.9 * 10`` counts as 9.
    """
    if not values:
        raise ValueError("nearest_rank of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    ordered = sorted(values)
    rank = math.ceil(round(q * len(ordered), 9))
    return ordered[max(rank, 1) - 1]
