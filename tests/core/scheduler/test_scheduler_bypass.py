"""Opportunistic bypass (paper §4.3) and squash-and-requeue."""

from __future__ import annotations

from typing import Dict

import pytest
from scheduler_factories import (
    ADAPTER_MISFIT,
    QUEUE_MISFIT,
    ScriptedEngine,
    ids,
    make_entry,
    make_queue,
)

from chameleon_sglang.scheduler import BypassHooks, MultiLevelQueue, RequestEntry


def make_hooks(
    resident: tuple[str, ...] = ("hot",),
    free_at: float = 100.0,
    finish: Dict[str, float] | None = None,
) -> BypassHooks:
    """Adapters in ``resident`` are resident; the head frees at ``free_at``; finishes from
    ``finish`` by request id (default: the predicted output)."""
    finish = finish or {}
    return BypassHooks(
        is_adapter_resident=lambda adapter: adapter in resident,
        predicted_free_at=lambda head: free_at,
        predicted_finish_at=lambda e: finish.get(e.request_id, float(e.predicted_output)),
    )


def blocked_head_queue(*, bypass: bool = True) -> MultiLevelQueue:
    """Queue 0: head h (cold adapter) then y1 (cold) and y2 (hot), all charge 10."""
    mlq = make_queue([100], bypass=bypass)
    for rid, adapter in (("h", "cold"), ("y1", "cold"), ("y2", "hot")):
        mlq.add(make_entry(rid, adapter_id=adapter, predicted_output=5))
    return mlq


def test_younger_resident_request_bypasses_a_head_whose_adapter_misfits():
    """Head ADAPTER_MISFIT: the first younger request with a resident adapter that finishes
    before the head's memory frees is admitted; the head stays at the head."""
    mlq = blocked_head_queue()
    engine = ScriptedEngine({"h": ADAPTER_MISFIT})
    result = mlq.schedule_pass(engine, hooks=make_hooks(free_at=10.0))
    assert ids(result.admitted) == ["y2"]
    assert result.num_bypasses == 1 and mlq.num_bypasses == 1
    assert mlq.get("y2").is_bypass
    assert ids(mlq) == ["h", "y1"]
    assert engine.calls == ["h", "y2"]


def test_no_bypass_when_candidate_would_finish_after_memory_frees():
    """A candidate that would finish at or after the head's memory frees does not bypass."""
    mlq = blocked_head_queue()
    result = mlq.schedule_pass(ScriptedEngine({"h": ADAPTER_MISFIT}), hooks=make_hooks(free_at=5.0))
    assert ids(result.admitted) == [] and mlq.num_bypasses == 0


def test_no_bypass_without_a_resident_adapter():
    """Only requests whose adapter is resident may bypass."""
    mlq = blocked_head_queue()
    result = mlq.schedule_pass(
        ScriptedEngine({"h": ADAPTER_MISFIT}), hooks=make_hooks(resident=("other",))
    )
    assert ids(result.admitted) == []


def test_base_model_request_counts_as_resident():
    """A base-model request needs no adapter and may bypass."""
    mlq = make_queue([100])
    mlq.add(make_entry("h", adapter_id="cold", predicted_output=5))
    mlq.add(make_entry("b", adapter_id=None, predicted_output=5))
    result = mlq.schedule_pass(ScriptedEngine({"h": ADAPTER_MISFIT}), hooks=make_hooks(resident=()))
    assert ids(result.admitted) == ["b"]


def test_no_bypass_when_disabled_or_without_hooks():
    """Bypass needs both the switch and the engine's estimates."""
    cases = ((blocked_head_queue(bypass=False), make_hooks()), (blocked_head_queue(), None))
    for mlq, hooks in cases:
        result = mlq.schedule_pass(ScriptedEngine({"h": ADAPTER_MISFIT}), hooks=hooks)
        assert ids(result.admitted) == []


def test_no_bypass_for_a_candidate_over_quota():
    """A bypass candidate must fit its queue's remaining quota."""
    mlq = make_queue([100])
    mlq.add(make_entry("r", charge=60, adapter_id="hot"))
    mlq.schedule_pass(ScriptedEngine())
    mlq.add(make_entry("h", charge=10, adapter_id="cold"))
    mlq.add(make_entry("big", charge=50, adapter_id="hot", predicted_output=1))
    result = mlq.schedule_pass(ScriptedEngine({"h": ADAPTER_MISFIT}), hooks=make_hooks())
    assert ids(result.admitted) == []


def test_every_eligible_younger_request_bypasses_in_fifo_order():
    """All eligible younger requests bypass a blocked head, oldest first; the head stays."""
    mlq = blocked_head_queue()
    mlq.add(make_entry("y3", adapter_id="hot", predicted_output=5))
    result = mlq.schedule_pass(ScriptedEngine({"h": ADAPTER_MISFIT}), hooks=make_hooks())
    assert ids(result.admitted) == ["y2", "y3"]
    assert [e.request_id for e in mlq][0] == "h"


def test_bypass_stops_at_a_memory_misfit_and_skips_adapter_misfits():
    """A bypass candidate that misfits memory ends the bypass; one whose adapter misfits is
    skipped."""
    mlq = blocked_head_queue()
    for rid in ("y3", "y4", "y5"):
        mlq.add(make_entry(rid, adapter_id="hot", predicted_output=5))
    engine = ScriptedEngine({"h": ADAPTER_MISFIT, "y2": ADAPTER_MISFIT, "y4": QUEUE_MISFIT})
    result = mlq.schedule_pass(engine, hooks=make_hooks())
    assert ids(result.admitted) == ["y3"]
    assert "y5" not in engine.calls


def test_squash_requeues_behind_the_head_and_returns_the_charge():
    """Squash: the bypass request goes back to its arrival position (behind the head it
    bypassed), gives its charge back, and is counted."""
    mlq = blocked_head_queue()
    mlq.schedule_pass(ScriptedEngine({"h": ADAPTER_MISFIT}), hooks=make_hooks())
    assert [e.request_id for e in mlq.running_bypasses()] == ["y2"]
    assert mlq.squash("y2") == 10
    assert ids(mlq) == ["h", "y1", "y2"]
    assert mlq.usage == (0,) and mlq.num_squashes == 1
    assert not mlq.get("y2").is_bypass


def test_squash_of_a_request_that_did_not_bypass_is_an_error():
    """Only running bypass requests can be squashed."""
    mlq = make_queue([100])
    mlq.add(make_entry("r"))
    mlq.schedule_pass(ScriptedEngine())
    with pytest.raises(ValueError):
        mlq.squash("r")


def test_default_finish_estimate_is_the_predicted_output():
    """Without a finish estimate a request finishes after its predicted output (in steps)."""
    hooks = BypassHooks(is_adapter_resident=lambda a: True, predicted_free_at=lambda h: 0.0)
    entry: RequestEntry = make_entry("r", predicted_output=7)
    assert hooks.predicted_finish_at(entry) == 7.0
