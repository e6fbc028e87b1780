"""Weighted Request Size (paper §4.3): one number that orders requests by what they occupy.

``WRS = (w_in * in/max_in + w_out * pred_out/max_out) * rank/max_rank``, every ratio clamped to
[0, 1], so a WRS lies in ``[0, w_in + w_out]`` (``[0, 1]`` with the default weights 0.4 / 0.6).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SizeLimits:
    """The normalisers of the WRS terms.

    ``max_input`` is the context length, ``max_output`` the server's max new tokens, ``max_rank``
    ``--max-lora-rank`` and ``min_rank`` the smallest served rank, which base-model requests
    (no adapter) are given.
    """

    max_input: int
    max_output: int
    max_rank: int
    min_rank: int

    def __post_init__(self) -> None:
        if self.max_input < 1 or self.max_output < 1:
            raise ValueError("max_input and max_output must be >= 1")
        if not 1 <= self.min_rank <= self.max_rank:
            raise ValueError("ranks must satisfy 1 <= min_rank <= max_rank")

    def rank_of(self, rank: int | None) -> int:
        """The rank WRS uses: ``rank``, or ``min_rank`` for a base-model request (``None``)."""
        return self.min_rank if rank is None else rank


def compute_wrs(
    input_len: int,
    predicted_output: int,
    rank: int | None,
    limits: SizeLimits,
    *,
    input_weight: float = 0.4,
    output_weight: float = 0.6,
) -> float:
    """The WRS of one request; ``rank=None`` means the base model (rank ``limits.min_rank``)."""
    in_ratio = _clamp01(input_len / limits.max_input)
    out_ratio = _clamp01(predicted_output / limits.max_output)
    rank_ratio = _clamp01(limits.rank_of(rank) / limits.max_rank)
    return (input_weight * in_ratio + output_weight * out_ratio) * rank_ratio


def max_wrs(input_weight: float = 0.4, output_weight: float = 0.6) -> float:
    """The largest WRS these weights can give (every ratio at 1)."""
    return input_weight + output_weight


def _clamp01(x: float) -> float:
    return min(max(x, 0.0), 1.0)
