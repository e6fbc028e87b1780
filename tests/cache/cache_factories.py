"""Factories for the adapter-cache tests: hand-made entries, a cache over a fake slot store."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Iterable, Tuple

from chameleon_sglang.cache import AdapterCache, CacheEntry, FakeSlotStore, create_eviction_policy

BYTES_PER_SLOT = 10
WINDOW_S = 300.0


def make_entry(adapter_id: str, num_bytes: int = 100, last_use: float = 0.0,
               uses: Iterable[float] = (), rank: int = 8) -> CacheEntry:
    """An idle entry with the given uses (times) and last use."""
    entry = CacheEntry(adapter_id, num_bytes, rank, -(-num_bytes // BYTES_PER_SLOT),
                       handle=None, last_use=last_use)
    entry.use_times.extend(sorted(uses))
    return entry


def make_cache(total_slots: int = 100, policy: str = "chameleon",
               window_s: float = WINDOW_S) -> Tuple[AdapterCache, FakeSlotStore]:
    """A cache drawing from a fresh ``FakeSlotStore`` of ``total_slots`` slots."""
    store = FakeSlotStore(total_slots, BYTES_PER_SLOT)
    cache = AdapterCache(store, create_eviction_policy(policy, window_s=window_s), window_s)
    return cache, store


def load(cache: AdapterCache, adapter_id: str, num_slots: int, now: float,
         queued: AbstractSet[str] = frozenset(), num_uses: int = 1) -> CacheEntry:
    """Admit an adapter of ``num_slots`` slots and use it ``num_uses`` times, leaving it idle."""
    entry = cache.admit(adapter_id, num_slots * BYTES_PER_SLOT, 8, now, queued)
    for _ in range(num_uses):
        cache.acquire(adapter_id, now)
        cache.release(adapter_id, now)
    return entry
