"""A replica's reports (chameleon_sglang.integration.dp_reporter) over a real residency channel, on
a scheduler-shaped fake: the count of requests received (health checks aside) and the requests of a
batch just formed, which SGLang keeps in no queue until it runs, are in every report."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from chameleon_sglang.dp.residency_channel import ResidencyPublisher, ResidencyReader
from chameleon_sglang.integration.dp_reporter import ReplicaReporter


class Mode:
    def __init__(self, extend: bool) -> None:
        self.extend = extend

    def is_extend(self) -> bool:
        return self.extend


def req(rid, prompt, cap, generated=0, adapter=None):
    return SimpleNamespace(
        rid=rid,
        origin_input_ids=[0] * prompt,
        output_ids=[1] * generated,
        sampling_params=SimpleNamespace(max_new_tokens=cap),
        lora_id=adapter,
        finished=lambda: False,
    )


@pytest.fixture
def channel(tmp_path):
    reader = ResidencyReader(f"ipc://{tmp_path}/res")
    publisher = ResidencyPublisher(reader.endpoint, 0)
    yield reader, publisher
    publisher.close()
    reader.close()


def latest(reader):
    deadline = time.monotonic() + 5
    reports = []
    while time.monotonic() < deadline and not reports:
        reader.socket.poll(10)
        reports = reader.drain()
    return reports[-1]


def test_reports_carry_the_requests_received_and_a_batch_just_formed(channel):
    reader, publisher = channel
    scheduler = SimpleNamespace(
        waiting_queue=[req("w", 100, 20, adapter="a")],
        running_batch=SimpleNamespace(reqs=[req("d", 50, 20, 5)]),
        last_batch=None,
        cur_batch_for_debug=None,
        chunked_req=None,
    )
    reporter = ReplicaReporter(scheduler, publisher, dp_rank=0)
    reporter.on_received(SimpleNamespace(rid="x1"))
    reporter.on_received(SimpleNamespace(rid="HEALTH_CHECK_1"))  # not the dispatcher's
    assert reporter.report(force=True)
    first = latest(reader)
    assert first.received == 1 and first.load_tokens == 120 + 15 and first.adapters == {"a"}
    # a prefill batch just formed: its request left the waiting queue and is in no batch yet
    formed = SimpleNamespace(reqs=[scheduler.waiting_queue.pop()], forward_mode=Mode(True))
    assert reporter.report(force=True, batch=formed)
    assert latest(reader).load_tokens == 120 + 15
    # while it runs, SGLang holds it as the current batch
    scheduler.cur_batch_for_debug = formed
    assert not reporter.report(force=True)  # nothing changed: nothing sent
    scheduler.cur_batch_for_debug = None
    assert reporter.report(force=True)
    assert latest(reader).load_tokens == 15
