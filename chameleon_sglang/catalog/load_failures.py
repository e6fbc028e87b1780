"""Adapters whose load failed recently: retried on a later request, with backoff, never in a hot
loop. Contract: after the n-th failure in a row of one name, :meth:`LoadFailures.refusal` refuses
that name for ``min(base_s * 2**(n-1), max_s)`` seconds (naming the last error); a success
clears it. At most ``capacity`` names are remembered (the oldest failure is forgotten first), so
a burst of distinct bad names costs bounded memory.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional


@dataclasses.dataclass
class _Failure:
    count: int
    until: float
    reason: str


class LoadFailures:
    """Recent load failures by adapter name, with exponential backoff."""

    def __init__(self, base_s: float = 1.0, max_s: float = 60.0, capacity: int = 10_000) -> None:
        if base_s <= 0 or max_s < base_s or capacity < 1:
            raise ValueError("need 0 < base_s <= max_s and capacity >= 1")
        self.base_s = float(base_s)
        self.max_s = float(max_s)
        self.capacity = int(capacity)
        self._failures: collections.OrderedDict[str, _Failure] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def refusal(self, name: str, now: float) -> Optional[str]:
        """Why ``name`` is not to be loaded now, or None (never failed, or its backoff ended)."""
        failure = self._failures.get(name)
        if failure is None or now >= failure.until:
            return None
        return (
            f"its last load failed ({failure.reason}); retried in {failure.until - now:.1f} s "
            f"(failure {failure.count} in a row)"
        )

    def record(self, name: str, reason: str, now: float) -> None:
        """A load of ``name`` failed at ``now`` with ``reason``."""
        previous = self._failures.pop(name, None)
        count = 1 if previous is None else previous.count + 1
        backoff = min(self.base_s * 2 ** (count - 1), self.max_s)
        self._failures[name] = _Failure(count, now + backoff, reason)
        while len(self._failures) > self.capacity:
            self._failures.popitem(last=False)

    def clear(self, name: str) -> None:
        """A load of ``name`` succeeded (or it was unloaded): no backoff."""
        self._failures.pop(name, None)
