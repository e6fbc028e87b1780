"""The DP comparison's report: per-replica figures read from each run's server_info, the load
imbalance, and the ratios of affinity to round robin checked against the targets."""

from __future__ import annotations

import json

import pytest

from eval import bench_dp


def state(rank, hit, loaded, requests, tokens):
    return {"chameleon": {"adapter_cache": {"hit_rate": hit, "bytes_loaded": loaded},
                          "dp": {"dp_rank": rank, "num_requests": requests,
                                 "num_tokens": tokens}}}


def write_run(out, arm, states):
    d = out / "runs" / f"{arm}-r0"
    d.mkdir(parents=True)
    (d / "server_info.json").write_text(json.dumps({"internal_states": states}))


def test_imbalance_is_max_over_mean():
    assert bench_dp.imbalance([100, 300]) == 1.5
    assert bench_dp.imbalance([0, 0]) is None and bench_dp.imbalance([1, None]) is None


def test_the_summary_reads_every_replica_and_checks_the_targets(tmp_path):
    arms = {"dp-round-robin": {"ttft_p50": 1.0, "ttft_p99": 4.0},
            "dp-affinity": {"ttft_p50": 0.5, "ttft_p99": 2.0}}
    (tmp_path / "summary.json").write_text(json.dumps({"arms": arms}))
    write_run(tmp_path, "dp-round-robin", [state(1, 0.5, 600, 10, 1000), state(0, 0.4, 400, 10, 1000)])
    write_run(tmp_path, "dp-affinity", [state(0, 0.9, 200, 9, 900), state(1, 0.8, 200, 11, 1300)])
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
    assert s["targets_met"] == {"bytes_loaded <= 0.5x": False, "ttft_p99 <= 0.8x": False,
                                "imbalance <= 1.25": False}
    assert "NOT met" in bench_dp.format_markdown(s)


def test_mean_and_p90_ttft_come_from_the_runs_requests(tmp_path):
    arms = {"dp-round-robin": {"ttft_p99": 1.0}, "dp-affinity": {"ttft_p99": 1.0}}
    (tmp_path / "summary.json").write_text(json.dumps({"arms": arms}))
    for arm, scale in (("dp-round-robin", 1.0), ("dp-affinity", 0.5)):
        write_run(tmp_path, arm, [state(0, 0.5, 100, 1, 10), state(1, 0.5, 100, 1, 10)])
        rows = [{"ttft_s": scale * t} for t in range(1, 11)] + [{"ttft_s": None}]
        (tmp_path / "runs" / f"{arm}-r0" / "requests.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n")
    s = bench_dp.dp_summary(tmp_path)
    assert s["arms"]["dp-round-robin"]["ttft_mean"] == 5.5
    assert s["arms"]["dp-round-robin"]["ttft_p90"] == pytest.approx(9.1)
    assert s["ratios_vs_round_robin"]["ttft_mean"] == 0.5
    assert "| 5.500 |" in bench_dp.format_markdown(s)
