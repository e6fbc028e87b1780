"""Squash-and-requeue inside SGLang's scheduler (``SchedulerBridge``), driven as SGLang drives
it: requests enter the waiting queue, prefill passes walk the bridge's candidates, SGLang's LoRA
check vetoes a head, and at the retraction point the bridge takes planned requests out of the
running batch. SGLang's request, adder and batch are small fakes; the bridge and the policy are
real. The rule itself is tested with plain data in
``tests/core/scheduler/test_scheduler_squash.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterable, List, Optional

from chameleon_sglang.clock import SchedulerClock
from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.integration.scheduler_bridge import SchedulerBridge

BYTES_PER_SLOT = 10
ADAPTER_SLOTS = {"big": 300, "small": 20}


class FakeReq:
    """The part of SGLang's ``Req`` the bridge reads."""

    def __init__(self, rid: str, adapter: Optional[str], prompt: int, max_new: int) -> None:
        self.rid, self.lora_id = rid, adapter
        self.origin_input_ids = [1] * prompt
        self.output_ids: List[int] = []
        self.sampling_params = SimpleNamespace(max_new_tokens=max_new)
        self.done = False

    def finished(self) -> bool:
        return self.done


class FakeAdder:
    """SGLang's ``PrefillAdder`` as far as the bridge looks: who got in, what memory is left."""

    def __init__(self, rem_total_tokens: int) -> None:
        self.can_run_list: List[FakeReq] = []
        self.new_chunked_req = None
        self.rem_total_tokens = rem_total_tokens


class FakeBatch:
    """The part of SGLang's ``ScheduleBatch`` a squash uses."""

    def __init__(self, reqs: Iterable[FakeReq]) -> None:
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


class Scene:
    """One scheduler with the adapter cache: ``small`` is resident, ``big`` is not."""

    def __init__(self, resident: Iterable[str] = ("small",)) -> None:
        self.resident = set(resident)
        self.requeued: List[str] = []
        self.batch = FakeBatch(())  # SGLang's running batch
        manager = SimpleNamespace(
            configs={name: SimpleNamespace(r=8) for name in ADAPTER_SLOTS},
            loras=dict.fromkeys(ADAPTER_SLOTS),
            max_lora_rank=8,
        )
        self.scheduler = SimpleNamespace(
            server_args=SimpleNamespace(max_lora_rank=None),
            model_config=SimpleNamespace(context_len=1000),
            max_total_num_tokens=10_000,
            tp_worker=SimpleNamespace(model_runner=SimpleNamespace(lora_manager=manager)),
            waiting_queue=[],
            _add_request_to_queue=self._requeue,
        )
        config = ChameleonConfig(enabled=True, predictor="max-new-tokens")
        self.bridge = SchedulerBridge(self.scheduler, config, SchedulerClock())
        pool = SimpleNamespace(
            is_resident=lambda adapter: adapter in self.resident,
            footprint_bytes=lambda adapter: ADAPTER_SLOTS[adapter] * BYTES_PER_SLOT,
            store=SimpleNamespace(bytes_per_slot=BYTES_PER_SLOT),
        )
        self.bridge.use_adapter_cache(SimpleNamespace(pool=pool))

    def _requeue(self, req: FakeReq, is_retracted: bool = False) -> None:
        """SGLang's ``_add_request_to_queue``, with our AFTER hook."""
        self.requeued.append(req.rid)
        self.enqueue(req, is_retracted)

    def enqueue(self, req: FakeReq, is_retracted: bool = False) -> None:
        self.scheduler.waiting_queue.append(req)
        self.bridge.on_enqueue(req, is_retracted)

    def prefill_pass(
        self, admit: Iterable[str] = (), veto: Iterable[str] = (), free_tokens: int = 10_000
    ) -> List[str]:
        """One pass of SGLang's loop over the bridge's candidates: ids in ``admit`` get in,
        ids in ``veto`` are refused by the LoRA check; returns the ids offered, in order."""
        adder, offered = FakeAdder(free_tokens), []
        self.bridge.begin_pass()
        for req in self.bridge.candidates(adder, self.batch):
            offered.append(req.rid)
            if req.rid in veto:
                self.bridge.on_lora_veto(req)
            elif req.rid in admit:
                adder.can_run_list.append(req)
                self.scheduler.waiting_queue.remove(req)
                self.batch.reqs.append(req)
        return offered


def bypass_scene(free_tokens: int, resident: Iterable[str] = ("small",)) -> Scene:
    """``r`` runs (50 steps left); head ``h`` (prompt 100, 16 new tokens, adapter ``big``) is
    refused, so ``y`` (adapter ``small``, 8 new tokens) runs by bypass and holds 150 KV tokens;
    then ``h`` is refused again with ``free_tokens`` free."""
    scene = Scene(resident)
    r = FakeReq("r", "small", prompt=10, max_new=50)
    scene.enqueue(r)
    assert scene.prefill_pass(admit={"r"}) == ["r"]
    h, y = FakeReq("h", "big", prompt=100, max_new=16), FakeReq("y", "small", prompt=120, max_new=8)
    scene.enqueue(h)
    scene.enqueue(y)
    assert scene.prefill_pass(admit={"y"}, veto={"h"}) == ["h", "y"]
    assert scene.bridge.policy.queue.get("y").is_bypass
    y.output_ids = [2] * 30
    scene.prefill_pass(veto={"h"}, free_tokens=free_tokens)
    return scene


def ids(reqs: Iterable[FakeReq]) -> List[str]:
    return [req.rid for req in reqs]


def test_a_bypass_whose_memory_keeps_the_head_out_is_squashed_and_requeued_behind_it():
    """416 tokens needed (adapter 300 + prompt 100 + 16 new), 300 free, the bypass holds 150: at
    the retraction point it leaves the batch (its KV released), re-enters the waiting queue as
    squashed (behind the head, not at the front, not counted as a retraction); ``r`` runs on."""
    scene = bypass_scene(free_tokens=300)
    scene.bridge.apply_squashes(scene.batch)
    assert scene.batch.released == [("y", 1)] and ids(scene.batch.reqs) == ["r"]
    assert scene.batch.batch_is_full is False
    assert scene.requeued == ["y"]
    queue = scene.bridge.policy.queue
    assert [e.request_id for e in queue] == ["h", "y"] and queue.num_squashes == 1
    assert scene.bridge.num_retractions == 0
    assert scene.bridge.integrity_problems() == []


def test_no_squash_while_the_head_would_not_fit_even_without_the_bypass():
    scene = bypass_scene(free_tokens=200)
    scene.bridge.apply_squashes(scene.batch)
    assert scene.batch.released == [] and scene.requeued == []


def test_a_resident_adapter_is_not_counted_in_the_heads_need():
    """With ``big`` resident the head needs only 116 tokens: 100 free are short, and the
    bypass's 150 make up the difference."""
    scene = bypass_scene(free_tokens=10_000, resident=("small",))
    scene.resident.add("big")
    scene.prefill_pass(veto={"h"}, free_tokens=100)
    scene.bridge.apply_squashes(scene.batch)
    assert scene.requeued == ["y"]


def test_a_plan_is_dropped_when_the_head_is_no_longer_waiting():
    """If the head got in (or left) before SGLang's next retraction point, nothing is squashed,
    and the plan does not outlive that point."""
    scene = bypass_scene(free_tokens=300)
    head = next(req for req in scene.scheduler.waiting_queue if req.rid == "h")
    scene.scheduler.waiting_queue.remove(head)
    scene.bridge.on_waiting_abort(head)
    scene.bridge.apply_squashes(scene.batch)
    assert scene.batch.released == [] and scene.requeued == []
    scene.enqueue(head)
    scene.bridge.apply_squashes(scene.batch)
    assert scene.requeued == []


def test_finished_requests_are_not_squashed():
    scene = bypass_scene(free_tokens=300)
    next(req for req in scene.batch.reqs if req.rid == "y").done = True
    scene.bridge.apply_squashes(scene.batch)
    assert scene.batch.released == [] and len(scene.batch.reqs) == 2 and scene.requeued == []


def test_an_ordinary_retraction_goes_to_the_front_and_is_counted():
    """SGLang retracting a running request (not a squash) puts it back at its queue's head."""
    scene = Scene()
    for rid in ("a", "b"):
        scene.enqueue(FakeReq(rid, "small", prompt=10, max_new=8))
    scene.prefill_pass(admit={"a"})
    a = scene.batch.reqs.pop()
    scene.enqueue(a, is_retracted=True)
    assert [e.request_id for e in scene.bridge.policy.queue] == ["a", "b"]
    assert scene.bridge.num_retractions == 1 and scene.bridge.policy.queue.num_squashes == 0
