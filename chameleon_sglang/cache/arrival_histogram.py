"""Predictive prefetch (paper §4.2, optional there): when will an adapter's next request come?

Per adapter, a histogram of the gaps between the arrivals of its requests, in the manner of the
hybrid histogram policy of Serverless in the Wild (Shahrad et al., ATC'20), which pre-warms a
function at the head of its idle-time distribution and keeps it alive to the tail. Here an
adapter is *due* while the time since its last arrival lies within ``[head - lead, tail]``, the
head and tail percentiles of its gaps: its next request is likely soon, so an idle cache slot is
better spent holding it. Gaps past the histogram's range are counted as out of bounds; an
adapter with few gaps, or mostly out-of-bounds ones, gets no prediction (too rare to tell).

Pure and deterministic: time comes only from the ``now`` arguments (the scheduler clock, the
same on every tensor-parallel rank), adapters are ordered by their number of gaps, then name.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np


@dataclasses.dataclass
class _Adapter:
    counts: np.ndarray
    last: float
    out_of_bounds: int = 0
    window: Optional[Tuple[float, float]] = None  # (head, tail) seconds after ``last``

    @property
    def num_gaps(self) -> int:
        return int(self.counts.sum()) + self.out_of_bounds


class ArrivalHistogram:
    """Gap histograms per adapter and the adapters due for a prefetch (module docstring)."""

    def __init__(
        self,
        bin_s: float = 0.5,
        range_s: float = 600.0,
        head: float = 0.05,
        tail: float = 0.99,
        min_gaps: int = 4,
        max_out_of_bounds: float = 0.5,
    ) -> None:
        if bin_s <= 0 or range_s <= bin_s:
            raise ValueError("need 0 < bin_s < range_s")
        if not 0 <= head < tail <= 1:
            raise ValueError("need 0 <= head < tail <= 1")
        self.bin_s = float(bin_s)
        self.num_bins = int(np.ceil(range_s / bin_s))
        self.head, self.tail = float(head), float(tail)
        self.min_gaps = int(min_gaps)
        self.max_out_of_bounds = float(max_out_of_bounds)
        self._adapters: Dict[str, _Adapter] = {}

    def observe(self, adapter_id: str, now: float) -> None:
        """A request for ``adapter_id`` arrived at ``now`` (non-decreasing per adapter)."""
        entry = self._adapters.get(adapter_id)
        if entry is None:
            self._adapters[adapter_id] = _Adapter(np.zeros(self.num_bins, np.int64), now)
            return
        gap = max(0.0, now - entry.last)
        entry.last = max(entry.last, now)
        index = int(gap // self.bin_s)
        if index >= self.num_bins:
            entry.out_of_bounds += 1
        else:
            entry.counts[index] += 1
        entry.window = self._window(entry)

    def window(self, adapter_id: str) -> Optional[Tuple[float, float]]:
        """(head, tail): seconds after the adapter's last arrival between which its next one is
        predicted; None without a prediction."""
        entry = self._adapters.get(adapter_id)
        return entry.window if entry is not None else None

    def due(self, now: float, lead_s: float = 0.0, skip: Iterable[str] = ()) -> List[str]:
        """Adapters (not in ``skip``) whose next arrival is predicted now: ``now - last`` within
        ``[head - lead_s, tail]``; most observed first."""
        excluded = set(skip)
        due = []
        for adapter_id, entry in self._adapters.items():
            if entry.window is None or adapter_id in excluded:
                continue
            idle = now - entry.last
            if entry.window[0] - lead_s <= idle <= entry.window[1]:
                due.append((-entry.num_gaps, adapter_id))
        return [adapter_id for _, adapter_id in sorted(due)]

    def forget(self, adapter_id: str) -> None:
        """The adapter was unloaded: its history no longer applies."""
        self._adapters.pop(adapter_id, None)

    def _window(self, entry: _Adapter) -> Optional[Tuple[float, float]]:
        in_bounds = int(entry.counts.sum())
        if (
            entry.num_gaps < self.min_gaps
            or entry.out_of_bounds > self.max_out_of_bounds * entry.num_gaps
            or in_bounds == 0
        ):
            return None
        cumulative = np.cumsum(entry.counts) / in_bounds
        head_bin = int(np.searchsorted(cumulative, self.head, side="left"))
        tail_bin = int(np.searchsorted(cumulative, self.tail, side="left"))
        return head_bin * self.bin_s, (tail_bin + 1) * self.bin_s
