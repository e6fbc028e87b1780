"""End to end: ``python -m eval.compare`` on the tiny preset with stock, stock tuned for the
workload and chameleon, one repeat (servers of identical commands shared with the other eval
smoke tests through ``eval.server_pool``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_factories import run_eval_tool

from eval.experiment import PNG_FILES
from eval.summary import validate_summary

pytestmark = pytest.mark.slow

ARMS = ("stock", "stock-tuned", "chameleon")


@pytest.fixture(scope="module")
def tuned_comparison(tiny_assets, eval_server_pool, tmp_path_factory) -> Path:
    """``--arms stock,stock-tuned,chameleon``: the tuning runs stock with as many LoRA slots as
    adapters, then with the drainer (overlap loading, tried next in a full tuning, is left to the
    unit tests), picks one, and the comparison runs every arm once."""
    out = tmp_path_factory.mktemp("compare") / "tuned"
    run_eval_tool(
        "eval.compare",
        "--preset",
        "tiny",
        "--requests",
        "10",
        "--rps",
        "4",
        "--arms",
        ",".join(ARMS),
        "--repeats",
        "1",
        "--drain",
        "90",
        "--tune-slots",
        "all",
        "--no-tune-overlap",  # the overlap candidate: tests/eval/test_tune_stock.py
        "--wait-quiet",
        "0",
        "--out",
        str(out),
        "--no-progress",
        timeout=1500,
    )
    return out


def test_compare_end_to_end(tuned_comparison):
    """Every arm completed requests; the summary, report, plots, replayable workload and each
    run's requests are written."""
    out = tuned_comparison
    summary = json.loads((out / "summary.json").read_text())
    assert validate_summary(summary) == []
    assert set(summary["arms"]) == set(ARMS)
    for arm, m in summary["arms"].items():
        assert m["completed"] > 0, arm
        assert m["ttft_p50"] is not None and m["throughput_rps"] is not None
    assert summary["ratios"]["ttft_p50"] is not None
    assert summary["workload"]["requests"] == 10 and summary["machine"]["cpu_count"] >= 1
    assert "| stock |" in (out / "report.md").read_text()
    for png in PNG_FILES:
        assert (out / png).stat().st_size > 1000, png
    replay = out / "workload.jsonl"
    assert len(replay.read_text().splitlines()) == 10
    for arm in ARMS:
        lines = (out / "runs" / f"{arm}-r0" / "requests.jsonl").read_text().splitlines()
        assert len(lines) == 10


def test_compare_against_tuned_stock_end_to_end(tuned_comparison):
    """The tuning's candidates and choice are recorded, the tuned arm runs the chosen flags,
    and the summary carries chameleon over stock-tuned."""
    out = tuned_comparison
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ratios"]["vs_tuned"]["ttft_p99"] is not None
    tuning = json.loads((out / "tune.json").read_text())
    tried = [c["flags"] for c in tuning["candidates"]]
    assert tried[0][:4] == ["--max-loras-per-batch", "8", "--max-lora-rank", "128"]
    assert any("--lora-drain-wait-threshold" in f for f in tried)
    assert not any("--enable-lora-overlap-loading" in f for f in tried)  # --no-tune-overlap
    chosen = [c for c in tuning["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["flags"] == tuning["flags"]
    details = json.loads((out / "details.json").read_text())
    assert details["arm_flags"]["stock-tuned"] == tuning["flags"]
    report = (out / "report.md").read_text()
    assert "stock-tuned" in report and "Tuning stock SGLang" in report


def test_stock_arms_run_with_their_kv_cut_by_their_lora_slots(tuned_comparison):
    """The default memory budget: the stock servers really ran with the KV pool the budget left
    them (SGLang's own count), Chameleon with the whole budget, and every arm's KV + slot bytes
    is the same to within one token."""
    details = json.loads((tuned_comparison / "details.json").read_text())
    settings = details["settings"]
    assert details["memory_budget"] == "equal" and details["infeasible_arms"] == {}
    for arm in ARMS:
        memory = settings[arm]["memory"]
        assert settings[arm]["max_total_num_tokens"] == memory["kv_tokens"], arm
    assert settings["chameleon"]["memory"]["slot_bytes"] == 0
    assert settings["chameleon"]["max_total_num_tokens"] == 65536
    for arm in ("stock", "stock-tuned"):
        memory = settings[arm]["memory"]
        assert memory["slot_bytes"] > 0 and memory["kv_tokens"] < 65536, arm
        gap = settings["chameleon"]["memory"]["total_bytes"] - memory["total_bytes"]
        assert 0 <= gap < memory["kv_bytes_per_token"], arm
    assert "LoRA slots (MiB)" in (tuned_comparison / "report.md").read_text()
