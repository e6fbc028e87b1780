"""Predictive prefetch: the arrival-gap histogram (chameleon_sglang.cache.arrival_histogram) and
the bridge loading adapters it says are due, into free memory only (CacheBridge over a real KV
allocator, slot store and adapter cache; a thin pool double that admits as ChameleonLoRAPool)."""

from __future__ import annotations

import types

import pytest
import torch
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

from chameleon_sglang.cache import create_eviction_policy
from chameleon_sglang.cache.adapter_cache import AdapterCache
from chameleon_sglang.cache.arrival_histogram import ArrivalHistogram
from chameleon_sglang.clock import SchedulerClock
from chameleon_sglang.integration.cache_bridge import CacheBridge
from chameleon_sglang.integration.kv_allocator import cache_aware_copy
from chameleon_sglang.memory.kv_store import KVSlotStore

BYTES_PER_SLOT = 8
SLOTS = {"periodic": 10, "other": 10, "rare": 10}


def periodic(
    histogram: ArrivalHistogram, adapter: str, every: float, count: int, start: float = 0.0
) -> float:
    t = start
    for _ in range(count):
        histogram.observe(adapter, t)
        t += every
    return t - every  # the last arrival


def test_periodic_arrivals_predict_the_next_one():
    h = ArrivalHistogram(bin_s=0.5)
    last = periodic(h, "a", 10.0, 8)
    head, tail = h.window("a")
    assert head == pytest.approx(10.0) and tail == pytest.approx(10.5)
    assert h.due(last + 9.2, lead_s=1.0) == ["a"]  # within the lead before the head
    assert h.due(last + 3.0, lead_s=1.0) == []  # too early
    assert h.due(last + 11.0, lead_s=1.0) == []  # past the tail: no longer expected
    assert h.due(last + 9.2, lead_s=1.0, skip=["a"]) == []


def test_no_prediction_from_few_or_mostly_out_of_range_gaps():
    h = ArrivalHistogram(bin_s=1.0, range_s=60.0, min_gaps=4)
    periodic(h, "few", 5.0, 4)  # three gaps
    assert h.window("few") is None
    periodic(h, "far", 100.0, 10)  # every gap beyond the range
    assert h.window("far") is None
    assert h.due(1e6) == [] and h.window("unknown") is None
    h.forget("few")
    assert h.window("few") is None


def test_due_orders_by_number_of_gaps_then_name():
    h = ArrivalHistogram(bin_s=1.0)
    periodic(h, "b", 2.0, 6)
    periodic(h, "a", 2.0, 6)
    periodic(h, "c", 2.0, 12, start=-12.0)  # all three last arrived at t=10
    assert h.due(11.5, lead_s=1.0) == ["c", "a", "b"]
    with pytest.raises(ValueError):
        ArrivalHistogram(bin_s=0.0)
    with pytest.raises(ValueError):
        ArrivalHistogram(head=0.9, tail=0.5)


class Pool:
    """Admits through the cache as ChameleonLoRAPool.make_resident does (prefetch included)."""

    def __init__(self, cache: AdapterCache) -> None:
        self.cache = cache
        self.manager = types.SimpleNamespace(loras=dict.fromkeys(SLOTS), lora_refs={})

    def footprint_bytes(self, uid: str) -> int:
        return SLOTS[uid] * BYTES_PER_SLOT

    def make_resident(self, uid, now, queued, prefetch=False, count_lookup=True) -> bool:
        if self.cache.is_resident(uid):
            return True
        queued = frozenset(queued)
        if not self.cache.can_admit(uid, self.footprint_bytes(uid), now, queued, prefetch=prefetch):
            return False
        self.cache.admit(uid, self.footprint_bytes(uid), 8, now, queued, prefetch=prefetch)
        return True


class Clock(SchedulerClock):
    def __init__(self) -> None:
        super().__init__(monotonic=lambda: 0.0)

    def set(self, t: float) -> None:
        self._last = t


def make_bridge(size: int = 30):
    allocator = cache_aware_copy(TokenToKVPoolAllocator(size, torch.float32, "cpu", None, False))
    cache = AdapterCache(KVSlotStore(allocator, BYTES_PER_SLOT), create_eviction_policy("lru"))
    scheduler = types.SimpleNamespace(
        token_to_kv_pool_allocator=allocator,
        tree_cache=None,
        waiting_queue=[],
        max_total_num_tokens=size,
    )
    clock = Clock()
    bridge = CacheBridge(
        scheduler, Pool(cache), clock, prefetch=True, owns_clock=False, predictive=True
    )
    return bridge, cache, allocator, clock


def arrive(bridge, clock, adapter: str, t: float) -> None:
    clock.set(t)
    bridge.on_arrival(types.SimpleNamespace(rid=f"{adapter}@{t}", lora_id=adapter))


def test_a_due_adapter_is_loaded_into_free_memory_before_its_request():
    bridge, cache, _, clock = make_bridge()
    for i in range(6):
        arrive(bridge, clock, "periodic", 20.0 * i)  # last arrival at t=100, every 20 s
    clock.set(105.0)
    bridge.end_pass()
    assert not cache.is_resident("periodic")  # not due yet
    clock.set(119.5)
    bridge.end_pass()
    assert cache.is_resident("periodic") and bridge.num_predictive_loads == 1
    assert cache.stats()["prefetch_loads"] == 1 and cache.stats()["misses"] == 0
    assert bridge.prefetch_policy == "predictive"


def test_a_predicted_load_evicts_nothing():
    """Memory full of idle adapters and KV: the due adapter is not loaded, nothing is evicted."""
    bridge, cache, allocator, clock = make_bridge(size=30)
    for uid in ("other", "rare"):
        cache.admit(uid, SLOTS[uid] * BYTES_PER_SLOT, 8, 0.0)
    allocator.alloc(10)
    for i in range(6):
        arrive(bridge, clock, "periodic", 20.0 * i)
    clock.set(119.5)
    bridge.end_pass()
    assert not cache.is_resident("periodic") and bridge.num_predictive_loads == 0
    assert sorted(cache.resident_ids()) == ["other", "rare"]
    assert cache.stats()["evictions"] == 0


def test_queue_policy_keeps_no_histogram():
    bridge, cache, _, clock = make_bridge()
    bridge.arrivals = None  # what predictive=False builds
    for i in range(6):
        arrive(bridge, clock, "periodic", 20.0 * i)
    clock.set(119.5)
    bridge.end_pass()
    assert not cache.is_resident("periodic")
    assert bridge.prefetch_policy == "queue"
