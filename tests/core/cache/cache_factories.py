"""Factories for the adapter-cache tests: hand-made entries, a cache over a fake slot store."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Dict, Iterable, Optional, Sequence, Set, Tuple

from chameleon_sglang.cache import AdapterCache, CacheEntry, create_eviction_policy

BYTES_PER_SLOT = 10
WINDOW_S = 300.0


class FakeSlotStore:
    """A strict in-memory ``SlotStore`` for tests: counts slots, checks every handle.

    Handles are increasing integers never reused, so a double free or a foreign handle raises
    ``ValueError``. Tests may also ``alloc`` directly to play the KV cache.
    """

    def __init__(self, total_slots: int, bytes_per_slot: int) -> None:
        if total_slots < 0 or bytes_per_slot <= 0:
            raise ValueError("total_slots must be >= 0 and bytes_per_slot > 0")
        self.total_slots = total_slots
        self.bytes_per_slot = bytes_per_slot
        self._allocations: Dict[int, int] = {}
        self._freed: Set[int] = set()
        self._next_handle = 1

    @property
    def num_allocated_slots(self) -> int:
        """Slots held by live allocations."""
        return sum(self._allocations.values())

    def allocations(self) -> Dict[int, int]:
        """Live handles and their slot counts (a copy)."""
        return dict(self._allocations)

    def num_free_slots(self) -> int:
        return self.total_slots - self.num_allocated_slots

    def slots_for_bytes(self, num_bytes: int) -> int:
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        return -(-num_bytes // self.bytes_per_slot)

    def slots_held(self, handle: object) -> int:
        if not isinstance(handle, int) or handle not in self._allocations:
            raise ValueError(f"unknown slot handle {handle!r}")
        return self._allocations[handle]

    def alloc(self, num_slots: int, pieces: Sequence[int] = ()) -> Optional[int]:
        """Never fragments: always ``num_slots`` in one piece (``pieces`` are not needed)."""
        if num_slots <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        if num_slots > self.num_free_slots():
            return None
        handle = self._next_handle
        self._next_handle += 1
        self._allocations[handle] = num_slots
        return handle

    def free(self, handle: object) -> None:
        if isinstance(handle, int) and handle in self._freed:
            raise ValueError(f"double free of slot handle {handle!r}")
        if not isinstance(handle, int) or handle not in self._allocations:
            raise ValueError(f"unknown slot handle {handle!r}")
        del self._allocations[handle]
        self._freed.add(handle)


def make_entry(
    adapter_id: str,
    num_bytes: int = 100,
    last_use: float = 0.0,
    uses: Iterable[float] = (),
    rank: int = 8,
) -> CacheEntry:
    """An idle entry with the given uses (times) and last use."""
    entry = CacheEntry(
        adapter_id, num_bytes, rank, -(-num_bytes // BYTES_PER_SLOT), handle=None, last_use=last_use
    )
    entry.use_times.extend(sorted(uses))
    return entry


def make_cache(
    total_slots: int = 100, policy: str = "chameleon", window_s: float = WINDOW_S
) -> Tuple[AdapterCache, FakeSlotStore]:
    """A cache drawing from a fresh ``FakeSlotStore`` of ``total_slots`` slots."""
    store = FakeSlotStore(total_slots, BYTES_PER_SLOT)
    cache = AdapterCache(store, create_eviction_policy(policy, window_s=window_s), window_s)
    return cache, store


def load(
    cache: AdapterCache,
    adapter_id: str,
    num_slots: int,
    now: float,
    queued: AbstractSet[str] = frozenset(),
    num_uses: int = 1,
) -> CacheEntry:
    """Admit an adapter of ``num_slots`` slots and use it ``num_uses`` times, leaving it idle."""
    entry = cache.admit(adapter_id, num_slots * BYTES_PER_SLOT, 8, now, queued)
    for _ in range(num_uses):
        cache.acquire(adapter_id, now)
        cache.release(adapter_id, now)
    return entry
