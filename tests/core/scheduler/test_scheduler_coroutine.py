"""Algorithm 1 as a coroutine (``iter_pass``), the form SGLang's pull-style prefill loop drives."""

from __future__ import annotations

from typing import List

from scheduler_factories import ADMITTED, QUEUE_MISFIT, STOP, fill, ids, make_queue


def drive(mlq, verdicts: dict) -> tuple:
    """Pull candidates from ``iter_pass``, answering from ``verdicts`` (default ADMITTED)."""
    seen: List[str] = []
    steps = mlq.iter_pass(now=1.0)
    try:
        entry = next(steps)
        while True:
            seen.append(entry.request_id)
            entry = steps.send(verdicts.get(entry.request_id, ADMITTED))
    except StopIteration as done:
        return seen, done.value


def test_iter_pass_matches_schedule_pass():
    """Driving the coroutine by hand gives the same admissions as the callback form."""
    spec = [(0, 10), (0, 10), (1, 50), (2, 80), (3, 200), (0, 10)]
    verdicts = {"r2": QUEUE_MISFIT}
    a, b = make_queue(), make_queue()
    fill(a, spec)
    fill(b, spec)
    seen, by_hand = drive(a, verdicts)
    by_callback = b.schedule_pass(lambda e: verdicts.get(e.request_id, ADMITTED), now=1.0)
    assert ids(by_hand.admitted) == ids(by_callback.admitted)
    assert by_hand.donated == by_callback.donated
    assert "r2" in seen and "r2" not in ids(by_hand.admitted)


def test_closing_early_with_stop_ends_the_pass():
    """Answering STOP ends the pass: no queue after it gets a turn."""
    mlq = make_queue()
    fill(mlq, [(0, 10), (1, 10), (2, 10)])
    seen, result = drive(mlq, {"r1": STOP})
    assert seen == ["r0", "r1"]
    assert ids(result.admitted) == ["r0"]
    assert result.is_stopped


def test_every_candidate_is_offered_once():
    """The coroutine offers each waiting request at most once per pass."""
    mlq = make_queue()
    fill(mlq, [(0, 10)] * 3 + [(1, 10)] * 2)
    seen, result = drive(mlq, {})
    assert len(seen) == len(set(seen)) == 5
    assert ids(result.admitted) == seen
