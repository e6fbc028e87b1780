"""The scheduler policy's clock: one value for all tensor-parallel ranks.

SGLang runs a scheduler per rank on the same broadcast inputs, and every rank must take the same
decisions; a local wall clock read on each rank would differ. The clock is read once per prefill
pass (every rank runs the passes in lockstep): tensor-parallel rank 0's monotonic time, broadcast
over the CPU group when there is more than one rank
(:func:`chameleon_sglang.integration.tp_broadcast.tensor_parallel_broadcast`), in seconds since the
scheduler started, rounded to the millisecond.
"""

from __future__ import annotations

import time
from typing import Callable, Optional


class SchedulerClock:
    """``now()`` must be called by every rank at the same point of the event loop."""

    def __init__(
        self,
        broadcast: Optional[Callable[[float], float]] = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self._start = monotonic()
        self._broadcast = broadcast
        self._last = 0.0

    def now(self) -> float:
        local = round(self._monotonic() - self._start, 3)
        value = self._broadcast(local) if self._broadcast is not None else local
        self._last = max(self._last, value)
        return self._last

    @property
    def last(self) -> float:
        """The value of the latest ``now()`` (0 before the first)."""
        return self._last
