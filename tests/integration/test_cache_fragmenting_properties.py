"""The adapter cache over the real KV slot store, whose runs must be contiguous: check-then-act
stays exact when memory fragments (random operation sequences), for adapters in one run and for
adapters that may be split into pieces; with pieces of one slot, total free slots decide."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

from chameleon_sglang.cache import CacheFullError, create_eviction_policy
from chameleon_sglang.cache.adapter_cache import AdapterCache
from chameleon_sglang.memory.kv_store import KVSlotStore

SIZE = 40
BYTES_PER_SLOT = 16
SLOTS = {"a": 3, "b": 5, "c": 8, "d": 2, "e": 11, "f": 6}
PIECES = {"c": (4, 5), "e": (6, 6), "f": (3, 4), "b": (1,) * 5}  # their split layouts
IDS = sorted(SLOTS)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.sampled_from(IDS), st.booleans()),
        st.tuples(st.just("admit"), st.sampled_from(IDS), st.booleans()),
        st.tuples(st.just("acquire"), st.sampled_from(IDS)),
        st.tuples(st.just("release"), st.sampled_from(IDS)),
        st.tuples(st.just("kv_alloc"), st.integers(1, 7)),
        st.tuples(st.just("kv_free"), st.integers(0, 20)),
    ),
    min_size=5,
    max_size=60,
)


def _state(cache, allocator):
    free = torch.cat((allocator.free_pages, allocator.release_pages)).tolist()
    return sorted(cache.resident_ids()), sorted(free)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["chameleon", "lru", "fairshare", "gdsf"]), ops, st.booleans())
def test_can_admit_is_exact_and_a_refused_admission_changes_nothing(policy, steps, split):
    allocator = TokenToKVPoolAllocator(SIZE, torch.float32, "cpu", None, False)
    store = KVSlotStore(allocator, BYTES_PER_SLOT)
    cache = AdapterCache(store, create_eviction_policy(policy))
    kv, refs = [], {i: 0 for i in IDS}
    for t, op in enumerate(steps):
        now = float(t)
        if op[0] == "admit":
            _, adapter, prefetch = op
            num_bytes = SLOTS[adapter] * BYTES_PER_SLOT
            pieces = PIECES.get(adapter, ()) if split else ()
            before = _state(cache, allocator)
            resident = cache.is_resident(adapter)
            reclaimable = cache.reclaimable_slots(None if not prefetch else frozenset())
            expected = cache.can_admit(adapter, num_bytes, now, prefetch=prefetch, pieces=pieces)
            if pieces == (1,) * SLOTS[adapter] and not resident:  # the count alone decides
                assert expected == (store.num_free_slots() + reclaimable >= SLOTS[adapter])
            try:
                entry = cache.admit(adapter, num_bytes, 8, now, prefetch=prefetch, pieces=pieces)
                ok = True
                assert entry.num_slots == store.slots_held(entry.handle)
            except CacheFullError:
                ok = False
                assert _state(cache, allocator) == before, "a refused admission changed state"
            assert ok == expected, op
        elif op[0] == "acquire" and cache.is_resident(op[1]):
            cache.acquire(op[1], now)
            refs[op[1]] += 1
        elif op[0] == "release" and refs[op[1]] > 0:
            cache.release(op[1], now)
            refs[op[1]] -= 1
        elif op[0] == "kv_alloc":
            cache.shrink_to_free(op[1], now)
            got = allocator.alloc(op[1])
            if got is not None:
                kv.append(got)
        elif op[0] == "kv_free" and kv:
            allocator.free(kv.pop(op[1] % len(kv)))
        assert store.num_refused_for_fragmentation == 0  # the store is never asked in vain
        held = [set(cache.lookup(i).handle.slots()) for i in cache.resident_ids()]
        owned = [s for run in held for s in run] + [s for k in kv for s in k.tolist()]
        free = _state(cache, allocator)[1]
        assert sorted(owned + free) == list(range(1, SIZE + 1))  # no slot lost or shared
        for i in IDS:  # an adapter in use is never evicted
            assert refs[i] == 0 or cache.is_resident(i)
