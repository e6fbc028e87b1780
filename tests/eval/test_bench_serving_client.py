"""SGLang's own benchmark client against each arm (eval.bench_serving_client): its command line,
its record read back in seconds, and (slow) ``eval.compare --client bench-serving`` end to end on
the tiny preset, ``python -m sglang.bench_serving`` driving real servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_factories import run_eval_tool

from eval.bench_serving_client import BenchSpec, bench_command, bench_metrics, summarize


def test_command_sends_random_ids_with_every_adapter_at_the_rate():
    spec = BenchSpec(num_prompts=20, rps=4.0, distribution="skewed", zipf_alpha=1.2)
    cmd = bench_command("http://127.0.0.1:1", Path("/m"), ["a", "b"], spec, Path("/o.jsonl"))
    assert cmd[1:3] == ["-m", "sglang.bench_serving"]
    joined = " ".join(cmd)
    for part in (
        "--backend sglang",
        "--dataset-name random-ids",
        "--num-prompts 20",
        "--request-rate 4.0",
        "--lora-name a b --lora-request-distribution skewed --lora-zipf-alpha 1.2",
        "--output-file /o.jsonl",
    ):
        assert part in joined
    plain = bench_command("http://x", Path("/m"), [], BenchSpec(1, 1.0), Path("/o"))
    assert "--lora-name" not in plain


def test_records_are_read_in_seconds_and_ratios_are_candidate_over_reference():
    record = {"p99_ttft_ms": 250.0, "median_ttft_ms": 100.0, "request_throughput": 2.0}
    m = bench_metrics(record | {"completed": 5})
    assert m["ttft_p99"] == pytest.approx(0.25) and m["throughput_rps"] == 2.0
    assert m["tpot_p99"] is None and m["completed"] == 5
    runs = {
        "stock": [{"metrics": bench_metrics(record)}],
        "chameleon": [
            {"metrics": bench_metrics(record | {"p99_ttft_ms": 100.0})},
            {"metrics": bench_metrics(record | {"p99_ttft_ms": 150.0})},
        ],
    }
    summary = summarize(runs, BenchSpec(5, 1.0))
    assert summary["arms"]["chameleon"]["ttft_p99"] == pytest.approx(0.125)  # median of repeats
    ratios = summary["ratios"]
    assert ratios["reference"] == "stock" and ratios["candidate"] == "chameleon"
    assert ratios["vs_reference"]["ttft_p99"] == pytest.approx(0.5)
    assert ratios["vs_reference"]["tpot_p99"] is None


def compare(out, *options):
    """``python -m eval.compare`` on the tiny preset with SGLang's client, 8 short requests."""
    run_eval_tool(
        "eval.compare",
        "--preset",
        "tiny",
        "--client",
        "bench-serving",
        "--requests",
        "8",
        "--rps",
        "4",
        "--repeats",
        "1",
        "--bench-input-len",
        "64",
        "--bench-output-len",
        "8",
        "--wait-quiet",
        "0",
        "--out",
        str(out),
        "--no-progress",
        *options,
    )
    return json.loads((out / "bench_serving.json").read_text())


@pytest.mark.slow
def test_compare_with_sglangs_bench_serving_under_the_gpu_like_profile(
    tiny_assets, eval_server_pool, tmp_path
):
    """Each arm's server (memory-equal budget) is driven by ``python -m sglang.bench_serving``:
    every request completes, the table and ratios are written. ``--profile gpu-like``: the
    unloaded TTFT is measured on a stock server first, and the host link derived from it (a
    mean adapter load = 0.132 of it) is given to every arm."""
    summary = compare(tmp_path / "bench", "--arms", "stock,chameleon", "--profile", "gpu-like")
    assert set(summary["arms"]) == {"stock", "chameleon"}
    for arm, m in summary["arms"].items():
        assert m["completed"] == 8, arm
        assert m["ttft_p99"] > 0 and m["tpot_p99"] > 0, arm
    assert summary["ratios"]["vs_reference"]["ttft_p99"] is not None
    stock_memory = summary["runs"]["stock"][0]["memory"]
    assert stock_memory["budget"] == "equal" and stock_memory["slot_bytes"] > 0
    assert "| chameleon |" in (tmp_path / "bench" / "bench_serving.md").read_text()
    profile = summary["meta"]["cost_profile"]
    assert profile["profile"] == "gpu-like" and profile["unloaded_ttft_s"] > 0
    assert profile["mean_load_s"] == pytest.approx(0.132 * profile["unloaded_ttft_s"], rel=1e-3)
    link = f"--chameleon-host-link-gbps={profile['host_link_gbps']:.6g}"
    for arm in ("stock", "chameleon"):
        assert link in summary["runs"][arm][0]["command"], arm
