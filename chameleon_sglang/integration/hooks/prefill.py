"""The two calls patch 0006 inserts into ``Scheduler._get_new_batch_prefill_raw``.

Imported with SGLang's scheduler module (through :mod:`~chameleon_sglang.integration.
patch_api`), so it imports nothing of SGLang at load time. Without ``--chameleon`` both return
SGLang's own iterable and verdict, so the loop is exactly SGLang's.
"""

from __future__ import annotations

from typing import Any, Iterable

from chameleon_sglang.integration.state import state_of


def prefill_candidates(scheduler: Any, adder: Any, running_batch: Any) -> Iterable[Any]:
    """The requests the prefill loop should consider, in order (SGLang's queue when inactive)."""
    state = state_of(scheduler)
    if state is None:
        return scheduler.waiting_queue
    if state.cache is not None:
        state.cache.begin_pass(adder)
    bridge = state.bridge
    if bridge is None:
        return scheduler.waiting_queue
    now = bridge.begin_pass()
    if state.scheduler_metrics is not None:
        state.scheduler_metrics.maybe_publish(now, bridge.snapshot)
    return bridge.candidates(adder, running_batch)


def prefill_pass_continues(
    scheduler: Any, adder: Any, running_batch: Any, req: Any, res: Any
) -> bool:
    """After ``add_one_req`` answered ``res`` (not CONTINUE): keep walking other candidates?

    SGLang's answer is always no. Chameleon's: yes when only this request did not fit the
    memory budget and capacity remains for smaller ones; its queue stops, the others go on.
    """
    state = state_of(scheduler)
    if state is None or state.bridge is None:
        return False
    from sglang.srt.managers.schedule_policy import AddReqResult

    return state.bridge.after_rejection(
        adder,
        running_batch,
        req,
        memory_short=res == AddReqResult.NO_TOKEN,
        budget_spent=adder.budget_state() == AddReqResult.NO_TOKEN,
    )
