"""The DP comparison's report: per-replica figures read from each run's server_info, the load
imbalance, and the ratios of affinity to round robin checked against the targets."""

from __future__ import annotations

import json

import pytest

from eval import bench_dp


def state(rank, hit, loaded, requests, tokens):
    return {
        "chameleon": {
            "adapter_cache": {"hit_rate": hit, "bytes_loaded": loaded},
            "dp": {"dp_rank": rank, "num_requests": requests, "num_tokens": tokens},
        }
    }


def write_run(out, arm, states):
    d = out / "runs" / f"{arm}-r0"
    d.mkdir(parents=True)
    (d / "server_info.json").write_text(json.dumps({"internal_states": states}))


def write_timeline(out, arm, last_arrival_s, samples, ttft_s=0.1):
    """A run's requests (arrivals up to ``last_arrival_s``) and its status samples:
    ``(t_s, [bytes loaded per replica] or None)``."""
    d = out / "runs" / f"{arm}-r0"
    (d / "requests.jsonl").write_text(
        "\n".join(json.dumps({"arrival_s": t, "ttft_s": ttft_s}) for t in (0.0, last_arrival_s))
        + "\n"
    )
    (d / "status.jsonl").write_text(
        "\n".join(
            json.dumps(
                {
                    "t_s": t,
                    "chameleon_status": None
                    if loaded is None
                    else {"live": [{"adapter_cache": {"bytes_loaded": b}} for b in loaded]},
                }
            )
            for t, loaded in samples
        )
        + "\n"
    )


def test_imbalance_is_max_over_mean():
    assert bench_dp.imbalance([100, 300]) == 1.5
    assert bench_dp.imbalance([0, 0]) is None and bench_dp.imbalance([1, None]) is None


def test_the_summary_reads_every_replica_and_checks_the_targets(tmp_path):
    arms = {
        "dp-round-robin": {"ttft_p50": 1.0, "ttft_p99": 4.0},
        "dp-affinity": {"ttft_p50": 0.5, "ttft_p99": 2.0},
    }
    (tmp_path / "summary.json").write_text(json.dumps({"arms": arms}))
    write_run(
        tmp_path, "dp-round-robin", [state(1, 0.5, 600, 10, 1000), state(0, 0.4, 400, 10, 1000)]
    )
    write_run(tmp_path, "dp-affinity", [state(0, 0.9, 200, 9, 900), state(1, 0.8, 200, 11, 1300)])
    write_timeline(tmp_path, "dp-round-robin", 30.0, [(5.0, [100, 100]), (10.0, [200, 200])])
    write_timeline(
        tmp_path, "dp-affinity", 30.0, [(5.0, [100, 100]), (10.0, [150, 150])], ttft_s=0.05
    )
    s = bench_dp.dp_summary(tmp_path)
    rr, aff = s["arms"]["dp-round-robin"], s["arms"]["dp-affinity"]
    assert [r["dp_rank"] for r in rr["replicas"]] == [0, 1] and rr["bytes_loaded"] == 1000
    assert aff["imbalance_tokens"] == 1300 / 1100
    assert s["ratios_vs_round_robin"]["bytes_loaded"] == 0.4
    assert s["ratios_vs_round_robin"]["ttft_p99"] == 0.5
    assert all(s["targets_met"].values())
    text = bench_dp.format_markdown(s)
    assert "| dp-affinity |" in text and "NOT met" not in text


def test_a_missed_target_is_reported(tmp_path):
    arms = {"dp-round-robin": {"ttft_p99": 1.0}, "dp-affinity": {"ttft_p99": 1.0}}
    (tmp_path / "summary.json").write_text(json.dumps({"arms": arms}))
    write_run(tmp_path, "dp-round-robin", [state(0, 0.5, 100, 1, 10), state(1, 0.5, 100, 1, 10)])
    write_run(tmp_path, "dp-affinity", [state(0, 0.5, 100, 1, 10), state(1, 0.5, 100, 1, 30)])
    s = bench_dp.dp_summary(tmp_path)
    assert s["targets_met"] == {
        "bytes_loaded <= 0.5x": False,
        "bytes_after_warm <= 0.5x": False,
        "ttft_p99 <= 0.8x": False,
        "ttft_p99_after_warm <= 0.8x": False,
        "imbalance <= 1.25": False,
    }
    assert "NOT met" in bench_dp.format_markdown(s)


def test_mean_and_p90_ttft_come_from_the_runs_requests(tmp_path):
    arms = {"dp-round-robin": {"ttft_p99": 1.0}, "dp-affinity": {"ttft_p99": 1.0}}
    (tmp_path / "summary.json").write_text(json.dumps({"arms": arms}))
    for arm, scale in (("dp-round-robin", 1.0), ("dp-affinity", 0.5)):
        write_run(tmp_path, arm, [state(0, 0.5, 100, 1, 10), state(1, 0.5, 100, 1, 10)])
        rows = [{"ttft_s": scale * t} for t in range(1, 11)] + [{"ttft_s": None}]
        (tmp_path / "runs" / f"{arm}-r0" / "requests.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n"
        )
    s = bench_dp.dp_summary(tmp_path)
    assert s["arms"]["dp-round-robin"]["ttft_mean"] == 5.5
    assert s["arms"]["dp-round-robin"]["ttft_p90"] == pytest.approx(9.1)
    assert s["ratios_vs_round_robin"]["ttft_mean"] == 0.5
    assert "| 5.500 |" in bench_dp.format_markdown(s)


def test_ttft_after_warm_up_is_over_the_requests_arriving_after_a_third_of_the_last(tmp_path):
    """The cold start's slow requests (arrivals before 1/3 of the last arrival) are left out of
    the after-warm-up TTFT, the same cut as the bytes; requests without a TTFT are skipped."""
    arms = {"dp-round-robin": {"ttft_p99": 1.0}, "dp-affinity": {"ttft_p99": 1.0}}
    (tmp_path / "summary.json").write_text(json.dumps({"arms": arms}))
    for arm, late in (("dp-round-robin", 0.2), ("dp-affinity", 0.1)):
        write_run(tmp_path, arm, [state(0, 0.5, 100, 1, 10), state(1, 0.5, 100, 1, 10)])
        rows = (
            [{"arrival_s": t, "ttft_s": 5.0} for t in (0.0, 10.0, 19.9)]
            + [{"arrival_s": t, "ttft_s": late} for t in (20.0, 40.0, 60.0)]
            + [{"arrival_s": 30.0, "ttft_s": None}]
        )
        (tmp_path / "runs" / f"{arm}-r0" / "requests.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n"
        )
    s = bench_dp.dp_summary(tmp_path)
    rr = s["arms"]["dp-round-robin"]
    assert rr["ttft_mean_after_warm"] == pytest.approx(0.2)
    assert rr["ttft_p99_after_warm"] == pytest.approx(0.2)
    assert rr["ttft_p90"] == pytest.approx(5.0)  # the whole run's figures keep the cold start
    assert s["ratios_vs_round_robin"]["ttft_p99_after_warm"] == pytest.approx(0.5)
    assert s["targets_met"]["ttft_p99_after_warm <= 0.8x"] is True
    assert "| 0.200, 0.200 |" in bench_dp.format_markdown(s)


def test_bytes_after_warm_up_count_from_the_first_sample_after_a_third_of_the_arrivals(tmp_path):
    """Final bytes minus the bytes at the first complete sample at or after 1/3 of the last
    arrival (samples before it, or missing a replica, are skipped); None without a sample."""
    arms = {"dp-round-robin": {"ttft_p99": 1.0}, "dp-affinity": {"ttft_p99": 1.0}}
    (tmp_path / "summary.json").write_text(json.dumps({"arms": arms}))
    write_run(tmp_path, "dp-round-robin", [state(0, 0.5, 500, 1, 10), state(1, 0.5, 500, 1, 10)])
    write_run(tmp_path, "dp-affinity", [state(0, 0.5, 300, 1, 10), state(1, 0.5, 300, 1, 10)])
    write_timeline(
        tmp_path,
        "dp-round-robin",
        60.0,
        [(5.0, [100, 100]), (19.9, [300, 300]), (20.5, None), (25.0, [350, 350])],
    )
    write_timeline(tmp_path, "dp-affinity", 60.0, [(5.0, [100, 100]), (15.0, [200, 200])])
    s = bench_dp.dp_summary(tmp_path)
    rr, aff = s["arms"]["dp-round-robin"], s["arms"]["dp-affinity"]
    assert rr["bytes_after_warm"] == 300 and rr["warm_s"] == 25.0
    assert aff["bytes_after_warm"] is None and aff["warm_s"] is None
    assert s["ratios_vs_round_robin"]["bytes_after_warm"] is None
    assert s["targets_met"]["bytes_after_warm <= 0.5x"] is False
    assert " (from 25 s) |" in bench_dp.format_markdown(s)


def test_a_data_parallel_status_is_every_replicas_live_statistics():
    """Under DP /server_info has no engine-wide chameleon_status: the sampler keeps the
    replicas' live statistics, and the hit rate is over all their lookups."""
    from eval.server_status import cache_hit_rate, chameleon_status

    info = {
        "internal_states": [
            {"chameleon": {"adapter_cache": {"hit_rate": 0.5, "hits": 1, "misses": 1}}},
            {"chameleon": {"adapter_cache": {"hit_rate": 1.0, "hits": 6, "misses": 0}}},
        ]
    }
    status = chameleon_status(info)
    assert [s["adapter_cache"]["hits"] for s in status["live"]] == [1, 6]
    assert cache_hit_rate(status) == 7 / 8
    assert chameleon_status({"internal_states": [{}]}) is None
