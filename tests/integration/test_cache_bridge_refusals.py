"""A refused adapter is not asked about again until something it needs changed (no refusal
loop), and an adapter loaded during a prefill pass never takes KV slots the pass's budget has
promised to requests admitted before it: CacheBridge over a real KV allocator, slot store and
adapter cache; the pool is a thin double that admits through the cache as ChameleonLoRAPool
does."""

from __future__ import annotations

import types

import torch
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

from chameleon_sglang.cache import create_eviction_policy
from chameleon_sglang.cache.adapter_cache import AdapterCache
from chameleon_sglang.clock import SchedulerClock
from chameleon_sglang.integration.cache_bridge import CacheBridge
from chameleon_sglang.integration.kv_allocator import cache_aware_copy
from chameleon_sglang.memory.kv_store import KVSlotStore

BYTES_PER_SLOT = 8
SLOTS = {"big": 30, "small": 4}


class Pool:
    def __init__(self, cache: AdapterCache, store: KVSlotStore) -> None:
        self.cache, self.store = cache, store
        self.manager = types.SimpleNamespace(loras=dict.fromkeys(SLOTS), lora_refs={})
        self.asked = 0

    def footprint_slots(self, uid: str) -> int:
        return SLOTS[uid]

    def footprint_bytes(self, uid: str) -> int:
        return SLOTS[uid] * BYTES_PER_SLOT

    def make_resident(self, uid, now, queued, prefetch=False, count_lookup=True) -> bool:
        self.asked += 1
        if not self.cache.can_admit(uid, self.footprint_bytes(uid), now, frozenset(queued)):
            return False
        self.cache.admit(uid, self.footprint_bytes(uid), 8, now, frozenset(queued))
        return True


def make_bridge(size: int = 40):
    allocator = cache_aware_copy(TokenToKVPoolAllocator(size, torch.float32, "cpu", None, False))
    store = KVSlotStore(allocator, BYTES_PER_SLOT)
    cache = AdapterCache(store, create_eviction_policy("chameleon"))
    scheduler = types.SimpleNamespace(
        token_to_kv_pool_allocator=allocator,
        tree_cache=None,
        waiting_queue=[],
        max_total_num_tokens=size,
    )
    pool = Pool(cache, store)
    bridge = CacheBridge(scheduler, pool, SchedulerClock(), prefetch=False, owns_clock=False)
    return bridge, pool, allocator


def req(rid: str, adapter: str):
    return types.SimpleNamespace(rid=rid, lora_id=adapter, finished=lambda: False)


def test_a_refused_adapter_is_not_asked_again_until_memory_frees():
    bridge, pool, allocator = make_bridge()
    kv = allocator.alloc(20)  # 20 of 40 slots held by KV: no room for 30
    waiting = [req(f"r{i}", "big") for i in range(5)]
    for _ in range(3):  # three scheduling passes over five waiting requests
        assert not any(bridge.can_schedule(r) for r in waiting)
    assert pool.asked == 1 and bridge.num_refused == 1
    assert bridge.num_refusals_repeated == 14
    more = allocator.alloc(2)  # less room: still not asked
    assert not bridge.can_schedule(waiting[0]) and pool.asked == 1
    allocator.free(more)
    allocator.free(kv)  # room: asked again, admitted
    assert bridge.can_schedule(waiting[0]) and pool.asked == 2


def test_a_change_in_the_cache_lets_a_refused_adapter_be_asked_again():
    bridge, pool, allocator = make_bridge()
    allocator.alloc(8)
    small = req("s", "small")
    assert bridge.can_schedule(small)  # admitted and referenced: 4 slots in use
    allocator.alloc(26)  # 2 slots free, the small adapter busy
    assert not bridge.can_schedule(req("b", "big")) and pool.asked == 2
    assert not bridge.can_schedule(req("b", "big")) and pool.asked == 2
    bridge.cache.release("small", 0.0)  # the small adapter turns idle: the cache changed
    assert not bridge.can_schedule(req("b", "big")) and pool.asked == 3  # asked (still no room)


class PrefixCache:
    """SGLang's radix cache as the bridge sees it: evictable tokens holding KV slots."""

    def __init__(self, allocator, slots: torch.Tensor) -> None:
        self.allocator, self.slots = allocator, slots

    def evictable_size(self) -> int:
        return int(self.slots.numel())

    def evict(self, params) -> None:
        self.allocator.free(self.slots)
        self.slots = self.slots[:0]


def test_prefix_cache_tokens_splitting_free_memory_give_way_to_an_adapter():
    """Nothing runs; enough slots are free in total, but prefix-cache tokens in the middle
    split them: the prefix cache is evicted and the adapter admitted (no livelock)."""
    bridge, pool, allocator = make_bridge()
    kv = allocator.alloc(40)
    allocator.free(torch.cat((kv[:18], kv[22:])))  # slots 19-22 stay with the prefix cache
    bridge.scheduler.tree_cache = PrefixCache(allocator, kv[18:22])
    assert bridge.can_schedule(req("r", "big"))
    assert bridge.num_prefix_evictions_for_runs == 1 and bridge.cache.is_resident("big")


class Budget:
    """What the bridge reads of SGLang's PrefillAdder: the live remaining total budget
    (available KV, idle adapters included, minus what the pass has promised so far)."""

    def __init__(self, allocator, promised: int) -> None:
        self.allocator, self.promised = allocator, promised

    @property
    def rem_total_tokens(self) -> int:
        return self.allocator.available_size() - self.promised


def test_a_load_during_a_pass_never_takes_slots_promised_to_admitted_requests():
    bridge, pool, allocator = make_bridge(40)
    adder = Budget(allocator, promised=15)  # earlier requests of this pass: 15 prompt tokens
    bridge.begin_pass(adder)
    assert not bridge.can_schedule(req("b", "big"))  # 30 slots > 40 - 15 left
    assert pool.asked == 0 and bridge.num_refused_for_pass_budget == 1
    assert bridge.can_schedule(req("s", "small"))  # 4 slots fit: loaded
    assert adder.rem_total_tokens >= 0  # every promise still covered
    assert allocator.alloc(15) is not None  # the pass's prompts get their slots
    bridge.end_pass()
    bridge.begin_pass(Budget(allocator, promised=0))  # next pass, nothing promised yet
    assert not bridge.can_schedule(req("b2", "big"))  # 30 > 40 - 15 - 4 still
    bridge.end_pass()


def test_acquiring_an_idle_adapter_during_a_pass_never_takes_promised_slots():
    """An idle resident adapter's slots count as available to the pass; a request that would
    acquire it (making them unavailable) after others were promised those slots must wait for
    the next pass. An adapter already in use can be shared at any time. (The soak found this:
    'Out of memory' at the pass's allocation, 724 tokens asked, 472 left.)"""
    bridge, pool, allocator = make_bridge(40)
    assert bridge.can_schedule(req("s0", "small"))  # small resident, in use by s0
    assert bridge.can_schedule(req("b0", "big"))  # big resident (30 slots)
    bridge.end_pass()
    bridge._holds["b0"][0].finished = lambda: True  # b0 finishes: big idle, 30 reclaimable
    bridge.settle_finished()
    assert bridge.cache.lookup("big").is_idle and allocator.available_size() == 36
    adder = Budget(allocator, promised=20)  # the pass promised 20 slots: 16 left
    bridge.begin_pass(adder)
    assert not bridge.can_schedule(req("b1", "big"))  # acquiring would leave -14
    assert bridge.num_refused_for_pass_budget == 1 and bridge.cache.lookup("big").is_idle
    assert bridge.can_schedule(req("s1", "small"))  # small is in use: sharing it is free
    assert adder.rem_total_tokens >= 0
    bridge.end_pass()
    bridge.begin_pass(Budget(allocator, promised=0))
    assert bridge.can_schedule(req("b2", "big"))  # a new pass with room: acquired
    bridge.end_pass()


def test_outside_a_pass_the_budget_does_not_apply():
    bridge, pool, allocator = make_bridge(40)
    assert bridge.can_schedule(req("b", "big")) and pool.asked == 1
