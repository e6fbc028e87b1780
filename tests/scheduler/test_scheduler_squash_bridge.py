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


class _FakeQueue:
    """The part of MultiLevelQueue a squash plan reads (``get`` raises for unknown ids)."""

    def __init__(self, bypasses: List[Any], heads: Dict[int, Any], entries: Dict[str, Any]):
        self._bypasses, self._heads, self._entries = bypasses, heads, entries

    def running_bypasses(self) -> List[Any]:
        return self._bypasses

    def head(self, queue: int) -> Any:
        return self._heads.get(queue)

    def get(self, rid: str) -> Any:
        return self._entries[rid]

    def __contains__(self, rid: object) -> bool:
        return rid in self._entries


class FakePolicy:
    def __init__(self, bypasses: List[Any], heads: Dict[int, Any]) -> None:
        entries = {e.request_id: e for e in [*bypasses, *heads.values()]}
        self.queue = _FakeQueue(bypasses, heads, entries)
        self.calls: List[tuple] = []

    def squash(self, rid: str) -> int:
        self.calls.append(("squash", rid))
        return 0

    def on_retracted(self, rid: str) -> None:
        self.calls.append(("retracted", rid))


def _entry(rid: str, order: int, adapter: str | None, queue: int = 0) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, order=order, adapter_id=adapter, queue=queue)


def _req(rid: str, prompt: int, output: int = 0, max_new: int = 16,
         adapter: str | None = None) -> SimpleNamespace:
    """The part of SGLang's Req a squash plan reads."""
    return SimpleNamespace(rid=rid, origin_input_ids=[1] * prompt, output_ids=[2] * output,
                           sampling_params=SimpleNamespace(max_new_tokens=max_new),
                           lora_id=adapter, finished=lambda: False)


ADAPTER_TOKENS = {"big": 300}


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
    bridge.config = SimpleNamespace(bypass=True)
    bridge.lora_manager = SimpleNamespace(loras={})
    bridge._adapter_tokens = dict(ADAPTER_TOKENS)
    bridge.adapters_in_kv_memory = True
    bridge._now = 0.0
    bridge._squash_pending, bridge._squashing = {}, set()
    bridge._memory_blocked, bridge._running, bridge._waiting = {}, {}, {}
    bridge._num_departures = 0
    bridge.num_retractions = 0
    return bridge


def _refused_head_scene(free_tokens: int, resident: bool = False, bypass_order: int = 2,
                        bypass_queue: int = 0):
    """A head (prompt 100, 16 new tokens, adapter 'big' of 300 tokens) refused with
    ``free_tokens`` left, and one running bypass holding 150 KV tokens."""
    head, bypass = _entry("h", 1, "big"), _entry("b", bypass_order, "small", bypass_queue)
    bridge = _bridge(FakePolicy([bypass], {0: head}), resident=resident)
    running = _req("b", prompt=120, output=30)
    bridge._running["b"] = (running, bypass)
    head_req = _req("h", prompt=100, max_new=16, adapter="big")
    bridge._waiting["h"] = head_req
    bridge._plan_squashes_for(head_req, SimpleNamespace(rem_total_tokens=free_tokens))
    return bridge, running


def test_bypass_is_planned_for_squash_when_its_memory_is_what_keeps_the_head_out():
    """The head needs its adapter (300) + prompt (100) + new tokens (16) = 416; 300 are free and
    the bypass holds 150: with the bypass gone the head fits, so the bypass is planned."""
    bridge, running = _refused_head_scene(free_tokens=300)
    assert bridge._squash_pending == {"b": (running, "h")}


def test_no_squash_while_the_head_would_not_fit_even_without_the_bypass():
    """Memory has not freed yet (free + held < need): the bypass keeps running (the paper's bet
    that it finishes before the head's memory frees still stands)."""
    bridge, _ = _refused_head_scene(free_tokens=200)
    assert bridge._squash_pending == {}


def test_a_resident_adapter_is_not_counted_in_the_heads_need():
    """With its adapter resident the head needs only 116 tokens: 100 free are short, and the
    bypass's 150 make up the difference."""
    bridge, running = _refused_head_scene(free_tokens=100, resident=True)
    assert bridge._squash_pending == {"b": (running, "h")}


def test_only_younger_bypasses_of_the_heads_own_queue_are_squashed():
    """A bypass older than the head, or in another queue, is never squashed for it."""
    for order, queue in ((0, 0), (2, 1)):
        bridge, _ = _refused_head_scene(free_tokens=300, bypass_order=order, bypass_queue=queue)
        assert bridge._squash_pending == {}, (order, queue)


def test_a_plan_is_dropped_when_the_head_is_no_longer_waiting():
    """If the head got in (or left) before SGLang's next retraction point, nothing is squashed."""
    bridge, running = _refused_head_scene(free_tokens=300)
    del bridge._waiting["h"]
    batch = FakeBatch([running])
    bridge.apply_squashes(batch)
    assert batch.released == [] and bridge.requeued == [] and bridge._squash_pending == {}


def test_squash_takes_the_request_out_of_the_running_batch_and_requeues_it():
    """At SGLang's retraction point the planned request's KV is released, it leaves the batch,
    and it re-enters the waiting queue as retracted; the others keep running."""
    reqs = [FakeReq("a"), FakeReq("b"), FakeReq("c")]
    bridge = _bridge(FakePolicy([], {}))
    bridge._squash_pending = {"b": (reqs[1], "h")}
    bridge._waiting["h"] = FakeReq("h")
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
    bridge._squash_pending = {"b": (reqs[1], "h")}
    bridge._waiting["h"] = FakeReq("h")
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


def test_a_refused_request_the_policy_does_not_know_plans_nothing():
    """Only a queue head the policy tracks can cause a squash."""
    bypass = _entry("b", 2, "small")
    bridge = _bridge(FakePolicy([bypass], {}))
    bridge._running["b"] = (_req("b", prompt=120, output=30), bypass)
    bridge._plan_squashes_for(_req("stranger", prompt=10, adapter="big"),
                              SimpleNamespace(rem_total_tokens=0))
    assert bridge._squash_pending == {}
