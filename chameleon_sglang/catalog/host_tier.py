"""The host tier: adapters whose weights sit in host memory, bounded in bytes.

The tier keeps what it needs to choose victims (bytes, pinning, use history) and counts hits and
misses; it never unloads anything itself. Contract of :meth:`HostTier.victims`: names to drop,
first-to-go first, until the tier fits its budget, chosen by the device cache's eviction policy
(Chameleon's score: frequency, recency, size) among adapters that are neither pinned nor in use;
if those do not free enough, it returns what they free (a tier over budget stays over budget
rather than drop an adapter a request holds). :meth:`HostTier.victims_by_count` chooses the same
way for a count bound.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

from chameleon_sglang.cache.entry import CacheEntry
from chameleon_sglang.cache.eviction import EvictionPolicy


class HostTier:
    """Adapters in host memory, by name, with a byte budget."""

    def __init__(self, budget_bytes: int, policy: EvictionPolicy, window_s: float) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"the host budget must be > 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._policy = policy
        self._window_s = float(window_s)
        self._entries: Dict[str, CacheEntry] = {}
        self._pinned: Dict[str, bool] = {}
        self._used_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.evicted_bytes = 0

    # -- what the tier holds ---------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> List[str]:
        """The adapters in the tier."""
        return list(self._entries)

    @property
    def used_bytes(self) -> int:
        """Bytes of every adapter in the tier."""
        return self._used_bytes

    def admit(self, name: str, num_bytes: int, pinned: bool, now: float) -> None:
        """``name`` is in host memory now (loaded; ``num_bytes`` of weights)."""
        self.remove(name)
        entry = CacheEntry(name, max(0, int(num_bytes)), 0, 0, None, last_use=now)
        entry.record_use(now, self._window_s)
        self._entries[name] = entry
        self._used_bytes += entry.num_bytes
        self._pinned[name] = bool(pinned)
        self._policy.on_admit(entry, now)

    def remove(self, name: str, is_eviction: bool = False) -> None:
        """``name`` left host memory (unloaded or evicted); unknown names are ignored."""
        entry = self._entries.pop(name, None)
        self._pinned.pop(name, None)
        if entry is None:
            return
        self._used_bytes -= entry.num_bytes
        if is_eviction:
            self.evictions += 1
            self.evicted_bytes += entry.num_bytes
        self._policy.on_remove(entry, is_eviction)

    # -- requests --------------------------------------------------------------------------------
    def on_request(self, names: Iterable[str], now: float) -> None:
        """A request names these adapters: a hit for each in the tier (its use recorded), a
        miss for each not (it will be read from disk)."""
        for name in names:
            entry = self._entries.get(name)
            if entry is None:
                self.misses += 1
                continue
            self.hits += 1
            entry.record_use(now, self._window_s)
            self._policy.on_use(entry, now)

    def victims(self, in_use: Callable[[str], bool], now: float) -> List[str]:
        """Names to drop, first-to-go first, until the tier fits its budget (module docstring)."""
        excess = self.used_bytes - self.budget_bytes
        if excess <= 0:
            return []
        chosen: List[str] = []
        for entry in self._order(in_use, now):
            if excess <= 0:
                break
            chosen.append(entry.adapter_id)
            excess -= entry.num_bytes
        return chosen

    def victims_by_count(self, count: int, in_use: Callable[[str], bool], now: float) -> List[str]:
        """The first ``count`` names to go (fewer where fewer are neither pinned nor in use):
        room for a count bound such as ``--max-loaded-loras``, chosen as :meth:`victims`."""
        return [entry.adapter_id for entry in self._order(in_use, now)[: max(count, 0)]]

    def _order(self, in_use: Callable[[str], bool], now: float) -> List[CacheEntry]:
        """Adapters neither pinned nor in use, first-to-go first."""
        candidates = [
            e for name, e in self._entries.items() if not self._pinned[name] and not in_use(name)
        ]
        return list(self._policy.order(candidates, now))

    def stats(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Counts and bytes of the tier (``extra`` merged in)."""
        lookups = self.hits + self.misses
        result: Dict[str, Any] = {
            "budget_bytes": self.budget_bytes,
            "used_bytes": self.used_bytes,
            "adapters": len(self),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / lookups, 4) if lookups else None,
            "evictions": self.evictions,
            "evicted_bytes": self.evicted_bytes,
        }
        result.update(extra or {})
        return result
