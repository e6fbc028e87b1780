"""The pure parts of the adapter tiers: background reads, the host tier, load-failure backoff."""

from __future__ import annotations

import threading
import time

import pytest

from chameleon_sglang.cache.eviction import create_eviction_policy
from chameleon_sglang.catalog.background_reads import BackgroundReads
from chameleon_sglang.catalog.host_tier import HostTier
from chameleon_sglang.catalog.load_failures import LoadFailures


# -- background reads ---------------------------------------------------------------------------
def _wait_done(reads: BackgroundReads, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(done for done, _ in reads.status()) < count:
        assert time.monotonic() < deadline, reads.status()
        time.sleep(0.005)


def test_reads_run_off_the_callers_thread_and_come_back_in_order():
    reads = BackgroundReads(workers=2, timeout_s=10)
    callers = []
    gate = threading.Event()

    def read(value):
        def run():
            callers.append(threading.current_thread().name)
            if value == "slow":
                gate.wait(5)
            return value

        return run

    for key in ("slow", "a", "b"):
        reads.submit(key, read(key), payload=f"req-{key}")
    _wait_done(reads, 2)
    status = reads.status()
    assert status[0] == (False, False) and status[1:] == [(True, True), (True, True)]
    taken = reads.take(status)
    assert [(o.key, o.value, o.payload) for o in taken] == [
        ("a", "a", "req-a"),
        ("b", "b", "req-b"),
    ]
    assert reads.pending_keys() == ["slow"]
    gate.set()
    _wait_done(reads, 1)
    assert [o.value for o in reads.take(reads.status())] == ["slow"]
    assert threading.current_thread().name not in callers
    assert reads.stats()["reads"] == 3 and reads.stats()["latency_cumulative"][-1] == 3


def test_a_failed_read_fails_only_its_own_load():
    reads = BackgroundReads(workers=1, timeout_s=10)

    def boom():
        raise OSError("disk on fire")

    reads.submit("bad", boom)
    reads.submit("good", lambda: 7)
    _wait_done(reads, 2)
    bad, good = reads.take(reads.status())
    assert isinstance(bad.error, OSError) and bad.value is None
    assert good.error is None and good.value == 7
    assert reads.stats()["failures"] == 1


def test_a_hung_read_times_out_and_the_other_worker_goes_on():
    now = [0.0]
    reads = BackgroundReads(workers=2, timeout_s=5, clock=lambda: now[0])
    hang = threading.Event()
    reads.submit("hung", lambda: hang.wait(30))
    reads.submit("fine", lambda: "ok")
    _wait_done(reads, 1)
    assert reads.status() == [(False, False), (True, True)]
    now[0] = 6.0
    assert reads.status() == [(True, False), (True, True)]
    hung, fine = reads.take(reads.status())
    assert isinstance(hung.error, TimeoutError) and "5 s" in str(hung.error)
    assert fine.value == "ok" and reads.stats()["timeouts"] == 1
    hang.set()


def test_ranks_agree_a_read_failed_when_another_rank_failed_it():
    reads = BackgroundReads(workers=1, timeout_s=10)
    reads.submit("x", lambda: "fine here")
    _wait_done(reads, 1)
    (outcome,) = reads.take([(True, False)])  # done everywhere, failed on another rank
    assert outcome.error is not None and "another rank" in str(outcome.error)


def test_take_needs_one_status_per_pending_read():
    reads = BackgroundReads(workers=1, timeout_s=10)
    reads.submit("x", lambda: 1)
    with pytest.raises(ValueError):
        reads.take([])


# -- host tier ----------------------------------------------------------------------------------
def _tier(budget: int) -> HostTier:
    return HostTier(budget, create_eviction_policy("chameleon", (0.45, 0.10, 0.45), 300.0), 300.0)


def test_the_host_tier_drops_small_cold_adapters_first_until_it_fits():
    tier = _tier(1000)
    tier.admit("big-hot", 600, pinned=False, now=0)
    tier.admit("small-cold", 100, pinned=False, now=1)
    tier.admit("mid", 400, pinned=False, now=2)
    for t in range(3, 8):
        tier.on_request(["big-hot"], now=t)
    assert tier.used_bytes == 1100
    assert tier.victims(lambda name: False, now=8) == ["small-cold"]
    assert tier.victims(lambda name: False, now=8) == ["small-cold"]  # it only chooses


def test_the_host_tier_never_chooses_pinned_or_in_use_adapters():
    tier = _tier(100)
    tier.admit("pinned", 300, pinned=True, now=0)
    tier.admit("held", 300, pinned=False, now=0)
    tier.admit("idle", 300, pinned=False, now=0)
    assert tier.victims(lambda name: name == "held", now=1) == ["idle"]  # still over: no more
    tier.remove("idle", is_eviction=True)
    assert tier.victims(lambda name: name == "held", now=1) == []
    assert tier.stats()["evictions"] == 1 and tier.stats()["evicted_bytes"] == 300


def test_host_tier_hits_and_misses():
    tier = _tier(10_000)
    tier.on_request(["a"], now=0)
    tier.admit("a", 10, pinned=False, now=0)
    tier.on_request(["a", "b"], now=1)
    stats = tier.stats()
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (1, 2, round(1 / 3, 4))


# -- load failures ------------------------------------------------------------------------------
def test_failed_loads_back_off_exponentially_up_to_the_cap():
    failures = LoadFailures(base_s=1.0, max_s=4.0)
    assert failures.refusal("x", now=0) is None
    failures.record("x", "truncated", now=0)
    assert "truncated" in failures.refusal("x", now=0.5) and failures.refusal("x", now=1.0) is None
    failures.record("x", "truncated", now=1.0)  # second in a row: 2 s
    assert failures.refusal("x", now=2.9) and failures.refusal("x", now=3.0) is None
    for _ in range(5):
        failures.record("x", "truncated", now=10.0)
    assert failures.refusal("x", now=13.9) and failures.refusal("x", now=14.0) is None
    failures.clear("x")
    failures.record("x", "again", now=20.0)
    assert failures.refusal("x", now=21.0) is None  # back to 1 s after a success


def test_failure_memory_is_bounded():
    failures = LoadFailures(capacity=3)
    for i in range(10):
        failures.record(f"n{i}", "bad", now=0)
    assert len(failures) == 3 and failures.refusal("n0", now=0) is None
    assert failures.refusal("n9", now=0) is not None


def test_host_tier_bytes_follow_admissions_and_removals():
    tier = _tier(10_000)
    tier.admit("a", 100, pinned=False, now=0)
    tier.admit("a", 150, pinned=False, now=1)  # admitted again (reloaded): counted once
    tier.admit("b", 50, pinned=True, now=1)
    assert (tier.used_bytes, len(tier), sorted(tier.names())) == (200, 2, ["a", "b"])
    tier.remove("a")
    tier.remove("unknown")
    assert tier.used_bytes == 50 and tier.stats()["evictions"] == 0


def test_room_by_count_takes_the_first_to_go_that_no_request_holds():
    tier = _tier(10_000)
    tier.admit("pinned", 10, pinned=True, now=0)
    tier.admit("held", 10, pinned=False, now=0)
    tier.admit("cold", 10, pinned=False, now=0)
    tier.admit("hot", 10, pinned=False, now=0)
    for t in range(1, 5):
        tier.on_request(["hot"], now=t)
    in_use = lambda name: name == "held"  # noqa: E731
    assert tier.victims_by_count(1, in_use, now=5) == ["cold"]
    assert tier.victims_by_count(5, in_use, now=5) == ["cold", "hot"]  # never pinned or held
    assert tier.victims_by_count(0, in_use, now=5) == []
