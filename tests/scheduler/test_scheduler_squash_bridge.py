"""Squash-and-requeue inside SGLang's scheduler (SchedulerBridge), with fake SGLang objects.

The policy's squash itself is tested in ``test_scheduler_bypass.py``; these tests check when the
bridge plans a squash and how it takes the request out of SGLang's running batch.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List

from chameleon_sglang.sglang_scheduler import SchedulerBridge


class FakeReq:
    def __init__(self, rid: str, done: bool = False) -> None:
        self.rid = rid
        self._done = done

    def finished(self) -> bool:
        return self._done


class FakeBatch:
    """The part of SGLang's ScheduleBatch a squash uses."""

    def __init__(self, reqs: List[FakeReq]) -> None:
        self.reqs = list(reqs)
        self.released: List[tuple] = []
        self.batch_is_full = True

    def is_empty(self) -> bool:
        return not self.reqs

    def release_req(self, idx: int, remaining: int) -> bool:
        self.released.append((self.reqs[idx].rid, remaining))
        return True

    def filter_batch(self, keep_indices: List[int]) -> None:
        self.reqs = [self.reqs[i] for i in keep_indices]


class FakePolicy:
    def __init__(self, bypasses: List[Any], heads: Dict[int, Any]) -> None:
        self.queue = SimpleNamespace(running_bypasses=lambda: bypasses,
                                     head=lambda q: heads.get(q))
        self.calls: List[tuple] = []

    def squash(self, rid: str) -> int:
        self.calls.append(("squash", rid))
        return 0

    def on_retracted(self, rid: str) -> None:
        self.calls.append(("retracted", rid))


def _entry(rid: str, order: int, adapter: str | None, queue: int = 0) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, order=order, adapter_id=adapter, queue=queue)


def _bridge(policy: FakePolicy, resident: bool = True) -> SchedulerBridge:
    bridge = SchedulerBridge.__new__(SchedulerBridge)  # no SGLang scheduler needed
    requeued: List[tuple] = []
    bridge.scheduler = SimpleNamespace(
        waiting_queue=[],
        _add_request_to_queue=lambda req, is_retracted=False: (
            requeued.append((req.rid, is_retracted)), bridge.scheduler.waiting_queue.append(req)))
    bridge.requeued = requeued  # type: ignore[attr-defined]
    bridge.policy = policy
    pool = SimpleNamespace(is_resident=lambda adapter: resident)
    bridge.cache = SimpleNamespace(pool=pool)
    bridge.lora_manager = SimpleNamespace(loras={})
    bridge._now = 0.0
    bridge._squash_pending, bridge._squashing = {}, set()
    bridge._memory_blocked, bridge._running, bridge._waiting = {}, {}, {}
    bridge._num_departures = 0
    bridge.num_retractions = 0
    return bridge


def test_bypass_is_planned_for_squash_when_the_head_can_now_place_its_adapter():
    """A running bypass is squashed when the older head it passed was refused for memory and
    its adapter can now be placed."""
    head, bypass = _entry("h", 1, "big"), _entry("b", 2, "small")
    bridge = _bridge(FakePolicy([bypass], {0: head}))
    req = FakeReq("b")
    bridge._running["b"] = (req, bypass)
    bridge._memory_blocked["h"] = (0, 0)
    bridge._plan_squashes()
    assert bridge._squash_pending == {"b": req}


def test_no_squash_unless_the_head_was_refused_for_memory_with_a_placeable_adapter():
    """No squash while the head's adapter still cannot be placed, when the head was not refused
    for memory, or when the 'head' is younger than the bypass."""
    head, bypass = _entry("h", 1, "big"), _entry("b", 2, "small")
    for resident, blocked, head_order in ((False, True, 1), (True, False, 1), (True, True, 3)):
        head.order = head_order
        bridge = _bridge(FakePolicy([bypass], {0: head}), resident=resident)
        bridge._running["b"] = (FakeReq("b"), bypass)
        if blocked:
            bridge._memory_blocked["h"] = (0, 0)
        bridge._plan_squashes()
        assert bridge._squash_pending == {}, (resident, blocked, head_order)


def test_squash_takes_the_request_out_of_the_running_batch_and_requeues_it():
    """At SGLang's retraction point the planned request's KV is released, it leaves the batch,
    and it re-enters the waiting queue as retracted; the others keep running."""
    reqs = [FakeReq("a"), FakeReq("b"), FakeReq("c")]
    bridge = _bridge(FakePolicy([], {}))
    bridge._squash_pending = {"b": reqs[1]}
    batch = FakeBatch(reqs)
    bridge.apply_squashes(batch)
    assert batch.released == [("b", 2)]
    assert [r.rid for r in batch.reqs] == ["a", "c"]
    assert batch.batch_is_full is False
    assert bridge.requeued == [("b", True)]
    assert bridge._squash_pending == {} and bridge._squashing == {"b"}


def test_finished_requests_are_not_squashed():
    """A planned request that finished meanwhile is left alone."""
    reqs = [FakeReq("a"), FakeReq("b", done=True)]
    bridge = _bridge(FakePolicy([], {}))
    bridge._squash_pending = {"b": reqs[1]}
    batch = FakeBatch(reqs)
    bridge.apply_squashes(batch)
    assert batch.released == [] and len(batch.reqs) == 2 and bridge.requeued == []


def test_a_squashed_request_goes_back_behind_the_head_not_to_the_front():
    """Re-entering the queue, a squashed request is squashed in the policy (arrival order), not
    treated as a retraction (queue front), and is not counted as a retraction."""
    policy = FakePolicy([], {})
    bridge = _bridge(policy)
    req = FakeReq("b")
    bridge._running["b"] = (req, _entry("b", 2, "small"))
    bridge._squashing.add("b")
    bridge.scheduler.waiting_queue.append(req)
    bridge.on_enqueue(req, is_retracted=True)
    assert policy.calls == [("squash", "b")]
    assert bridge.num_retractions == 0 and "b" not in bridge._squashing
    other = FakeReq("c")
    bridge._running["c"] = (other, _entry("c", 3, "small"))
    bridge.scheduler.waiting_queue.append(other)
    bridge.on_enqueue(other, is_retracted=True)
    assert policy.calls[-1] == ("retracted", "c") and bridge.num_retractions == 1
