"""The gateway benchmark's report: bytes loaded over every server (whole run and after warm-up),
hit rate, TTFT after warm-up, requests per server and balance, ratios of routing by adapter to
the gateway's own policies."""

from __future__ import annotations

import pytest
from eval_factories import result

from eval import bench_gateway


def server(loaded, hits=0, misses=0, dp_requests=None):
    return [{"bytes_loaded": loaded, "hits": hits, "misses": misses, "dp_requests": dp_requests}]


def test_an_arm_row_sums_every_server_and_counts_after_the_warm_cut():
    results = [result(i, sent=float(i), ttft=0.1 * (i + 1)) for i in range(10)]
    results.append(result(10, status="error", ttft=None))
    before = [server(0), server(0)]
    at_cut = [server(300, 1, 3), server(100, 0, 2)]
    after = [server(500, 6, 4), server(100, 4, 2)]
    row = bench_gateway.summarize("prefix_hash", results, before, at_cut, after, [7, 3], 5.0)
    assert row["completed"] == 10 and row["failed"] == 1
    assert row["bytes_loaded"] == 600 and row["bytes_after_warm"] == 200
    assert row["hit_rate"] == pytest.approx(10 / 16)
    assert row["requests_per_server"] == [7, 3] and row["balance"] == pytest.approx(1.4)
    assert row["ttft_p99_after_warm"] == pytest.approx(
        bench_gateway.percentile([0.6, 0.7, 0.8, 0.9, 1.0], 99)
    )


def test_the_dp_reference_counts_requests_per_replica_from_its_own_counters():
    one_server = [{"bytes_loaded": 0, "hits": 0, "misses": 0, "dp_requests": 5}] * 2
    after = [
        [
            {"bytes_loaded": 10, "hits": 1, "misses": 1, "dp_requests": 9},
            {"bytes_loaded": 20, "hits": 1, "misses": 1, "dp_requests": 8},
        ]
    ]
    row = bench_gateway.summarize(
        bench_gateway.DP_REFERENCE, [result(0)], [one_server], None, after, [99], 0.0
    )
    assert row["requests_per_server"] == [4, 3] and row["bytes_after_warm"] is None
    assert row["bytes_loaded"] == 30


def test_ratios_put_routing_by_adapter_over_each_gateway_policy_only():
    rows = {
        "prefix_hash": {"bytes_loaded": 100, "bytes_after_warm": 10, "ttft_p50": 1, "ttft_p99": 2},
        "round_robin": {"bytes_loaded": 400, "bytes_after_warm": 0, "ttft_p50": 1, "ttft_p99": 4},
        bench_gateway.DP_REFERENCE: {"bytes_loaded": 50},
    }
    r = bench_gateway.ratios(rows)
    assert list(r) == ["round_robin"]
    assert r["round_robin"] == {
        "bytes_loaded": 0.25,
        "bytes_after_warm": None,  # nothing to divide by
        "ttft_p50": 1.0,
        "ttft_p99": 0.5,
    }
