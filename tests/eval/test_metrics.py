"""Percentiles, throughput, per-run metrics, medians and queueing shares on known inputs."""

from __future__ import annotations

import dataclasses

import pytest
from eval_factories import result

from eval.loadgen import STATUS_ERROR, STATUS_NOT_SENT, STATUS_TIMEOUT
from eval.metrics import (
    ARM_KEYS,
    QUEUE_SOURCE_ESTIMATE,
    QUEUE_SOURCE_SERVER,
    client_lag,
    median_metrics,
    percentile,
    queueing_share,
    ratio,
    run_metrics,
    throughput_rps,
)
from eval.warmup import UnloadedProfile, fit_profile


def test_percentile_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([4, 1, 3, 2], 0) == 1.0 and percentile([4, 1, 3, 2], 100) == 4.0
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_throughput_completed_over_first_send_to_last_completion():
    rs = [
        result(0, sent=0.0, e2e=2.0),
        result(1, sent=1.0, e2e=2.0),
        result(2, sent=2.0, e2e=2.0),
        result(3, sent=0.5, status=STATUS_ERROR),
    ]
    assert throughput_rps(rs) == pytest.approx(3 / 4.0)
    assert throughput_rps([result(0, status=STATUS_ERROR)]) is None
    assert throughput_rps([]) is None


def test_client_lag_is_send_minus_scheduled_arrival():
    on_time = [
        dataclasses.replace(result(i, sent=i + 0.001), arrival_s=float(i)) for i in range(99)
    ]
    late = dataclasses.replace(result(99, sent=100.5), arrival_s=99.0)
    unsent = dataclasses.replace(result(100, status=STATUS_NOT_SENT, sent=None), arrival_s=100.0)
    lag = client_lag(on_time + [late, unsent])
    assert lag["client_lag_max_s"] == pytest.approx(1.5)
    assert lag["client_lag_p99_s"] == pytest.approx(0.001 + 0.01 * 1.499)
    assert client_lag([unsent]) == {"client_lag_p99_s": None, "client_lag_max_s": None}


def test_run_metrics_on_known_results():
    rs = [
        result(0, ttft=0.1, e2e=1.0, tbt=(0.01, 0.03), retractions=1),
        result(1, sent=1.0, ttft=0.3, e2e=2.0, tbt=(0.02,)),
        result(2, status=STATUS_TIMEOUT, sent=2.0),
        result(3, status=STATUS_NOT_SENT, sent=None),
    ]
    m = run_metrics(rs, cache_hit_rate=0.75)
    assert set(m) == set(ARM_KEYS)
    assert m["ttft_p50"] == pytest.approx(0.2)
    assert m["ttft_p99"] == pytest.approx(0.1 + 0.2 * 0.99)
    assert m["tbt_p50"] == pytest.approx(0.02)
    assert m["e2e_p50"] == pytest.approx(1.5)
    assert (m["completed"], m["failed"], m["retractions"]) == (2, 2, 1)
    assert m["throughput_rps"] == pytest.approx(2 / 3.0)
    assert m["cache_hit_rate"] == 0.75


def test_median_over_repetitions():
    a = run_metrics([result(0, ttft=0.1), result(1, ttft=0.1)])
    b = run_metrics([result(0, ttft=0.3)])
    c = run_metrics([result(0, ttft=0.2), result(1, ttft=0.2), result(2, ttft=0.2)])
    med = median_metrics([a, b, c])
    assert med["ttft_p50"] == pytest.approx(0.2)
    assert med["completed"] == 2 and isinstance(med["completed"], int)
    assert med["cache_hit_rate"] is None
    assert median_metrics([a, b])["completed"] in (1, 2)


def test_queueing_share_from_server_queue_times():
    rs = [
        result(0, e2e=2.0, queue=0.5, size_class="small"),
        result(1, e2e=2.0, queue=0.0, size_class="small"),
        result(2, e2e=4.0, queue=1.0, size_class="large"),
    ]
    q = queueing_share(rs, None)
    assert q["small"]["share"] == pytest.approx(0.125) and q["small"]["n"] == 2
    assert q["large"]["share"] == pytest.approx(0.25)
    assert q["medium"]["share"] is None and q["medium"]["n"] == 0
    assert q["small"]["source"] == QUEUE_SOURCE_SERVER


def test_queueing_share_estimated_from_unloaded_prefill():
    profile = UnloadedProfile(
        intercept_s=0.05,
        per_token_s=0.001,
        num_probes=4,
        ttft_mean_s=0.1,
        tbt_mean_s=0.01,
        e2e_mean_s=0.2,
    )
    rs = [
        result(0, ttft=0.55, e2e=2.0, input_len=100),  # prefill 0.15 -> queue 0.4
        result(1, ttft=0.10, e2e=1.0, input_len=100),
    ]  # faster than unloaded -> 0
    q = queueing_share(rs, profile)
    assert q["small"]["share"] == pytest.approx(0.4 / 3.0)
    assert q["small"]["source"] == QUEUE_SOURCE_ESTIMATE


def test_fit_profile_recovers_a_line():
    rs = [
        result(i, ttft=0.02 + 0.0005 * n, input_len=n, e2e=1.0, tbt=(0.01,))
        for i, n in enumerate([8, 100, 200, 400, 512])
    ]
    p = fit_profile(rs)
    assert p.intercept_s == pytest.approx(0.02) and p.per_token_s == pytest.approx(0.0005)
    assert p.prefill_s(300) == pytest.approx(0.17)
    assert p.tbt_mean_s == pytest.approx(0.01)
    assert fit_profile([]).num_probes == 0


def test_ratio():
    assert ratio(1.0, 2.0) == 0.5
    assert ratio(None, 2.0) is None and ratio(1.0, 0.0) is None
