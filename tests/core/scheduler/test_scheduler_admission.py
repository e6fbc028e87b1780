"""The multi-level queue and Algorithm 1 (batch formation), one rule per test."""

from __future__ import annotations

import pytest
from scheduler_factories import (
    QUEUE_MISFIT,
    STOP,
    ScriptedEngine,
    admit_all,
    fill,
    ids,
    make_entry,
    make_queue,
)

from chameleon_sglang.scheduler import QueueLayout


def test_add_classifies_by_wrs():
    """A new request joins the queue its WRS falls in."""
    mlq = make_queue()
    fill(mlq, [(3, 10), (0, 10), (2, 10)])
    assert [mlq.get(r).queue for r in ("r0", "r1", "r2")] == [3, 0, 2]
    assert ids(mlq) == ["r1", "r2", "r0"]  # iteration: queue 0 first


def test_duplicate_request_id_is_rejected():
    """A request id can be queued only once."""
    mlq = make_queue()
    fill(mlq, [(0, 10)])
    with pytest.raises(ValueError):
        mlq.add(make_entry("r0"))


def test_phase1_admits_fifo_and_stops_at_first_quota_misfit():
    """Phase 1 admits in FIFO order while charges fit the quota and stops at the first misfit."""
    mlq = make_queue([100])
    fill(mlq, [(0, 40), (0, 40), (0, 40), (0, 10)])
    result = mlq.schedule_pass(admit_all)
    assert ids(result.admitted) == ["r0", "r1"]  # r3 would fit but is behind the misfit r2
    assert mlq.usage == (80,)


def test_queue_misfit_stops_only_that_queue():
    """QUEUE_MISFIT stops its queue for the pass; later queues still get their turn."""
    mlq = make_queue([100, 100])
    fill(mlq, [(0, 10), (0, 10), (1, 10)])
    engine = ScriptedEngine({"r0": QUEUE_MISFIT})
    result = mlq.schedule_pass(engine)
    assert ids(result.admitted) == ["r2"]
    assert engine.calls == ["r0", "r2"]


def test_queue_that_did_not_drain_donates_nothing():
    """A queue with requests still waiting after its turn donates no quota."""
    mlq = make_queue([100, 100])
    fill(mlq, [(1, 90)], prefix="s")
    mlq.schedule_pass(admit_all)
    fill(mlq, [(0, 60), (0, 60), (1, 50)])
    result = mlq.schedule_pass(admit_all)
    assert result.donated == (0, 0)
    assert ids(result.admitted) == ["r0"]  # queue 0's spare 40 would have let r2 (50) in
    assert mlq.num_waiting(0) == 1 and mlq.num_waiting(1) == 1


def test_drained_queue_donates_its_remainder_to_phase2():
    """A queue that empties donates quota - usage; phase 2 lends it to a blocked queue."""
    mlq = make_queue([100, 100])
    fill(mlq, [(0, 30), (1, 80), (1, 80)])
    result = mlq.schedule_pass(admit_all)
    assert result.donated == (70, 0)
    assert ids(result.admitted_phase1) == ["r0", "r1"]
    assert ids(result.admitted_phase2) == ["r2"]  # 80 <= own 20 + donated 70
    assert mlq.usage == (30, 160)


def test_empty_queue_donates_its_whole_quota():
    """A queue with nothing waiting donates all of its unused quota."""
    mlq = make_queue([100, 100])
    fill(mlq, [(1, 100), (1, 100)])
    result = mlq.schedule_pass(admit_all)
    assert result.donated == (100, 0)
    assert ids(result.admitted_phase2) == ["r1"]


def test_phase2_serves_smallest_queue_first():
    """Donations go to the smallest blocked queue first, in FIFO order."""
    mlq = make_queue([100, 50, 50])
    fill(mlq, [(1, 50), (1, 60), (2, 50), (2, 60)])
    result = mlq.schedule_pass(admit_all)
    assert result.donated == (100, 0, 0)
    assert ids(result.admitted_phase2) == ["r1"]  # 60 from the pool of 100; 40 left < 60
    assert mlq.num_waiting(2) == 1


def test_phase2_continues_the_same_stop_at_first_misfit_rule():
    """In phase 2 a queue stops at its first request that does not fit its share plus the pool."""
    mlq = make_queue([10, 10])
    fill(mlq, [(1, 10), (1, 50), (1, 5)])
    result = mlq.schedule_pass(admit_all)
    assert ids(result.admitted) == ["r0"]  # pool 10 < 50: r2 stays behind r1


def test_stop_ends_the_pass():
    """STOP ends the whole pass: no later request or queue is tried."""
    mlq = make_queue([100, 100])
    fill(mlq, [(0, 10), (0, 10), (1, 10)])
    engine = ScriptedEngine({"r1": STOP})
    result = mlq.schedule_pass(engine)
    assert result.is_stopped
    assert engine.calls == ["r0", "r1"]
    assert ids(result.admitted) == ["r0"]
    assert mlq.get("r1").queue == 0 and not mlq.get("r1").is_running


def test_pass_cut_by_stop_resumes_at_the_queue_it_cut_off():
    """After a STOP the next pass starts at the first queue that missed its turn, wrapping round."""
    mlq = make_queue([100, 100, 100])
    fill(mlq, [(0, 10), (0, 10), (2, 10)])
    mlq.schedule_pass(ScriptedEngine({"r1": STOP}))  # queue 0 had its turn (admitted r0)
    engine = ScriptedEngine()
    result = mlq.schedule_pass(engine)
    assert result.turn_order == (1, 2, 0)
    assert engine.calls == ["r2", "r1"]
    assert mlq.schedule_pass(admit_all).turn_order == (0, 1, 2)


def test_queue_stopped_before_admitting_keeps_first_turn():
    """A queue whose head got STOP without admitting anything goes first next pass."""
    mlq = make_queue([100, 100])
    fill(mlq, [(1, 10)])
    mlq.schedule_pass(ScriptedEngine({"r0": STOP}))
    assert mlq.schedule_pass(admit_all).turn_order == (1, 0)


def test_idle_queue_admits_an_oversized_head_alone():
    """A request larger than its queue's whole quota runs when nothing else of its queue runs."""
    mlq = make_queue([100])
    fill(mlq, [(0, 500), (0, 10)])
    assert ids(mlq.schedule_pass(admit_all).admitted) == ["r0"]
    assert ids(mlq.schedule_pass(admit_all).admitted) == []  # usage 500 > quota: blocked
    mlq.release("r0")
    assert ids(mlq.schedule_pass(admit_all).admitted) == ["r1"]


def test_memory_misfit_in_phase1_withholds_lending():
    """A phase-1 QUEUE_MISFIT keeps phase 2 from lending donations that memory can't back."""
    mlq = make_queue([100, 100, 100])
    fill(mlq, [(1, 90), (1, 90), (2, 50)])
    result = mlq.schedule_pass(ScriptedEngine({"r2": QUEUE_MISFIT}))
    assert result.donated == (100, 0, 0)
    assert result.is_lending_withheld
    assert ids(result.admitted) == ["r0"]


def test_admission_stamps_time_and_marks_running():
    """An admitted entry is running, stamped with the pass time and charged to its queue."""
    mlq = make_queue([100])
    fill(mlq, [(0, 25)])
    mlq.schedule_pass(admit_all, now=12.5)
    entry = mlq.get("r0")
    assert entry.is_running and entry.admitted_s == 12.5
    assert mlq.usage == (25,) and mlq.remaining(0) == 75 and mlq.num_running == 1


def test_retracted_request_goes_to_its_queue_head():
    """A retracted request returns its charge and becomes the head of its queue."""
    mlq = make_queue([100])
    fill(mlq, [(0, 30), (0, 30), (0, 50)])
    mlq.schedule_pass(admit_all)  # r0, r1
    mlq.requeue_front("r1")
    assert ids(mlq) == ["r1", "r2"]
    assert mlq.usage == (30,)
    mlq.requeue_front("r0")
    assert ids(mlq) == ["r0", "r1", "r2"]


def test_rebin_keeps_relative_order():
    """Re-binning on a new layout keeps each queue's requests in their previous relative order."""
    mlq = make_queue([100, 100, 100, 100])
    fill(mlq, [(3, 10), (0, 10), (2, 10), (1, 10), (0, 10)])
    mlq.schedule_pass(ScriptedEngine({"r1": QUEUE_MISFIT, "r3": QUEUE_MISFIT, "r2": STOP}))
    mlq.set_layout(QueueLayout(), [400])
    assert ids(mlq) == ["r0", "r1", "r2", "r3", "r4"]
    assert mlq.num_queues == 1


def test_rebin_puts_retracted_requests_first_and_recomputes_usage():
    """Retracted heads stay ahead after a re-bin; usage follows running charges to new queues."""
    mlq = make_queue([100, 100])
    fill(mlq, [(0, 10), (1, 20), (1, 5)])
    mlq.schedule_pass(ScriptedEngine({"r2": QUEUE_MISFIT}))  # r0, r1 run
    mlq.requeue_front("r1")
    mlq.set_layout(QueueLayout(), [200])
    assert ids(mlq) == ["r1", "r2"]
    assert mlq.usage == (10,)


def test_release_returns_the_charge():
    """Finishing a request gives its whole charge back to its queue."""
    mlq = make_queue([100])
    fill(mlq, [(0, 40), (0, 40)])
    mlq.schedule_pass(admit_all)
    mlq.release("r0")
    assert mlq.usage == (40,) and "r0" not in mlq


def test_release_of_a_waiting_request_is_an_error():
    """Only running requests can finish."""
    mlq = make_queue([100])
    fill(mlq, [(0, 400), (0, 10)])
    mlq.schedule_pass(admit_all)
    with pytest.raises(ValueError):
        mlq.release("r1")


def test_abort_removes_waiting_or_running_requests():
    """Abort forgets a request; a running one gives its charge back; unknown ids are ignored."""
    mlq = make_queue([100])
    fill(mlq, [(0, 40), (0, 70)])
    mlq.schedule_pass(admit_all)
    assert mlq.remove("r1") is not None and len(mlq) == 0
    assert mlq.remove("r0") is not None and mlq.usage == (0,)
    assert mlq.remove("nope") is None


def test_update_charge_grows_with_output_and_never_shrinks():
    """A running request that outgrows its prediction is charged for its real output."""
    mlq = make_queue([100])
    mlq.add(make_entry("r0", charge=30, predicted_output=10))
    mlq.schedule_pass(admit_all)
    assert mlq.update_charge("r0", 5) == 30
    assert mlq.update_charge("r0", 25) == 45
    assert mlq.usage == (45,)
    mlq.release("r0")
    assert mlq.usage == (0,)


def test_grown_charge_over_quota_blocks_only_new_admissions():
    """Usage may exceed the quota after growth; it only blocks the queue's next admissions."""
    mlq = make_queue([100])
    mlq.add(make_entry("r0", charge=60, predicted_output=10))
    fill(mlq, [(0, 10)], prefix="s")
    mlq.schedule_pass(ScriptedEngine({"s0": QUEUE_MISFIT}))
    mlq.update_charge("r0", 200)
    assert mlq.usage == (250,) and mlq.get("r0").is_running
    assert ids(mlq.schedule_pass(admit_all).admitted) == []


def test_quotas_must_match_the_layout():
    """One non-negative quota per queue."""
    with pytest.raises(ValueError):
        make_queue([100, 100], cutoffs=())
    with pytest.raises(ValueError):
        make_queue([-1])


def test_integrity_holds_through_admissions_finishes_and_retractions_and_catches_corruption():
    """The queue's own invariant check is clean over a pass, a finish and a retraction, and
    names a usage that no longer matches the running charges."""
    mlq = make_queue([100, 100, 100, 100])
    fill(mlq, [(0, 30), (1, 20), (2, 10), (0, 5)])
    assert mlq.integrity_problems() == []
    mlq.schedule_pass(admit_all)
    assert mlq.integrity_problems() == []
    mlq.remove("r1")
    mlq.requeue_front("r0")
    assert mlq.integrity_problems() == []
    mlq._usage[2] += 7  # a charge returned twice / never returned
    assert any("usage" in p for p in mlq.integrity_problems())
