"""The hooks that hand an SGLang event to one installed component (``hooks/forward.py``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, List

from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.integration.hooks.forward import call_after, call_before
from chameleon_sglang.integration.state import ChameleonState, attach_state, forget_state


class Recorder:
    def __init__(self) -> None:
        self.calls: List[tuple] = []

    def report(self, **kwargs: Any) -> None:
        self.calls.append(("report", kwargs))

    def on_received(self, value: Any) -> None:
        self.calls.append(("on_received", value))


def scheduler_with_reporter() -> tuple:
    scheduler, recorder = SimpleNamespace(), Recorder()
    attach_state(scheduler, ChameleonState(ChameleonConfig(), reporter=recorder))
    return scheduler, recorder


def test_after_hooks_call_the_component_and_return_sglangs_result():
    scheduler, recorder = scheduler_with_reporter()
    try:
        assert call_after("reporter", "report")("result", scheduler) == "result"
        assert call_after("reporter", "report", force=True)(None, scheduler) is None
        batch = object()
        call_after("reporter", "report", result_as="batch")(batch, scheduler, 1, x=2)
        assert recorder.calls == [
            ("report", {}),
            ("report", {"force": True}),
            ("report", {"batch": batch}),
        ]
    finally:
        forget_state(scheduler)


def test_before_hooks_pass_the_targets_argument_positionally_or_by_name():
    scheduler, recorder = scheduler_with_reporter()
    try:
        hook = call_before("reporter", "on_received", "recv_req")
        assert hook(scheduler, "first") is None
        hook(scheduler, recv_req="named")
        assert recorder.calls == [("on_received", "first"), ("on_received", "named")]
    finally:
        forget_state(scheduler)


def test_a_scheduler_without_the_component_is_left_alone():
    bare = SimpleNamespace()  # no Chameleon state at all
    assert call_after("cache", "settle_finished")("r", bare) == "r"
    assert call_before("bridge", "apply_squashes", "batch")(bare, "batch") is None
    scheduler, recorder = scheduler_with_reporter()
    try:
        assert call_after("cache", "settle_finished")("r", scheduler) == "r"  # no cache installed
        assert recorder.calls == []
    finally:
        forget_state(scheduler)
