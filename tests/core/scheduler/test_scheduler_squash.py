"""The squash rule (paper §4.3) from plain data: which running bypass requests give way to a
refused head, and how many."""

from __future__ import annotations

from scheduler_factories import ADAPTER_MISFIT, ScriptedEngine, ids, make_entry, make_queue

from chameleon_sglang.scheduler import BypassHooks, MultiLevelQueue
from chameleon_sglang.scheduler.squash import admission_need, choose_victims, squash_order


def queue_with_bypasses(num_bypasses: int = 2) -> MultiLevelQueue:
    """Queue 0: head h (cold adapter, blocked) and younger requests y1..yN (hot) that run by
    bypass; queue 1: its own head o (hot), which runs."""
    mlq = make_queue([1000, 1000], cutoffs=(0.2,))
    mlq.add(make_entry("h", adapter_id="cold", predicted_output=5))
    for i in range(1, num_bypasses + 1):
        mlq.add(make_entry(f"y{i}", adapter_id="hot", predicted_output=1))
    mlq.add(make_entry("o", queue=1, adapter_id="hot", predicted_output=1))
    hooks = BypassHooks(
        is_adapter_resident=lambda a: a == "hot", predicted_free_at=lambda head: 100.0
    )
    result = mlq.schedule_pass(ScriptedEngine({"h": ADAPTER_MISFIT}), hooks=hooks)
    assert ids(result.admitted) == [*(f"y{i}" for i in range(1, num_bypasses + 1)), "o"]
    return mlq


def test_younger_bypasses_of_the_heads_queue_give_way_youngest_first():
    mlq = queue_with_bypasses(3)
    assert ids(squash_order(mlq, "h")) == ["y3", "y2", "y1"]


def test_requests_already_planned_are_left_out():
    mlq = queue_with_bypasses(3)
    assert ids(squash_order(mlq, "h", exclude={"y3"})) == ["y2", "y1"]


def test_only_a_queue_head_the_policy_tracks_can_cause_a_squash():
    """A request that is not its queue's head, or that the policy does not know, squashes
    nobody; nor does a head whose queue has no bypasses (``o``'s queue: it ran normally)."""
    mlq = queue_with_bypasses()
    mlq.add(make_entry("late", adapter_id="cold", predicted_output=5))
    assert squash_order(mlq, "late") == []
    assert squash_order(mlq, "stranger") == []
    mlq.add(make_entry("o2", queue=1, adapter_id="cold"))
    assert squash_order(mlq, "o2") == []


def test_bypasses_older_than_the_head_or_of_another_queue_never_give_way():
    """A bypass that arrived before the head (it bypassed an earlier head), or that runs in
    another queue, is not squashed for this head."""
    mlq = queue_with_bypasses(1)
    older = mlq.get("y1")
    older.order = mlq.get("h").order - 1  # as if it had arrived first
    assert squash_order(mlq, "h") == []
    older.order, older.queue = mlq.get("h").order + 1, 1
    assert squash_order(mlq, "h") == []


def test_a_bypass_whose_memory_lets_the_head_in_is_chosen():
    """The head needs its adapter (300) + prompt (100) + new tokens (16) = 416; 300 are free
    and the bypass holds 150: with the bypass gone the head fits."""
    assert choose_victims(416, 300, [("b", 150)]) == ["b"]


def test_no_squash_while_the_head_would_not_fit_even_without_the_bypasses():
    """Memory has not freed yet (free + held < need): the bypasses keep running (the paper's
    bet that they finish before the head's memory frees still stands)."""
    assert choose_victims(416, 200, [("b", 150)]) == []
    assert choose_victims(416, 100, [("b", 150), ("c", 150)]) == []


def test_as_few_as_needed_in_the_order_given():
    assert choose_victims(100, 0, [("y3", 60), ("y2", 60), ("y1", 60)]) == ["y3", "y2"]
    assert choose_victims(100, 100, [("y3", 60)]) == []  # the head fits already


def test_a_resident_adapter_is_not_counted_in_the_heads_need():
    assert admission_need(100, 16, 4096, missing_adapter_tokens=300) == 416
    assert admission_need(100, 16, 4096, missing_adapter_tokens=0) == 116
    assert admission_need(100, 10_000, 4096, missing_adapter_tokens=0) == 4196  # clipped
