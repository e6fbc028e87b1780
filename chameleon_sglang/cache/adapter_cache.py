"""Chameleon's adapter cache (paper §4.2): elastic, in memory borrowed from a ``SlotStore``.

The cache has no capacity of its own. It keeps an adapter resident after its last request ends
and gives memory back when an admission or the KV cache needs it, evicting in tiers:
(1) never an adapter with refcount > 0; (2) first idle adapters no queued request uses, in the
policy's order; (3) idle adapters of queued requests, only when memory forces it.

Check-then-act, exact: ``can_admit`` is True exactly when ``admit`` succeeds, also over a store that
needs contiguous runs (the victims are planned against the store's own placement of the adapter, in
one run or in its ``pieces``, before any is evicted: an admission that cannot succeed evicts
nothing), and ``reclaimable_slots`` before ``evict_for``; the acts raise ``CacheFullError``
(changing nothing) when the check said no. :attr:`AdapterCache.version` changes whenever an answer
of ``can_admit`` may have changed (entries loaded, removed, becoming idle or busy), apart from the
store's own free slots. Time comes only from the ``now`` arguments (non-decreasing); nothing is
random, and every decision iterates adapter ids in sorted order.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Dict, Iterable, Iterator, List, Literal, Optional, Sequence, Tuple

from chameleon_sglang.cache.entry import CacheEntry
from chameleon_sglang.cache.eviction import EvictionPolicy, create_eviction_policy
from chameleon_sglang.cache.store import SlotStore
from chameleon_sglang.config import ChameleonConfig

EvictionReason = Literal["make_room", "kv_pressure", "unload"]
EvictionTier = Literal["unused", "queued"]
EVICTION_REASONS: Tuple[EvictionReason, ...] = ("make_room", "kv_pressure", "unload")
EVICTION_TIERS: Tuple[EvictionTier, ...] = ("unused", "queued")
_NO_QUEUE: AbstractSet[str] = frozenset()


class CacheFullError(RuntimeError):
    """An admission or eviction asked for more memory than idle entries and the store hold."""


class AdapterCache:
    """Adapters resident in device memory, their reference counts and eviction.

    ``queued`` arguments name the adapters of requests waiting in the scheduler's queues; they
    only decide the eviction tier. ``lookup`` returns the live entry: read it, do not change it.
    """

    def __init__(self, store: SlotStore, policy: EvictionPolicy, window_s: float = 300.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self._store = store
        self._policy = policy
        self._window_s = float(window_s)
        self._entries: Dict[str, CacheEntry] = {}
        self._num_slots_held = 0
        self._num_in_use = 0
        self._max_in_use = 0
        self._hits = 0
        self._misses = 0
        self._prefetch_loads = 0
        self._bytes_loaded = 0
        self._evictions_by_tier: Dict[str, int] = {t: 0 for t in EVICTION_TIERS}
        self._evictions_by_reason: Dict[str, int] = {r: 0 for r in EVICTION_REASONS}
        self._refused_for_fragmentation = 0
        self._version = 0

    @classmethod
    def from_config(cls, store: SlotStore, config: ChameleonConfig) -> AdapterCache:
        """A cache with the configured eviction policy, score weights and frequency window."""
        policy = create_eviction_policy(
            config.eviction_policy, config.score_weights, config.frequency_window_s
        )
        return cls(store, policy, config.frequency_window_s)

    # Queries

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    @property
    def version(self) -> int:
        """Changes whenever entries are loaded or removed or turn idle or busy."""
        return self._version

    @property
    def num_resident(self) -> int:
        """Entries holding memory (including those waiting to be dropped)."""
        return len(self._entries)

    @property
    def num_slots_held(self) -> int:
        """Store slots held by the cache: the sum of its entries' ``num_slots``."""
        return self._num_slots_held

    def resident_ids(self) -> List[str]:
        """Ids of all entries holding memory, sorted."""
        return sorted(self._entries)

    def lookup(self, adapter_id: str) -> Optional[CacheEntry]:
        """The entry holding ``adapter_id``'s memory, or None (also returns dropping entries)."""
        return self._entries.get(adapter_id)

    def is_resident(self, adapter_id: str) -> bool:
        """True when the adapter is in memory and usable by new requests (not being dropped)."""
        entry = self._entries.get(adapter_id)
        return entry is not None and not entry.is_dropping

    def reclaimable_slots(self, queued: Optional[AbstractSet[str]] = None) -> int:
        """Slots that evicting idle entries can free.

        With ``queued`` None: every idle entry (tiers 2 and 3), which is what KV admission
        budgets may count as available, like a radix cache's evictable tokens. With ``queued``
        given: only idle entries whose adapter is not in it (tier 2).
        """
        return self._evictable_slots(queued or _NO_QUEUE, allow_queued=queued is None)

    def prefetch_candidates(self, queued_adapter_ids: Iterable[Optional[str]]) -> List[str]:
        """Adapters of queued requests that hold no memory, in queue order, without repeats.

        None (a base-model request) is skipped; so are adapters being dropped.
        """
        seen: set[str] = set()
        result: List[str] = []
        for adapter_id in queued_adapter_ids:
            if adapter_id is None or adapter_id in seen or adapter_id in self._entries:
                continue
            seen.add(adapter_id)
            result.append(adapter_id)
        return result

    # Admission

    def can_admit(
        self,
        adapter_id: str,
        num_bytes: int,
        now: float,
        queued: AbstractSet[str] = _NO_QUEUE,
        *,
        prefetch: bool = False,
        pieces: Sequence[int] = (),
    ) -> bool:
        """True when ``admit`` with the same arguments would succeed.

        That is: the adapter is resident, or the store has room for it, or evicting idle entries
        can make room. A prefetch (``prefetch=True``) may evict tier-2 entries only: nothing
        forces it to take a queued request's adapter. False for an adapter being dropped.
        ``pieces``: slot counts of separate runs the store may hold the adapter in instead of
        one run (its split layout), where free memory is fragmented.
        ``now`` does not change the answer; it is taken so that check and act share arguments.
        Raises ``ValueError`` when the adapter is resident with another size.
        """
        entry = self._entries.get(adapter_id)
        if entry is not None:
            _check_size(entry, num_bytes)
            return not entry.is_dropping
        num_slots = self._slots_for(num_bytes)
        return (
            self._plan(num_slots, tuple(pieces), now, queued, allow_queued=not prefetch) is not None
        )

    def admit(
        self,
        adapter_id: str,
        num_bytes: int,
        rank: int,
        now: float,
        queued: AbstractSet[str] = _NO_QUEUE,
        *,
        prefetch: bool = False,
        pieces: Sequence[int] = (),
    ) -> CacheEntry:
        """Make ``adapter_id`` resident and return its entry (refcount unchanged: ``acquire`` next).

        Already resident: a hit (not counted for a prefetch), nothing else changes. Otherwise a miss
        (or a prefetch load): evicts the planned victims (reason "make_room"), allocates (one run,
        or ``pieces``: the entry's ``num_slots`` is what the store holds) and counts ``num_bytes``
        as loaded; the caller then copies the weights into the handle's memory. Raises
        ``CacheFullError`` when ``can_admit`` is False, changing nothing (no eviction);
        ``ValueError`` when the adapter is being dropped or is resident with another size.
        """
        entry = self._entries.get(adapter_id)
        if entry is not None:
            return self._hit(entry, num_bytes, prefetch)
        num_slots = self._slots_for(num_bytes)
        plan = self._plan(num_slots, tuple(pieces), now, queued, allow_queued=not prefetch)
        if plan is None:
            raise CacheFullError(
                f"no room for adapter {adapter_id!r} ({num_slots} slots): "
                f"{self._store.num_free_slots()} free, idle adapters cannot make room for it"
            )
        for victim, tier in plan:
            self._remove(victim, "make_room", tier)
        handle = self._store.alloc(num_slots, tuple(pieces))
        if handle is None:  # the plan said it fits: a store breaking its contract
            raise RuntimeError(
                f"the slot store refused {num_slots} slots after a plan that "
                f"fits (adapter {adapter_id!r})"
            )
        return self._insert(
            adapter_id, num_bytes, rank, self._store.slots_held(handle), handle, now, prefetch
        )

    # References

    def acquire(self, adapter_id: str, now: float) -> CacheEntry:
        """A running request starts using the adapter: refcount + 1, one use recorded at ``now``.

        Raises ``KeyError`` if the adapter is not resident, ``ValueError`` if it is being dropped.
        """
        entry = self._entries[adapter_id]
        if entry.is_dropping:
            raise ValueError(f"adapter {adapter_id!r} is being unloaded; it cannot be acquired")
        if entry.refcount == 0:
            self._num_in_use += 1
            self._max_in_use = max(self._max_in_use, self._num_in_use)
            self._version += 1
        entry.refcount += 1
        entry.record_use(now, self._window_s)
        self._policy.on_use(entry, now)
        return entry

    def release(self, adapter_id: str, now: float) -> None:
        """A running request stops using the adapter: refcount - 1, ``last_use = now``.

        The adapter stays resident when idle, unless it was dropped while in use: then its
        memory is freed now. Raises ``KeyError`` if not resident, ``ValueError`` below zero.
        """
        entry = self._entries[adapter_id]
        if entry.refcount <= 0:
            raise ValueError(f"release of adapter {adapter_id!r} with refcount 0")
        entry.refcount -= 1
        entry.last_use = max(entry.last_use, now)
        if entry.refcount == 0:
            self._num_in_use -= 1
            self._version += 1
            if entry.is_dropping:
                self._remove(entry, "unload", None)

    # Memory

    def evict_for(
        self, num_slots: int, now: float, queued: AbstractSet[str] = _NO_QUEUE
    ) -> List[str]:
        """Evict idle entries, tier by tier, until at least ``num_slots`` slots are freed.

        All or nothing: raises ``CacheFullError`` without evicting when idle entries hold fewer
        than ``num_slots`` (check ``reclaimable_slots()`` first). Returns evicted ids in order.
        """
        return self._evict(num_slots, now, queued, "make_room", allow_queued=True)

    def shrink_to_free(
        self, num_slots: int, now: float, queued: AbstractSet[str] = _NO_QUEUE
    ) -> int:
        """Evict idle entries until the store has ``num_slots`` free; returns slots freed.

        For the KV allocator before an allocation would fail (reason "kv_pressure"). Stops as
        soon as enough is free; best effort: when idle entries cannot cover it, all are evicted.
        Never touches an entry in use.
        """
        deficit = num_slots - self._store.num_free_slots()
        if deficit <= 0:
            return 0
        _, freed = self._evict_up_to(deficit, now, queued, "kv_pressure", allow_queued=True)
        return freed

    def drop(self, adapter_id: str) -> bool:
        """Unload: free the adapter's memory now if idle, else at its last release.

        Returns True when memory was freed now; False when deferred or not resident. An adapter
        dropped while in use is never freed under a running request.
        """
        entry = self._entries.get(adapter_id)
        if entry is None or entry.is_dropping:
            return False
        if entry.refcount > 0:
            entry.is_dropping = True
            self._version += 1
            return False
        self._remove(entry, "unload", None)
        return True

    # Statistics

    def stats(self) -> Dict[str, object]:
        """Counters and occupancy, JSON-able.

        ``evictions_by_tier`` counts policy evictions ("make_room", "kv_pressure") by tier
        ("unused": no running or queued request uses it; "queued"); ``evictions_by_reason``
        counts every removal, unloads included.
        """
        lookups = self._hits + self._misses
        return {
            "hits": self._hits,
            "misses": self._misses,
            "hit_rate": self._hits / lookups if lookups else 0.0,
            "prefetch_loads": self._prefetch_loads,
            "bytes_loaded": self._bytes_loaded,
            "evictions": sum(self._evictions_by_reason.values()),
            "evictions_by_tier": dict(self._evictions_by_tier),
            "evictions_by_reason": dict(self._evictions_by_reason),
            "num_resident": len(self._entries),
            "resident_bytes": sum(e.num_bytes for e in self._entries.values()),
            "resident_slots": self._num_slots_held,
            "num_in_use": self._num_in_use,
            "max_distinct_in_use": self._max_in_use,
            "refused_for_fragmentation": self._refused_for_fragmentation,
        }

    # Internals

    def _slots_for(self, num_bytes: int) -> int:
        if num_bytes <= 0:
            raise ValueError(f"an adapter must have num_bytes > 0, got {num_bytes}")
        return self._store.slots_for_bytes(num_bytes)

    def _hit(self, entry: CacheEntry, num_bytes: int, prefetch: bool) -> CacheEntry:
        if entry.is_dropping:
            raise ValueError(
                f"adapter {entry.adapter_id!r} is being unloaded; admit it after its last release"
            )
        _check_size(entry, num_bytes)
        if not prefetch:
            self._hits += 1
        return entry

    def _insert(
        self,
        adapter_id: str,
        num_bytes: int,
        rank: int,
        num_slots: int,
        handle: object,
        now: float,
        prefetch: bool,
    ) -> CacheEntry:
        entry = CacheEntry(adapter_id, num_bytes, rank, num_slots, handle, last_use=now)
        self._entries[adapter_id] = entry
        self._num_slots_held += num_slots
        self._version += 1
        self._bytes_loaded += num_bytes
        if prefetch:
            self._prefetch_loads += 1
        else:
            self._misses += 1
        self._policy.on_admit(entry, now)
        return entry

    def _evictable_slots(self, queued: AbstractSet[str], allow_queued: bool) -> int:
        return sum(
            e.num_slots
            for e in self._entries.values()
            if e.is_idle and (allow_queued or e.adapter_id not in queued)
        )

    def _evict(
        self,
        num_slots: int,
        now: float,
        queued: AbstractSet[str],
        reason: EvictionReason,
        allow_queued: bool,
    ) -> List[str]:
        if num_slots <= 0:
            return []
        available = self._evictable_slots(queued, allow_queued)
        if available < num_slots:
            raise CacheFullError(
                f"need {num_slots} slots from evictions but idle adapters hold {available} "
                f"(in use: {self._num_in_use} adapters); check can_admit/reclaimable_slots first"
            )
        evicted, _ = self._evict_up_to(num_slots, now, queued, reason, allow_queued)
        return evicted

    def _evict_up_to(
        self,
        num_slots: int,
        now: float,
        queued: AbstractSet[str],
        reason: EvictionReason,
        allow_queued: bool,
    ) -> Tuple[List[str], int]:
        evicted: List[str] = []
        freed = 0
        for entry, tier in self._victims(now, queued, allow_queued):
            if freed >= num_slots:
                break
            self._remove(entry, reason, tier)
            evicted.append(entry.adapter_id)
            freed += entry.num_slots
        return evicted, freed

    def _victims(
        self, now: float, queued: AbstractSet[str], allow_queued: bool
    ) -> Iterator[Tuple[CacheEntry, EvictionTier]]:
        """Idle entries in eviction order: tier 2 by policy order, then (if allowed) tier 3."""
        idle = [self._entries[i] for i in sorted(self._entries) if self._entries[i].is_idle]
        unused = [e for e in idle if e.adapter_id not in queued]
        for entry in self._policy.order(unused, now):
            yield entry, "unused"
        if allow_queued:
            for entry in self._policy.order([e for e in idle if e.adapter_id in queued], now):
                yield entry, "queued"

    def _plan(
        self,
        num_slots: int,
        pieces: Tuple[int, ...],
        now: float,
        queued: AbstractSet[str],
        allow_queued: bool,
    ) -> Optional[List[Tuple[CacheEntry, EvictionTier]]]:
        """The idle entries to evict so that the store can allocate ``num_slots`` (or
        ``pieces``), or None when no choice of them can (nothing is changed either way).

        Victims come in policy order, tier by tier, until enough slots are free in total. On a
        store that needs contiguous runs (one offering ``free_runs_after``) that may not place
        the adapter: then, within the tier at hand, the first remaining entry whose eviction
        lets it be placed is added, else the next in order, until it can; finally victims the
        placement does not need are dropped from the plan again (latest first).
        """
        free = self._store.num_free_slots()
        runs_after = getattr(self._store, "free_runs_after", None)
        least = min(num_slots, sum(pieces) or num_slots)

        def fits(chosen: List[Tuple[CacheEntry, EvictionTier]]) -> bool:
            if free + sum(e.num_slots for e, _ in chosen) < least:
                return False
            return (
                runs_after is None
                or runs_after([e.handle for e, _ in chosen]).place(num_slots, pieces) is not None
            )

        if fits([]):
            return []
        victims = list(self._victims(now, queued, allow_queued))
        chosen: List[Tuple[CacheEntry, EvictionTier]] = []
        total = free
        while victims and total < least:
            chosen.append(victims.pop(0))
            total += chosen[-1][0].num_slots
        if total < least:
            return None
        while not fits(chosen):
            if not victims:
                if allow_queued:  # an admission, not a prefetch
                    self._refused_for_fragmentation += 1
                return None
            runs = runs_after([e.handle for e, _ in chosen])
            tier = victims[0][1]
            closer = next(
                (
                    v
                    for v in victims
                    if v[1] == tier
                    and runs.with_freed(v[0].handle).place(num_slots, pieces) is not None
                ),
                None,
            )
            if closer is not None:
                victims.remove(closer)
                chosen.append(closer)
                break
            chosen.append(victims.pop(0))
        for victim in list(reversed(chosen)):
            rest = [v for v in chosen if v is not victim]
            if fits(rest):
                chosen = rest
        return chosen

    def _remove(
        self, entry: CacheEntry, reason: EvictionReason, tier: Optional[EvictionTier]
    ) -> None:
        self._store.free(entry.handle)
        del self._entries[entry.adapter_id]
        self._num_slots_held -= entry.num_slots
        self._version += 1
        self._evictions_by_reason[reason] += 1
        if tier is not None:
            self._evictions_by_tier[tier] += 1
        self._policy.on_remove(entry, is_eviction=tier is not None)


def _check_size(entry: CacheEntry, num_bytes: int) -> None:
    if entry.num_bytes != num_bytes:
        raise ValueError(
            f"adapter {entry.adapter_id!r} is resident with {entry.num_bytes} "
            f"bytes, not {num_bytes}"
        )
