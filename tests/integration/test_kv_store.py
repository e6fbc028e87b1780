"""Adapters in SGLang's KV slots: the slot store (kv_store) and the cache-aware allocator
(kv_allocator), over SGLang's real page-size-1 ``TokenToKVPoolAllocator``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from chameleon_sglang.cache import AdapterCache, CacheFullError, create_eviction_policy
from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.integration.kv_allocator import (
    CacheAwareTokenAllocator,
    cache_aware_copy,
    make_cache_aware,
)
from chameleon_sglang.memory.kv_store import (
    FreeRuns,
    KVAllocation,
    KVRun,
    KVSlotStore,
    free_slot_count,
    sorted_free_slots,
)

BYTES_PER_SLOT = 48
NEED_SORT = pytest.mark.parametrize("need_sort", [False, True], ids=["nosort", "sort"])


# -- helpers ------------------------------------------------------------------------------------


def make_allocator(size: int, need_sort: bool = False) -> TokenToKVPoolAllocator:
    """SGLang's allocator as the construction hook builds it where the cache serves."""
    return cache_aware_copy(TokenToKVPoolAllocator(size, torch.float32, "cpu", None, need_sort))


def free_list(allocator) -> list:
    """Every slot the allocator holds free, with repeats (free list plus pending frees)."""
    return torch.cat((allocator.free_pages, allocator.release_pages)).tolist()


def free_set(allocator) -> set:
    return set(free_list(allocator))


def slots_of(allocation: KVAllocation) -> set:
    return set(allocation.slots())


def runs_of(free) -> FreeRuns:
    """The free runs of a set of slot indices."""
    return FreeRuns([(s, s + 1) for s in free])


def highest_run(free, length):
    """Where one run of ``length`` goes in the free slots ``free`` (FreeRuns.place)."""
    placed = runs_of(free).place(length) if length > 0 else None
    return placed[0].start if placed else None


def reference_highest_run(free, length):
    """Brute force: the highest start t whose window [t, t+length) is free and ends a run."""
    present = set(int(v) for v in free)
    if length <= 0:
        return None
    tops = [
        t
        for t in present
        if all(t + i in present for i in range(length)) and t + length not in present
    ]
    return max(tops, default=None)


def fragment(allocator, keep_free: set) -> torch.Tensor:
    """Allocate every slot as KV, then free (in scrambled order) the slots in ``keep_free``."""
    kv = allocator.alloc(allocator.size)
    assert kv is not None
    back = sorted(keep_free, key=lambda s: (s * 7919) % 101)
    if back:
        allocator.free(torch.tensor(back, dtype=torch.int64))
    return kv


class CacheSlots:
    """The ``BorrowedSlots`` an allocator asks of the adapter cache, at a settable time."""

    def __init__(self, cache: AdapterCache, now: float = 100.0) -> None:
        self.cache = cache
        self.now = now
        self.calls: list = []

    def reclaimable_slots(self) -> int:
        return self.cache.reclaimable_slots()

    def free_slots_for(self, num_slots: int) -> None:
        self.calls.append(num_slots)
        self.cache.shrink_to_free(num_slots, self.now)

    def held_slots(self) -> list:
        return sorted(held_slots(self.cache))


def make_kv_cache(size: int, policy: str = "lru", need_sort: bool = False):
    allocator = make_allocator(size, need_sort)
    store = KVSlotStore(allocator, BYTES_PER_SLOT)
    cache = AdapterCache(store, create_eviction_policy(policy))
    return allocator, store, cache


def load(cache: AdapterCache, adapter_id: str, num_slots: int, now: float, in_use: bool = False):
    """Admit an adapter of ``num_slots`` slots and use it once; keep the reference if in_use."""
    entry = cache.admit(adapter_id, num_slots * BYTES_PER_SLOT, 8, now)
    cache.acquire(adapter_id, now)
    if not in_use:
        cache.release(adapter_id, now)
    return entry


def held_slots(cache: AdapterCache) -> set:
    held: set = set()
    for adapter_id in cache.resident_ids():
        run = cache.lookup(adapter_id).handle
        assert not held & slots_of(run)
        held |= slots_of(run)
    return held


# -- FreeRuns.place (one run), sorted_free_slots, free_slot_count -----------------------------

free_sets = st.sets(st.integers(1, 60), max_size=45)


@settings(max_examples=400, deadline=None)
@given(free=free_sets, length=st.integers(-1, 14))
def test_highest_run_matches_brute_force(free, length):
    """One run goes to the top `length` slots of the highest long-enough run."""
    assert highest_run(free, length) == reference_highest_run(free, length)


@settings(max_examples=100, deadline=None)
@given(free=free_sets, length=st.integers(1, 14))
def test_highest_run_window_is_free_and_tops_its_run(free, length):
    """A returned start's window lies in the free set and the slot above it is not free."""
    start = highest_run(free, length)
    if start is None:
        assert not any(all(t + i in free for i in range(length)) for t in free)
    else:
        assert set(range(start, start + length)) <= free and start + length not in free
        assert not any(all(t + i in free for i in range(length)) for t in free if t > start)


def test_highest_run_of_nothing_is_none():
    """An empty free list has no run; nor have pieces that do not fit."""
    assert FreeRuns([]).place(1) is None and FreeRuns([]).place(1, (1, 1)) is None
    assert FreeRuns([(1, 9)]).place(9, (5, 5)) is None


@NEED_SORT
@settings(max_examples=60, deadline=None)
@given(frees=st.lists(st.integers(0, 30), max_size=30))
def test_sorted_free_slots_merges_pending_frees_in_order(need_sort, frees):
    """sorted_free_slots returns every free slot once, sorted, and leaves no pending frees."""
    allocator = make_allocator(32, need_sort)
    kv = allocator.alloc(32)
    for i in dict.fromkeys(frees):
        allocator.free(kv[i : i + 1])
    before = sorted(free_list(allocator))
    assert free_slot_count(allocator) == len(before) == allocator.available_size()
    merged = sorted_free_slots(allocator)
    assert merged.tolist() == before
    assert allocator.free_pages.tolist() == before and len(allocator.release_pages) == 0
    assert free_slot_count(allocator) == len(before)


# -- KVSlotStore.alloc -------------------------------------------------------------------------


@NEED_SORT
def test_alloc_takes_the_top_of_an_empty_allocator_and_kv_comes_from_the_bottom(need_sort):
    """A run is the top slots; SGLang then allocates the lowest free slots, never the run's."""
    allocator = make_allocator(40, need_sort)
    store = KVSlotStore(allocator, BYTES_PER_SLOT)
    before = sorted(free_list(allocator))
    run = store.alloc(9)
    assert isinstance(run, KVAllocation) and run.num_slots == 9 and not run.split
    assert sorted(slots_of(run)) == before[-9:]
    assert sorted(free_list(allocator)) == before[:-9]
    assert allocator.available_size() == 40 - 9
    kv = allocator.alloc(12)
    assert kv.tolist() == before[:12]
    rest = allocator.alloc(allocator.available_size())
    assert rest is not None and not (set(rest.tolist()) & slots_of(run))
    assert allocator.alloc(1) is None


@settings(max_examples=150, deadline=None)
@given(
    keep_free=st.sets(st.integers(1, 48), max_size=48),
    num_slots=st.integers(1, 12),
    kv_after=st.integers(1, 8),
    need_sort=st.booleans(),
)
def test_alloc_on_fragmented_memory_takes_the_highest_long_enough_run(
    keep_free, num_slots, kv_after, need_sort
):
    """alloc removes exactly the reference run from the free slots (or nothing when refused),
    and SGLang's next allocation returns the lowest remaining free slots."""
    allocator = make_allocator(48, need_sort)
    fragment(allocator, keep_free)
    store = KVSlotStore(allocator, BYTES_PER_SLOT)
    expected = reference_highest_run(keep_free, num_slots)
    run = store.alloc(num_slots)
    if num_slots > len(keep_free):
        assert run is None and store.num_refused_for_fragmentation == 0
        assert free_set(allocator) == keep_free
        return
    if expected is None:
        assert run is None and store.num_refused_for_fragmentation == 1
        assert sorted(free_list(allocator)) == sorted(keep_free)
        assert store.num_live_runs == 0
        return
    assert [(r.start, r.length) for r in run.runs] == [(expected, num_slots)]
    remaining = keep_free - slots_of(run)
    assert sorted(free_list(allocator)) == sorted(remaining)
    assert store.num_live_runs == 1 and store.num_free_slots() == len(remaining)
    kv = allocator.alloc(kv_after)
    if kv_after <= len(remaining):
        assert kv.tolist() == sorted(remaining)[:kv_after]
    else:
        assert kv is None


def test_alloc_refuses_more_slots_than_are_free():
    """Fewer free slots than asked: None, without counting a fragmentation refusal."""
    allocator = make_allocator(20)
    allocator.alloc(14)
    store = KVSlotStore(allocator, BYTES_PER_SLOT)
    before = sorted(free_list(allocator))
    assert store.alloc(len(before) + 1) is None
    assert store.num_refused_for_fragmentation == 0
    assert sorted(free_list(allocator)) == before


def test_alloc_refuses_for_fragmentation_and_counts_it():
    """Enough slots free in total but no run long enough: None, counted, nothing taken."""
    allocator = make_allocator(20)
    keep_free = {2, 3, 4, 8, 9, 10, 15, 16}
    fragment(allocator, keep_free)
    store = KVSlotStore(allocator, BYTES_PER_SLOT)
    assert store.alloc(4) is None and store.alloc(5) is None
    assert store.num_refused_for_fragmentation == 2
    assert free_set(allocator) == keep_free and store.num_live_runs == 0
    run = store.alloc(3)
    assert run is not None and run.runs[0].start == reference_highest_run(keep_free, 3)


@settings(max_examples=300, deadline=None)
@given(free=free_sets, picks=st.sets(st.integers(1, 60), max_size=12))
def test_with_freed_is_the_runs_rebuilt_with_the_allocation_free(free, picks):
    """FreeRuns.with_freed (incremental) equals FreeRuns over the free slots plus the freed
    allocation's, for allocations of one or several runs; so does its placement."""
    taken = sorted(set(range(1, 61)) - set(free))
    mine = sorted(set(picks) & set(taken))
    allocation = KVAllocation(tuple(KVRun(s, 1) for s in mine))
    fast = runs_of(free).with_freed(allocation)
    slow = runs_of(set(free) | set(mine))
    assert fast.runs == slow.runs and fast.longest == slow.longest
    for n, pieces in ((3, ()), (6, (3, 3)), (8, (4, 2, 2)), (12, (5, 5, 2))):
        assert fast.place(n, pieces) == slow.place(n, pieces)


@settings(max_examples=300, deadline=None)
@given(free=free_sets, pieces=st.lists(st.integers(1, 9), min_size=2, max_size=4))
def test_pieces_go_best_fit_into_disjoint_free_runs(free, pieces):
    """A split placement (no single run long enough) puts each piece in free slots, no two
    overlapping, each piece whole; it is refused only when best-fit decreasing over the free
    runs' lengths fails."""
    total = sum(pieces) + 100  # never one run: only the pieces can place it
    placed = runs_of(free).place(total, pieces)
    lengths = sorted((b - a for a, b in runs_of(free).runs), reverse=True)
    if placed is None:
        left = sorted(lengths)
        for need in sorted(pieces, reverse=True):
            fit = [x for x in left if x >= need]
            if not fit:
                break
            left.remove(fit[0])
            left.append(fit[0] - need)
            left.sort()
        else:
            raise AssertionError("best fit places every piece, place() refused")
        return
    assert [r.length for r in placed] == list(pieces)
    slots = [s for r in placed for s in range(r.start, r.stop)]
    assert len(slots) == len(set(slots)) and set(slots) <= set(free)


def test_split_allocation_holds_its_pieces_and_frees_them_all():
    """Fragmented memory with no run of 8: an adapter of 8 slots in one run, or pieces (5, 4),
    takes the pieces (best fit: 5 into the 5-run, 4 into the 4-run, not the 6-run); freeing it
    returns exactly those slots."""
    allocator = make_allocator(40)
    keep_free = set(range(2, 7)) | set(range(10, 14)) | set(range(20, 26))  # runs of 5, 4, 6
    fragment(allocator, keep_free)
    store = KVSlotStore(allocator, BYTES_PER_SLOT)
    handle = store.alloc(8, (5, 4))
    assert handle is not None and handle.split and store.slots_held(handle) == 9
    assert [(r.start, r.length) for r in handle.runs] == [(2, 5), (10, 4)]
    assert free_set(allocator) == set(range(20, 26))
    store.free(handle)
    assert free_set(allocator) == keep_free
    assert store.num_split_allocations == 1 and store.num_refused_for_fragmentation == 0


def test_fragmented_admission_plans_an_eviction_that_closes_the_gap():
    """Three idle adapters at the top, KV below, a 5-slot hole at the bottom. Admitting 15
    slots: the least recent adapter (a, 10 slots) makes enough slots in total but no run; of the
    two left, the next in LRU order (c) is walled in by KV and b, so b is planned: it joins a's
    run. Two evictions, planned before any, so the store never refuses; c stays."""
    allocator, store, cache = make_kv_cache(64)
    load(cache, "a", 10, now=1.0)  # slots 55-64
    load(cache, "b", 10, now=3.0)  # 45-54
    load(cache, "c", 10, now=2.0)  # 35-44, less recent than b
    kv = allocator.alloc(34)  # 1-34
    allocator.free(kv[:5])  # the hole: 1-5
    entry = cache.admit("d", 15 * BYTES_PER_SLOT, 8, now=4.0)
    assert sorted(cache.resident_ids()) == ["c", "d"]
    assert slots_of(entry.handle) == set(range(50, 65))
    assert store.num_refused_for_fragmentation == 0
    assert cache.stats()["evictions_by_reason"]["make_room"] == 2


def test_alloc_of_no_slots_is_an_error():
    """Asking for zero or fewer slots raises ValueError."""
    store = KVSlotStore(make_allocator(8), BYTES_PER_SLOT)
    for bad in (0, -2):
        with pytest.raises(ValueError):
            store.alloc(bad)


def test_store_needs_a_page_size_one_allocator_and_positive_slot_bytes():
    """A paged allocator or bytes_per_slot <= 0 is refused with ValueError."""
    paged = PagedTokenToKVPoolAllocator(64, 16, torch.float32, "cpu", None, False)
    with pytest.raises(ValueError, match="page-size-1"):
        KVSlotStore(paged, BYTES_PER_SLOT)
    for bad in (0, -1):
        with pytest.raises(ValueError):
            KVSlotStore(make_allocator(8), bad)


@settings(max_examples=100, deadline=None)
@given(num_bytes=st.integers(0, 10_000), bytes_per_slot=st.integers(1, 700))
def test_slots_for_bytes_is_the_fewest_slots_that_hold_the_bytes(num_bytes, bytes_per_slot):
    """slots_for_bytes(n) * bytes_per_slot >= n, and one slot fewer would not do."""
    store = KVSlotStore(make_allocator(4), bytes_per_slot)
    k = store.slots_for_bytes(num_bytes)
    assert k * bytes_per_slot >= num_bytes
    assert k == 0 or (k - 1) * bytes_per_slot < num_bytes


# -- KVSlotStore.free --------------------------------------------------------------------------


@NEED_SORT
def test_free_returns_exactly_the_run_and_calls_on_free(need_sort):
    """free gives back the run's slots (no more), and on_free receives that very run."""
    allocator = make_allocator(30, need_sort)
    freed = []
    store = KVSlotStore(allocator, BYTES_PER_SLOT, on_free=freed.append)
    kv = allocator.alloc(5)
    first, second = store.alloc(6), store.alloc(4)
    before = sorted(free_list(allocator))
    available = allocator.available_size()
    store.free(first)
    assert freed == [first] and freed[0] is first
    assert sorted(free_list(allocator)) == sorted(set(before) | slots_of(first))
    assert allocator.available_size() == available + first.num_slots
    assert not (free_set(allocator) & (slots_of(second) | set(kv.tolist())))
    store.free(second)
    allocator.free(kv)
    assert sorted(free_list(allocator)) == list(range(1, 31))
    assert store.num_live_runs == 0 and freed == [first, second]


def test_double_free_and_foreign_handles_raise():
    """A run freed twice, another store's run, a look-alike run or a non-run: ValueError."""
    allocator = make_allocator(30)
    calls = []
    store = KVSlotStore(allocator, BYTES_PER_SLOT, on_free=calls.append)
    other = KVSlotStore(make_allocator(30), BYTES_PER_SLOT)
    run = store.alloc(5)
    foreign = other.alloc(5)
    assert foreign.runs == run.runs
    for bad in (foreign, KVAllocation(run.runs), run.runs, None, 7):
        with pytest.raises(ValueError):
            store.free(bad)
    store.free(run)
    after = sorted(free_list(allocator))
    with pytest.raises(ValueError):
        store.free(run)
    assert sorted(free_list(allocator)) == after and calls == [run]


@NEED_SORT
@pytest.mark.parametrize("how", ["store_free", "cache_drop", "release_after_drop"])
def test_slots_freed_by_the_cache_are_allocatable_by_sglang_at_once(need_sort, how):
    """After the cache gives a run back, SGLang can allocate every slot available_size counts."""
    allocator, store, cache = make_kv_cache(24, need_sort=need_sort)
    allocator.alloc(4)
    load(cache, "a", 16, now=0.0, in_use=how == "release_after_drop")
    if how == "store_free":
        store.free(cache.lookup("a").handle)
    elif how == "cache_drop":
        assert cache.drop("a")
    else:
        assert not cache.drop("a")
        cache.release("a", now=1.0)
    available = allocator.available_size()
    assert available == 20
    kv = allocator.alloc(available)
    assert kv is not None and len(set(kv.tolist())) == available


@NEED_SORT
@pytest.mark.parametrize("how", ["cache_drop", "release_after_drop"])
def test_cache_aware_alloc_sees_slots_freed_by_the_cache(need_sort, how):
    """With the cache-aware allocator too, slots the cache gave back are allocatable at once."""
    allocator, store, cache = make_kv_cache(24, need_sort=need_sort)
    make_cache_aware(allocator, CacheSlots(cache))
    allocator.alloc(4)
    load(cache, "a", 16, now=0.0, in_use=how == "release_after_drop")
    if how == "cache_drop":
        assert cache.drop("a")
    else:
        assert not cache.drop("a")
        cache.release("a", now=1.0)
    assert cache.resident_ids() == []
    assert allocator.available_size() == 20
    kv = allocator.alloc(10)
    assert kv is not None and len(set(kv.tolist())) == 10


# -- interleaving with SGLang ------------------------------------------------------------------

ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["store_alloc", "store_free", "kv_alloc", "kv_free"]),
        st.integers(1, 14),
        st.integers(0, 1000),
    ),
    max_size=40,
)


@settings(max_examples=120, deadline=None)
@given(ops=ops_strategy, need_sort=st.booleans())
def test_store_and_sglang_never_hand_one_slot_to_two_owners(ops, need_sort):
    """Interleaved store and SGLang allocs/frees keep owners disjoint; freeing all restores
    exactly the free slots 1..size."""
    size = 40
    allocator = make_allocator(size, need_sort)
    store = KVSlotStore(allocator, BYTES_PER_SLOT)
    owner: dict = {}  # slot -> index of the op that took it
    runs: list = []
    kvs: list = []
    for step, (op, n, pick) in enumerate(ops):
        taken: list = []
        if op == "store_alloc":
            free = sorted(free_list(allocator))
            expected = reference_highest_run(free, n) if n <= len(free) else None
            run = store.alloc(n)
            assert (None if run is None else run.runs[0].start) == expected
            if run is not None:
                runs.append(run)
                taken = sorted(slots_of(run))
        elif op == "kv_alloc":
            kv = allocator.alloc(n)
            if kv is not None:
                kvs.append(kv)
                taken = kv.tolist()
                assert len(set(taken)) == n
        elif op == "store_free" and runs:
            run = runs.pop(pick % len(runs))
            for slot in slots_of(run):
                del owner[slot]
            store.free(run)
        elif op == "kv_free" and kvs:
            kv = kvs.pop(pick % len(kvs))
            for slot in kv.tolist():
                del owner[slot]
            allocator.free(kv)
        for slot in taken:
            assert 1 <= slot <= size and slot not in owner
            owner[slot] = step
        free = free_list(allocator)
        assert len(free) == len(set(free)) == free_slot_count(allocator)
        assert not set(free) & set(owner)
        assert set(free) | set(owner) == set(range(1, size + 1))
    for run in runs:
        store.free(run)
    for kv in kvs:
        allocator.free(kv)
    assert sorted(free_list(allocator)) == list(range(1, size + 1))
    assert allocator.available_size() == size and store.num_live_runs == 0


# -- the adapter cache in KV slots -------------------------------------------------------------


def test_adapter_cache_from_config_holds_adapters_in_disjoint_top_runs():
    """Admitted adapters hold disjoint runs of their size; the cache and allocator agree."""
    allocator = make_allocator(64)
    store = KVSlotStore(allocator, BYTES_PER_SLOT)
    cache = AdapterCache.from_config(store, ChameleonConfig())
    sizes = {"a": 5, "b": 12, "c": 1}
    for t, (adapter_id, n) in enumerate(sizes.items()):
        entry = cache.admit(adapter_id, n * BYTES_PER_SLOT, 8, now=float(t))
        assert entry.num_slots == n and entry.handle.num_slots == n
        cache.acquire(adapter_id, now=float(t))
    held = held_slots(cache)
    assert len(held) == sum(sizes.values()) == cache.num_slots_held
    assert sorted(held) == list(range(64 - len(held) + 1, 65))
    assert free_set(allocator) == set(range(1, 65)) - held
    assert store.num_free_slots() == 64 - len(held)
    for adapter_id in sizes:
        cache.release(adapter_id, now=10.0)
    assert held_slots(cache) == held
    for adapter_id in sizes:
        assert cache.drop(adapter_id)
    assert sorted(free_list(allocator)) == list(range(1, 65))


def test_admission_with_partial_slot_rounds_up():
    """An adapter whose bytes are not a slot multiple takes the next whole number of slots."""
    allocator, store, cache = make_kv_cache(16)
    entry = cache.admit("a", 3 * BYTES_PER_SLOT + 1, 8, now=0.0)
    assert entry.handle.num_slots == entry.num_slots == 4
    assert allocator.available_size() == 12


def test_cache_aware_copy_is_sglangs_allocator_until_bound():
    """Built with the stock allocator's parameters, unused; until the cache binds to it, it
    allocates, frees and reports exactly as SGLang's own allocator."""
    stock = TokenToKVPoolAllocator(32, torch.float32, "cpu", None, True)
    ours = cache_aware_copy(TokenToKVPoolAllocator(32, torch.float32, "cpu", None, True))
    assert type(ours) is CacheAwareTokenAllocator and isinstance(ours, TokenToKVPoolAllocator)
    assert (ours.size, ours.dtype, ours.device, ours.need_sort) == (32, torch.float32, "cpu", True)
    for allocator in (stock, ours):
        allocator.record = [allocator.available_size()]
        first = allocator.alloc(5)
        allocator.free(first[1:3])
        allocator.record += [
            allocator.alloc(30),
            allocator.available_size(),
            allocator.alloc(4).tolist(),
            allocator.available_size(),
        ]
    assert ours.record == stock.record
    assert free_list(ours) == free_list(stock)


@NEED_SORT
def test_available_size_counts_idle_adapters_but_not_in_use_ones(need_sort):
    """available_size is the free slots plus idle adapters' slots; in-use slots are used."""
    size = 40
    allocator, store, cache = make_kv_cache(size, need_sort=need_sort)
    load(cache, "idle", 6, now=0.0)
    load(cache, "busy", 5, now=1.0, in_use=True)
    kv = allocator.alloc(10)
    plain = allocator.available_size()
    assert plain == size - 10 - 11
    make_cache_aware(allocator, CacheSlots(cache))
    assert allocator.available_size() == plain + 6 == size - len(kv) - 5
    cache.acquire("idle", now=2.0)
    assert allocator.available_size() == plain
    cache.release("busy", now=3.0)
    assert allocator.available_size() == plain + 5


@NEED_SORT
def test_alloc_beyond_free_slots_evicts_idle_adapters_only_as_needed(need_sort):
    """alloc(n) > free slots evicts idle adapters in policy order until n fit, never an
    adapter in use, and returns n slots no adapter holds."""
    allocator, store, cache = make_kv_cache(40, policy="lru", need_sort=need_sort)
    load(cache, "old", 8, now=0.0)
    load(cache, "newer", 8, now=1.0)
    load(cache, "busy", 8, now=0.5, in_use=True)
    kv = allocator.alloc(10)
    slots = CacheSlots(cache)
    make_cache_aware(allocator, slots)
    free_before = store.num_free_slots()
    assert free_before == 6
    got = allocator.alloc(12)
    assert got is not None and len(set(got.tolist())) == 12
    assert slots.calls == [12]
    assert cache.resident_ids() == ["busy", "newer"]
    assert cache.lookup("busy").refcount == 1
    assert not set(got.tolist()) & (held_slots(cache) | set(kv.tolist()))
    assert cache.stats()["evictions_by_reason"]["kv_pressure"] == 1


@NEED_SORT
def test_clear_keeps_cached_adapters_slots_out_of_the_free_list(need_sort):
    """SGLang's pool reset (/flush_cache) frees every slot but the cached adapters' (idle or in
    use): nothing is handed out twice, and evicting the adapters afterwards returns each of
    their slots exactly once (found by API fuzzing: a flush under --chameleon counted adapter
    slots twice and SGLang's idle leak check stopped the server)."""
    size = 48
    allocator, store, cache = make_kv_cache(size, need_sort=need_sort)
    make_cache_aware(allocator, CacheSlots(cache))
    load(cache, "idle", 6, now=0.0)
    load(cache, "busy", 5, now=1.0, in_use=True)
    allocator.alloc(10)
    allocator.clear()
    held = held_slots(cache)
    assert len(held) == 11
    free = free_list(allocator)
    assert len(free) == len(set(free)) == size - 11 and not set(free) & held
    assert allocator.available_size() == size - 5  # the idle adapter is reclaimable
    got = allocator.alloc(size - 5)
    assert got is not None and not set(got.tolist()) & held_slots(cache)
    assert cache.resident_ids() == ["busy"]
    allocator.free(got)
    cache.release("busy", now=2.0)
    cache.shrink_to_free(size, now=3.0)
    free = free_list(allocator)
    assert sorted(free) == list(range(1, size + 1))


def test_clear_of_an_unbound_allocator_is_sglangs():
    ours, stock = make_allocator(16), TokenToKVPoolAllocator(16, torch.float32, "cpu", None, False)
    for allocator in (ours, stock):
        allocator.alloc(5)
        allocator.clear()
    assert free_list(ours) == free_list(stock)


def _prefix_cache_holding(allocator, num_tokens: int, first_token: int = 0):
    """SGLang's real radix cache over ``allocator``, holding one evictable entry of
    ``num_tokens`` tokens (a finished request's KV)."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    tree = RadixCache.create_simulated(mock_allocator=allocator)
    kv = allocator.alloc(num_tokens)
    tree.insert(
        InsertParams(key=RadixKey(list(range(first_token, first_token + num_tokens))), value=kv)
    )
    return tree


@pytest.mark.parametrize(
    "tree_tokens, need, resident, calls",
    [
        (12, 20, ["a", "b"], []),  # the prefix cache covers the shortfall: adapters stay
        (4, 28, ["b"], [28]),  # it cannot: emptied, then the older idle adapter goes for the rest
    ],
    ids=["prefix-cache-covers", "adapters-for-the-rest"],
)
def test_sglang_allocation_takes_the_prefix_cache_before_idle_adapters(
    tree_tokens, need, resident, calls
):
    """SGLang's own path (evict from its tree, then alloc) on a 40-slot pool with two idle
    8-slot adapters: the prefix cache's evictable tokens give way first, idle adapters only for
    what it could not free."""
    from sglang.srt.mem_cache.common import evict_from_tree_cache

    allocator, store, cache = make_kv_cache(40)
    load(cache, "a", 8, now=0.0)
    load(cache, "b", 8, now=1.0)
    slots = CacheSlots(cache)
    make_cache_aware(allocator, slots)
    tree = _prefix_cache_holding(allocator, tree_tokens)
    assert store.num_free_slots() == 24 - tree_tokens
    evict_from_tree_cache(tree, need)
    got = allocator.alloc(need)
    assert got is not None and len(got) == need
    assert tree.evictable_size() == 0
    assert cache.resident_ids() == resident and slots.calls == calls


def test_decode_check_counts_idle_adapters_after_emptying_the_prefix_cache():
    """SGLang's decode capacity check: fits when free + prefix cache + idle adapters cover it,
    the prefix cache gives way, adapters stay until the allocation itself."""
    allocator, store, cache = make_kv_cache(40)
    load(cache, "a", 10, now=0.0)
    make_cache_aware(allocator, CacheSlots(cache))
    tree = _prefix_cache_holding(allocator, 20)
    assert allocator.check_decode_capacity(num_tokens=25, tree_cache=tree)
    assert tree.evictable_size() == 0 and cache.resident_ids() == ["a"]
    assert not allocator.check_decode_capacity(num_tokens=41, tree_cache=tree)


def test_alloc_within_free_slots_evicts_nothing():
    """An allocation the free slots cover does not ask the cache for memory."""
    allocator, store, cache = make_kv_cache(30)
    load(cache, "a", 10, now=0.0)
    slots = CacheSlots(cache)
    make_cache_aware(allocator, slots)
    got = allocator.alloc(20)
    assert got is not None and slots.calls == [] and cache.resident_ids() == ["a"]


@NEED_SORT
def test_alloc_fails_without_touching_adapters_in_use(need_sort):
    """When even every idle adapter's slots are not enough, alloc is None and in-use
    adapters keep their memory."""
    size = 20
    allocator, store, cache = make_kv_cache(size, need_sort=need_sort)
    load(cache, "idle", 4, now=0.0)
    busy = load(cache, "busy", 6, now=1.0, in_use=True)
    kv = allocator.alloc(6)
    make_cache_aware(allocator, CacheSlots(cache))
    need = allocator.available_size() + 1
    assert allocator.alloc(need) is None
    assert cache.is_resident("busy") and cache.lookup("busy").refcount == 1
    assert not free_set(allocator) & slots_of(busy.handle)
    assert free_set(allocator) | held_slots(cache) | set(kv.tolist()) == set(range(1, size + 1))
    assert allocator.available_size() == size - len(kv) - 6


@settings(max_examples=80, deadline=None)
@given(
    adapters=st.lists(st.tuples(st.integers(1, 8), st.booleans()), min_size=1, max_size=6),
    kv_first=st.integers(0, 20),
    need=st.integers(1, 60),
    need_sort=st.booleans(),
)
def test_cache_aware_alloc_succeeds_exactly_when_available(adapters, kv_first, need, need_sort):
    """alloc(n) succeeds iff n <= available_size(); in-use adapters always stay resident and
    no slot is handed out twice."""
    size = 60
    allocator, store, cache = make_kv_cache(size, need_sort=need_sort)
    for i, (n, in_use) in enumerate(adapters):
        load(cache, f"a{i}", n, now=float(i), in_use=in_use)
    kv_first = allocator.alloc(kv_first) if kv_first else None
    make_cache_aware(allocator, CacheSlots(cache))
    in_use = {f"a{i}" for i, (_, busy) in enumerate(adapters) if busy}
    available = allocator.available_size()
    got = allocator.alloc(need)
    assert (got is not None) == (need <= available)
    assert in_use <= set(cache.resident_ids())
    owned = held_slots(cache) | (set(kv_first.tolist()) if kv_first is not None else set())
    if got is not None:
        assert len(set(got.tolist())) == need and not set(got.tolist()) & owned
        owned |= set(got.tolist())
    assert not free_set(allocator) & owned
    assert free_set(allocator) | owned == set(range(1, size + 1))


def test_fragmented_admission_evicts_only_the_adapters_its_run_needs():
    """LRU's first two victims (a, c) free enough slots but are split by an in-use adapter; the
    plan adds d, which joins c's run, and then leaves a out again: it is not part of the run.
    The in-use adapter stays; the store is never asked for a run it cannot give."""
    allocator, store, cache = make_kv_cache(16, policy="lru")
    load(cache, "d", 4, now=3.0)  # admitted first: the top run
    load(cache, "c", 4, now=1.0)
    load(cache, "busy", 4, now=2.0, in_use=True)
    load(cache, "a", 4, now=0.0)  # the bottom run
    assert store.num_free_slots() == 0
    busy_run = cache.lookup("busy").handle
    assert cache.can_admit("e", 6 * BYTES_PER_SLOT, now=5.0)
    entry = cache.admit("e", 6 * BYTES_PER_SLOT, 8, now=5.0)
    assert store.num_refused_for_fragmentation == 0
    assert cache.resident_ids() == ["a", "busy", "e"]
    assert cache.lookup("busy").handle is busy_run and entry.handle.num_slots == 6
    assert cache.stats()["evictions_by_reason"]["make_room"] == 2
    held = held_slots(cache)
    assert not free_set(allocator) & held
    assert free_set(allocator) | held == set(range(1, 17))


def test_fragmentation_no_eviction_can_cure_is_refused_without_evicting():
    """An in-use adapter splits memory so that no run of 6 can exist: can_admit says no and
    admit raises CacheFullError having evicted nothing (the idle adapters stay)."""
    allocator, store, cache = make_kv_cache(12, policy="lru")
    load(cache, "top", 4, now=0.0)
    load(cache, "busy", 4, now=1.0, in_use=True)
    load(cache, "bottom", 4, now=2.0)
    assert not cache.can_admit("big", 6 * BYTES_PER_SLOT, now=3.0)
    with pytest.raises(CacheFullError):
        cache.admit("big", 6 * BYTES_PER_SLOT, 8, now=3.0)
    assert sorted(cache.resident_ids()) == ["bottom", "busy", "top"]
    assert store.num_refused_for_fragmentation == 0
    assert cache.stats()["evictions"] == 0 and cache.stats()["refused_for_fragmentation"] == 2
    assert free_set(allocator) | held_slots(cache) == set(range(1, 13))


class _SubclassedAllocator(TokenToKVPoolAllocator):
    pass


@pytest.mark.parametrize(
    "make",
    [
        lambda: object(),
        lambda: TokenToKVPoolAllocator(8, torch.float32, "cpu", None, False),
        lambda: _SubclassedAllocator(8, torch.float32, "cpu", None, False),
        lambda: PagedTokenToKVPoolAllocator(64, 16, torch.float32, "cpu", None, False),
    ],
    ids=["object", "stock-built", "subclass", "paged"],
)
def test_make_cache_aware_refuses_anything_not_built_cache_aware(make):
    """Only an allocator built as CacheAwareTokenAllocator binds; anything else is a TypeError,
    and the construction hook builds only SGLang's exact page-size-1 allocator as ours."""
    target = make()
    with pytest.raises(TypeError):
        make_cache_aware(target, CacheSlots(make_kv_cache(8)[2]))
    if type(target) is not TokenToKVPoolAllocator:
        assert cache_aware_copy(target) is target


def test_make_cache_aware_twice_is_refused():
    """An allocator lends its slots to one adapter cache."""
    allocator, _, cache = make_kv_cache(8)
    make_cache_aware(allocator, CacheSlots(cache))
    with pytest.raises(TypeError):
        make_cache_aware(allocator, CacheSlots(cache))
