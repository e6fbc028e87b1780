"""The residency channel: replica reports reach the controller, latest per replica, sent only when
they change, never blocking the replica; malformed messages are skipped; load counted once."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import zmq

from chameleon_sglang.dp.affinity import ReplicaReport
from chameleon_sglang.dp.residency_channel import (
    DEFAULT_OUTPUT_CAP,
    ResidencyPublisher,
    ResidencyReader,
    decode_report,
    encode_report,
    replica_load_tokens,
    residency_endpoint,
)


@pytest.fixture
def endpoint(tmp_path):
    return f"ipc://{tmp_path}/residency"


def drain_until(reader, count, timeout=5.0):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got.extend(reader.drain())
        time.sleep(0.01)
    return got


def test_the_endpoint_is_shared_by_one_launch_and_differs_between_launches():
    a = residency_endpoint("ipc:///tmp/tokenizer_abc")
    assert a == residency_endpoint("ipc:///tmp/tokenizer_abc") and a.startswith("ipc://")
    assert a != residency_endpoint("ipc:///tmp/tokenizer_xyz")


@pytest.mark.parametrize("received", [None, 0, 17])
def test_a_report_round_trips(received):
    report = ReplicaReport(
        replica=3, adapters=frozenset({"a", "b"}), load_tokens=900, received=received
    )
    assert decode_report(encode_report(report)) == report


@pytest.mark.parametrize(
    "message",
    [
        b"not json",
        b"[1, 2]",
        b'{"replica": "x"}',
        b'{"replica": 1, "adapters": "a", "load_tokens": 3}',
        b'{"replica": 1, "adapters": [], "load_tokens": 3, "received": "7"}',
    ],
)
def test_a_malformed_report_is_refused(message):
    with pytest.raises(ValueError):
        decode_report(message)


def test_reports_reach_the_reader_latest_per_replica(endpoint):
    reader = ResidencyReader(endpoint)
    first, second = ResidencyPublisher(endpoint, 0), ResidencyPublisher(endpoint, 1)
    try:
        assert first.publish({"a"}, 10)
        assert second.publish({"b"}, 20)
        assert first.publish({"a", "c"}, 30)
        time.sleep(0.2)
        reports = reader.drain()
        assert reports == [
            ReplicaReport(0, frozenset({"a", "c"}), 30),
            ReplicaReport(1, frozenset({"b"}), 20),
        ]
        assert reader.num_received == 3 and reader.drain() == []
    finally:
        first.close(), second.close(), reader.close()


def test_an_unchanged_report_is_not_sent_again(endpoint):
    reader = ResidencyReader(endpoint)
    publisher = ResidencyPublisher(endpoint, 0)
    try:
        assert publisher.publish(["a", "b"], 5)
        assert not publisher.publish(["b", "a"], 5)
        assert publisher.publish(["b", "a"], 6)
        assert publisher.num_sent == 2
        latest = None
        deadline = time.monotonic() + 5.0
        while (latest is None or latest.load_tokens != 6) and time.monotonic() < deadline:
            latest = next(iter(reader.drain()), latest)
            time.sleep(0.01)
        assert latest is not None and latest.load_tokens == 6
        assert latest.adapters == frozenset({"a", "b"})
    finally:
        publisher.close(), reader.close()


def test_a_malformed_message_is_skipped_and_the_rest_is_kept(endpoint):
    reader = ResidencyReader(endpoint)
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.connect(endpoint)
    publisher = ResidencyPublisher(endpoint, 2)
    try:
        raw.send(b"garbage")
        time.sleep(0.1)
        publisher.publish({"x"}, 1)
        got = drain_until(reader, 1)
        assert got == [ReplicaReport(2, frozenset({"x"}), 1)] and reader.num_malformed == 1
    finally:
        raw.close(linger=0), publisher.close(), reader.close()


def test_publishing_never_blocks_when_the_controller_is_gone(endpoint):
    publisher = ResidencyPublisher(endpoint, 0)  # nobody bound: messages cannot leave
    try:
        started = time.monotonic()
        for load in range(1000):
            publisher.publish({"a"}, load)
        assert time.monotonic() - started < 2.0
        assert publisher.num_dropped > 0
    finally:
        publisher.close()


def req(rid, prompt, cap, finished=False, generated=0):
    return SimpleNamespace(
        rid=rid,
        origin_input_ids=[0] * prompt,
        output_ids=[1] * generated,
        sampling_params=SimpleNamespace(max_new_tokens=cap),
        finished=lambda: finished,
    )


def test_the_load_counts_each_unfinished_request_once():
    a, b = req("a", 10, 5), req("b", 7, None)
    done = req("c", 100, 100, finished=True)
    assert replica_load_tokens([a, b, a, done]) == 15 + 7 + DEFAULT_OUTPUT_CAP


def test_a_decoding_request_counts_only_the_output_it_has_left():
    waiting, decoding = req("w", 100, 20), req("d", 100, 20, generated=5)
    assert replica_load_tokens([waiting, decoding]) == 120 + 15
    assert replica_load_tokens([req("x", 100, 20, generated=30)]) == 0  # past its cap: nothing
