import json

import pytest
from cache_factories import BYTES_PER_SLOT, FakeSlotStore, load, make_cache

from chameleon_sglang.cache import AdapterCache, CacheFullError
from chameleon_sglang.config import ChameleonConfig


def nbytes(num_slots):
    return num_slots * BYTES_PER_SLOT


def test_idle_adapter_stays_resident_after_release():
    """Releasing the last reference keeps the adapter cached and its memory held."""
    cache, store = make_cache(total_slots=10)
    cache.admit("a", nbytes(4), 8, now=0.0)
    cache.acquire("a", now=0.0)
    cache.release("a", now=5.0)
    assert cache.is_resident("a")
    assert cache.lookup("a").refcount == 0 and cache.lookup("a").last_use == 5.0
    assert store.num_free_slots() == 6


def test_release_below_zero_raises():
    """Releasing an adapter no request holds is an error."""
    cache, _ = make_cache()
    cache.admit("a", nbytes(1), 8, now=0.0)
    with pytest.raises(ValueError, match="refcount 0"):
        cache.release("a", now=1.0)


def test_acquire_requires_a_resident_adapter():
    """Acquiring an adapter that was never admitted raises KeyError."""
    cache, _ = make_cache()
    with pytest.raises(KeyError):
        cache.acquire("missing", now=0.0)


def test_admit_never_evicts_an_adapter_in_use():
    """An in-use adapter is not a candidate even when it is the best by score."""
    cache, store = make_cache(total_slots=10)
    load(cache, "cold", 2, now=0.0)
    cache.acquire("cold", now=1.0)
    load(cache, "hot", 6, now=2.0, num_uses=5)
    cache.admit("new", nbytes(6), 8, now=3.0)
    assert cache.resident_ids() == ["cold", "new"]
    assert store.num_free_slots() == 2


def test_admit_fails_when_only_in_use_adapters_could_make_room():
    """can_admit is False and admit raises when the memory belongs to running requests."""
    cache, _ = make_cache(total_slots=10)
    load(cache, "a", 8, now=0.0)
    cache.acquire("a", now=1.0)
    assert not cache.can_admit("b", nbytes(5), now=2.0)
    with pytest.raises(CacheFullError):
        cache.admit("b", nbytes(5), 8, now=2.0)
    assert cache.resident_ids() == ["a"]


def test_queued_adapters_are_evicted_only_after_every_unused_idle_one():
    """Tier 2 (not queued) goes before tier 3 (queued), even when tier 3 scores lower."""
    cache, _ = make_cache(total_slots=10, policy="lru")
    load(cache, "queued_old", 3, now=0.0)
    load(cache, "unused_new", 3, now=5.0)
    evicted = cache.evict_for(3, now=10.0, queued=frozenset({"queued_old"}))
    assert evicted == ["unused_new"]
    assert cache.is_resident("queued_old")


def test_queued_adapters_are_evicted_when_memory_forces_it():
    """When tier 2 cannot cover the need, queued adapters go next, lowest score first."""
    cache, _ = make_cache(total_slots=10, policy="lru")
    load(cache, "q1", 3, now=1.0)
    load(cache, "q2", 3, now=0.0)
    load(cache, "u", 3, now=5.0)
    evicted = cache.evict_for(5, now=10.0, queued=frozenset({"q1", "q2"}))
    assert evicted == ["u", "q2"]
    stats = cache.stats()
    assert stats["evictions_by_tier"] == {"unused": 1, "queued": 1}
    assert stats["evictions_by_reason"]["make_room"] == 2


def test_prefetch_never_evicts_a_queued_adapter():
    """A prefetch may only evict tier 2: nothing forces it to displace a queued adapter."""
    cache, _ = make_cache(total_slots=10)
    load(cache, "q", 8, now=0.0)
    queued = frozenset({"q", "p"})
    assert not cache.can_admit("p", nbytes(5), now=1.0, queued=queued, prefetch=True)
    with pytest.raises(CacheFullError):
        cache.admit("p", nbytes(5), 8, now=1.0, queued=queued, prefetch=True)
    assert cache.can_admit("p", nbytes(5), now=1.0, queued=queued)
    assert cache.is_resident("q")


def test_evict_for_is_all_or_nothing():
    """evict_for raises without evicting when idle adapters cannot free enough."""
    cache, _ = make_cache(total_slots=10)
    load(cache, "a", 2, now=0.0)
    load(cache, "b", 2, now=0.0)
    assert cache.reclaimable_slots() == 4
    with pytest.raises(CacheFullError):
        cache.evict_for(5, now=1.0)
    assert cache.resident_ids() == ["a", "b"]


def test_shrink_to_free_stops_as_soon_as_enough_is_free():
    """shrink_to_free evicts idle adapters in order only until the store has the slots asked."""
    cache, store = make_cache(total_slots=20, policy="lru")
    for i, t in enumerate((0.0, 1.0, 2.0, 3.0)):
        load(cache, f"a{i}", 4, now=t)
    kv = store.alloc(4)
    assert kv is not None and store.num_free_slots() == 0
    freed = cache.shrink_to_free(7, now=10.0)
    assert freed == 8
    assert cache.resident_ids() == ["a2", "a3"]
    assert store.num_free_slots() == 8
    assert cache.stats()["evictions_by_reason"]["kv_pressure"] == 2


def test_shrink_to_free_never_touches_adapters_in_use():
    """Under KV pressure every idle adapter may go, an in-use one never."""
    cache, store = make_cache(total_slots=10)
    load(cache, "busy", 4, now=0.0)
    cache.acquire("busy", now=0.0)
    load(cache, "idle", 4, now=1.0)
    freed = cache.shrink_to_free(10, now=2.0)
    assert freed == 4
    assert cache.resident_ids() == ["busy"]
    assert store.num_free_slots() == 6


def test_shrink_to_free_does_nothing_when_the_store_has_room():
    """No eviction when the store already has the slots asked for."""
    cache, _ = make_cache(total_slots=10)
    load(cache, "a", 4, now=0.0)
    assert cache.shrink_to_free(6, now=1.0) == 0
    assert cache.is_resident("a")


def test_reclaimable_slots_counts_idle_entries_by_tier():
    """All idle slots count by default; with a queued set only tier-2 slots count."""
    cache, _ = make_cache(total_slots=20)
    load(cache, "busy", 5, now=0.0)
    cache.acquire("busy", now=0.0)
    load(cache, "q", 3, now=0.0)
    load(cache, "u", 2, now=0.0)
    assert cache.reclaimable_slots() == 5
    assert cache.reclaimable_slots(frozenset({"q"})) == 2


def test_can_admit_and_admit_agree():
    """can_admit is True exactly when admit succeeds; a refused admit changes nothing."""
    cache, store = make_cache(total_slots=10)
    load(cache, "a", 6, now=0.0)
    cache.acquire("a", now=0.0)
    load(cache, "b", 3, now=0.0)
    assert not cache.can_admit("c", nbytes(5), now=1.0)
    before = (cache.resident_ids(), store.allocations(), cache.stats())
    with pytest.raises(CacheFullError):
        cache.admit("c", nbytes(5), 8, now=1.0)
    assert (cache.resident_ids(), store.allocations(), cache.stats()) == before
    assert cache.can_admit("c", nbytes(4), now=1.0)
    cache.admit("c", nbytes(4), 8, now=1.0)
    assert cache.resident_ids() == ["a", "c"]


def test_admit_of_a_resident_adapter_is_a_hit_and_allocates_nothing():
    """A second admit returns the same entry, counts a hit and takes no memory."""
    cache, store = make_cache(total_slots=10)
    first = cache.admit("a", nbytes(3), 8, now=0.0)
    second = cache.admit("a", nbytes(3), 8, now=1.0)
    assert second is first
    assert store.num_free_slots() == 7
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (1, 1)


def test_admit_with_another_size_is_refused():
    """An id already resident with different bytes is a caller error."""
    cache, _ = make_cache()
    cache.admit("a", nbytes(3), 8, now=0.0)
    with pytest.raises(ValueError, match="resident with"):
        cache.can_admit("a", nbytes(4), now=1.0)
    with pytest.raises(ValueError, match="resident with"):
        cache.admit("a", nbytes(4), 8, now=1.0)


def test_drop_while_in_use_is_deferred_until_the_last_release():
    """An unloaded adapter in use keeps its memory until its last request releases it."""
    cache, store = make_cache(total_slots=10)
    cache.admit("a", nbytes(4), 8, now=0.0)
    cache.acquire("a", now=0.0)
    cache.acquire("a", now=1.0)
    assert cache.drop("a") is False
    assert not cache.is_resident("a") and cache.lookup("a") is not None
    assert not cache.can_admit("a", nbytes(4), now=2.0)
    with pytest.raises(ValueError):
        cache.acquire("a", now=2.0)
    cache.release("a", now=3.0)
    assert store.num_free_slots() == 6
    cache.release("a", now=4.0)
    assert cache.lookup("a") is None and store.num_free_slots() == 10
    assert cache.stats()["evictions_by_reason"]["unload"] == 1


def test_drop_of_an_idle_adapter_frees_it_now():
    """Unloading an idle adapter frees its memory at once; unknown ids are ignored."""
    cache, store = make_cache(total_slots=10)
    load(cache, "a", 4, now=0.0)
    assert cache.drop("a") is True
    assert cache.lookup("a") is None and store.num_free_slots() == 10
    assert cache.drop("a") is False


def test_stats_count_hits_misses_and_bytes_loaded():
    """Misses load bytes, hits load nothing; hit_rate = hits / (hits + misses); JSON-able."""
    cache, _ = make_cache(total_slots=100)
    for adapter_id, num_bytes in (("a", 25), ("b", 40), ("a", 25), ("a", 25)):
        cache.admit(adapter_id, num_bytes, 8, now=0.0)
    stats = json.loads(json.dumps(cache.stats()))
    assert (stats["hits"], stats["misses"], stats["bytes_loaded"]) == (2, 2, 65)
    assert stats["hit_rate"] == 0.5
    assert (stats["num_resident"], stats["resident_bytes"], stats["resident_slots"]) == (2, 65, 7)


def test_stats_track_the_most_adapters_in_use_at_once():
    """max_distinct_in_use is the peak number of adapters with refcount > 0."""
    cache, _ = make_cache(total_slots=100)
    for adapter_id in ("a", "b", "c"):
        cache.admit(adapter_id, nbytes(1), 8, now=0.0)
    for adapter_id in ("a", "a", "b", "c"):
        cache.acquire(adapter_id, now=0.0)
    cache.release("c", now=1.0)
    cache.release("a", now=1.0)
    assert cache.stats()["num_in_use"] == 2
    assert cache.stats()["max_distinct_in_use"] == 3


def test_prefetch_load_is_not_a_miss_and_turns_the_admission_into_a_hit():
    """A prefetch counts as a prefetch load (bytes loaded); the request's admit is then a hit."""
    cache, _ = make_cache(total_slots=10)
    cache.admit("a", nbytes(2), 8, now=0.0, prefetch=True)
    cache.admit("a", nbytes(2), 8, now=1.0, prefetch=True)
    cache.admit("a", nbytes(2), 8, now=2.0)
    stats = cache.stats()
    assert (stats["prefetch_loads"], stats["misses"], stats["hits"]) == (1, 0, 1)
    assert stats["bytes_loaded"] == nbytes(2)


def test_prefetch_candidates_are_missing_queued_adapters_in_order_without_repeats():
    """Resident adapters, repeats and base-model requests (None) are skipped; order is kept."""
    cache, _ = make_cache()
    load(cache, "r", 1, now=0.0)
    queue = ["c", "r", None, "a", "c", "b", "a"]
    assert cache.prefetch_candidates(queue) == ["c", "a", "b"]


def test_the_same_operations_evict_the_same_adapters_whatever_the_insertion_order():
    """Eviction does not depend on the order entries were admitted in."""

    def run(order):
        cache, _ = make_cache(total_slots=10)
        for adapter_id in order:
            load(cache, adapter_id, 2, now=0.0)
        return cache.evict_for(4, now=1.0)

    assert run(["d", "b", "a", "c"]) == run(["a", "b", "c", "d"]) == ["a", "b"]


def test_from_config_uses_the_configured_policy_and_window():
    """The cache built from ChameleonConfig has its eviction policy and frequency window."""
    config = ChameleonConfig(eviction_policy="gdsf", frequency_window_s=60.0)
    cache = AdapterCache.from_config(FakeSlotStore(10, 1), config)
    assert cache.policy.name == "gdsf" and cache.policy.window_s == 60.0
    default = AdapterCache.from_config(FakeSlotStore(10, 1), ChameleonConfig())
    assert default.policy.name == "chameleon" and default.policy.weights == (0.45, 0.10, 0.45)
