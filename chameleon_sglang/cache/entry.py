"""One resident adapter: what the cache knows about it and the memory it holds."""

from __future__ import annotations

import collections
import dataclasses
from typing import Deque


@dataclasses.dataclass
class CacheEntry:
    """Metadata of one adapter held in device memory (paper §4.2).

    The cache owns and mutates entries; callers read them (``lookup``) and must not change them.
    Times are the caller's ``now`` values (seconds on any monotonic clock), assumed non-decreasing.
    """

    adapter_id: str
    num_bytes: int
    rank: int
    num_slots: int
    handle: object
    """What ``SlotStore.alloc`` returned; given back to ``SlotStore.free`` on removal."""
    last_use: float
    """Admission time, then the latest acquire or release."""
    use_times: Deque[float] = dataclasses.field(default_factory=collections.deque)
    """Acquire times not older than the cache's frequency window, oldest first."""
    refcount: int = 0
    """Running requests using this adapter; an entry with ``refcount > 0`` is never evicted."""
    is_dropping: bool = False
    """Unloaded while in use: freed at its last release, unusable by new requests until then."""

    @property
    def is_idle(self) -> bool:
        """True when no running request uses the adapter (it may be evicted)."""
        return self.refcount == 0

    def record_use(self, now: float, window_s: float) -> None:
        """Note one use at ``now`` and forget uses that fell out of the window."""
        self.last_use = now
        self.use_times.append(now)
        horizon = now - window_s
        while self.use_times and self.use_times[0] <= horizon:
            self.use_times.popleft()

    def frequency(self, now: float, window_s: float) -> int:
        """Uses in the sliding window ``(now - window_s, now]``."""
        horizon = now - window_s
        return sum(1 for t in self.use_times if horizon < t <= now)
