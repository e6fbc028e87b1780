"""Properties of the adapter cache under random operation sequences."""

from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, List, Optional, Tuple

from cache_factories import make_cache
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon_sglang.cache import EVICTION_POLICY_NAMES, CacheFullError

IDS = ["a0", "a1", "a2", "a3", "a4", "a5"]
NUM_BYTES = {"a0": 15, "a1": 30, "a2": 7, "a3": 60, "a4": 25, "a5": 41}
TOTAL_SLOTS = 12
WINDOW_S = 30.0

queued_sets = st.frozensets(st.sampled_from(IDS), max_size=5)
admits = st.tuples(st.just("admit"), st.sampled_from(IDS), queued_sets, st.booleans())
acquires = st.tuples(st.just("acquire"), st.integers(0, 9))
releases = st.tuples(st.just("release"), st.integers(0, 9))
kv_allocs = st.tuples(st.just("kv_alloc"), st.integers(1, 8), queued_sets)
operations = st.lists(
    st.one_of(
        admits,
        admits,
        admits,
        acquires,
        acquires,
        releases,
        releases,
        kv_allocs,
        kv_allocs,
        st.tuples(st.just("kv_free"), st.integers(0, 9)),
        st.tuples(st.just("evict_for"), st.integers(1, 4), queued_sets),
        st.tuples(st.just("drop"), st.integers(0, 9)),
    ),
    min_size=5,
    max_size=50,
)
policies = st.sampled_from(EVICTION_POLICY_NAMES)
property_settings = settings(max_examples=100, deadline=None)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    resident: FrozenSet[str]
    refcounts: Dict[str, int]

    @property
    def idle(self) -> FrozenSet[str]:
        return frozenset(i for i in self.resident if self.refcounts[i] == 0)


@dataclasses.dataclass
class Step:
    op: Tuple
    before: Snapshot
    after: Snapshot
    queued: FrozenSet[str] = frozenset()
    adapter_id: Optional[str] = None
    checked: Optional[bool] = None
    succeeded: Optional[bool] = None
    kv_refused_while_reclaimable: bool = False

    @property
    def removed(self) -> FrozenSet[str]:
        return self.before.resident - self.after.resident


class Harness:
    """Runs operations on a cache over a FakeSlotStore that also plays the KV cache."""

    def __init__(self, policy: str) -> None:
        self.cache, self.store = make_cache(TOTAL_SLOTS, policy, WINDOW_S)
        self.kv_handles: List[int] = []
        self.refs: Dict[str, int] = {i: 0 for i in IDS}
        self.steps: List[Step] = []

    def snapshot(self) -> Snapshot:
        resident = frozenset(self.cache.resident_ids())
        return Snapshot(resident, {i: self.cache.lookup(i).refcount for i in resident})

    def run(self, ops: List[Tuple]) -> List[Step]:
        for index, op in enumerate(ops):
            before = self.snapshot()
            step = Step(op, before, before)
            getattr(self, "_" + op[0])(step, float(index) * 7.0, *op[1:])
            step.after = self.snapshot()
            self.steps.append(step)
            self.check_accounting()
        return self.steps

    def check_accounting(self) -> None:
        entries = [self.cache.lookup(i) for i in self.cache.resident_ids()]
        allocations = self.store.allocations()
        entry_slots = sum(e.num_slots for e in entries)
        kv_slots = sum(allocations[h] for h in self.kv_handles)
        assert self.cache.num_slots_held == entry_slots == self.store.num_allocated_slots - kv_slots
        assert sorted(allocations) == sorted([e.handle for e in entries] + self.kv_handles)
        assert all(e.refcount == self.refs[e.adapter_id] for e in entries)
        assert self.cache.stats()["resident_slots"] == entry_slots

    def _admit(self, step: Step, now: float, adapter_id: str, queued, prefetch: bool) -> None:
        step.queued = queued
        num_bytes = NUM_BYTES[adapter_id]
        step.checked = self.cache.can_admit(adapter_id, num_bytes, now, queued, prefetch=prefetch)
        try:
            self.cache.admit(adapter_id, num_bytes, 8, now, queued, prefetch=prefetch)
            step.succeeded = True
        except (CacheFullError, ValueError):
            step.succeeded = False

    def _acquire(self, step: Step, now: float, index: int) -> None:
        usable = [i for i in self.cache.resident_ids() if self.cache.is_resident(i)]
        if usable:
            adapter_id = usable[index % len(usable)]
            self.cache.acquire(adapter_id, now)
            self.refs[adapter_id] += 1
            step.adapter_id = adapter_id

    def _release(self, step: Step, now: float, index: int) -> None:
        held = [i for i in IDS if self.refs[i] > 0]
        if held:
            adapter_id = held[index % len(held)]
            self.cache.release(adapter_id, now)
            self.refs[adapter_id] -= 1
            step.adapter_id = adapter_id

    def _kv_alloc(self, step: Step, now: float, num_slots: int, queued) -> None:
        step.queued = queued
        self.cache.shrink_to_free(num_slots, now, queued)
        handle = self.store.alloc(num_slots)
        if handle is None:
            step.kv_refused_while_reclaimable = self.cache.reclaimable_slots() > 0
        else:
            self.kv_handles.append(handle)

    def _kv_free(self, step: Step, now: float, index: int) -> None:
        if self.kv_handles:
            self.store.free(self.kv_handles.pop(index % len(self.kv_handles)))

    def _evict_for(self, step: Step, now: float, num_slots: int, queued) -> None:
        step.queued = queued
        step.checked = self.cache.reclaimable_slots() >= num_slots
        try:
            self.cache.evict_for(num_slots, now, queued)
            step.succeeded = True
        except CacheFullError:
            step.succeeded = False

    def _drop(self, step: Step, now: float, index: int) -> None:
        resident = self.cache.resident_ids()
        if resident:
            self.cache.drop(resident[index % len(resident)])


def run(policy: str, ops: List[Tuple]) -> List[Step]:
    return Harness(policy).run(ops)


@property_settings
@given(policies, operations)
def test_an_adapter_in_use_is_never_evicted(policy, ops):
    """Only adapters idle at the time of removal leave the cache."""
    for step in run(policy, ops):
        for adapter_id in step.removed:
            released_last = step.op[0] == "release" and adapter_id == step.adapter_id
            assert step.before.refcounts[adapter_id] == 0 or (
                released_last and step.before.refcounts[adapter_id] == 1
            )


@property_settings
@given(policies, operations)
def test_slots_held_match_entries_and_store_with_no_leak_or_double_free(policy, ops):
    """Cache slots == sum of entries' slots == store's allocations less KV, after every step."""
    harness = Harness(policy)
    harness.run(ops)
    for adapter_id in list(harness.cache.resident_ids()):
        while harness.refs[adapter_id] > 0:
            harness.cache.release(adapter_id, 1e6)
            harness.refs[adapter_id] -= 1
        harness.cache.drop(adapter_id)
    for handle in harness.kv_handles:
        harness.store.free(handle)
    assert harness.cache.num_slots_held == 0
    assert harness.store.num_free_slots() == TOTAL_SLOTS


@property_settings
@given(policies, operations)
def test_no_queued_adapter_is_evicted_while_an_unused_idle_one_remains(policy, ops):
    """Tier order: a queued adapter leaves only after every idle adapter no request uses."""
    for step in run(policy, ops):
        if step.op[0] not in ("admit", "kv_alloc", "evict_for"):
            continue
        evicted_queued = step.removed & step.queued
        if evicted_queued:
            assert step.before.idle - step.queued <= step.removed
            assert not (step.op[0] == "admit" and step.op[3]), "a prefetch evicted a queued adapter"


@property_settings
@given(policies, operations)
def test_checks_agree_with_acts(policy, ops):
    """can_admit True <=> admit succeeds; reclaimable_slots() >= n <=> evict_for(n) succeeds."""
    for step in run(policy, ops):
        if step.checked is not None:
            assert step.checked == step.succeeded, step.op
            if not step.succeeded:
                assert step.after == step.before


@property_settings
@given(policies, operations)
def test_a_kv_allocation_never_fails_while_an_idle_adapter_holds_memory(policy, ops):
    """After shrink_to_free, a refused KV allocation leaves no idle adapter resident."""
    assert not any(step.kv_refused_while_reclaimable for step in run(policy, ops))
