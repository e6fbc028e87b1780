"""Tuning stock SGLang for a workload (eval.tune_stock): candidates, order and choice, with the
server runs replaced by fakes (the end-to-end run is in test_compare_smoke)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from eval import tune_stock
from eval.arms import TUNED_STOCK_ARM, ServerFlags, arm_command
from eval.runner import RunConfig
from eval.tune_stock import best, candidate_flags, parse_slots, slot_counts, tune


def test_slot_counts_are_the_sweep_capped_at_the_adapters_served():
    assert slot_counts(100) == [8, 16, 32, 64, 100]
    assert slot_counts(8) == [8]
    assert slot_counts(20, (8, 16, 32, "all")) == [8, 16, 20]
    assert parse_slots("2, 8,all") == [2, 8, "all"]
    with pytest.raises(ValueError):
        parse_slots(" , ")


def test_candidate_flags_override_the_shared_slot_count():
    assert candidate_flags(32) == ("--max-loras-per-batch", "32")
    assert candidate_flags(16, 1.5, overlap=True) == (
        "--max-loras-per-batch",
        "16",
        "--lora-drain-wait-threshold",
        "1.5",
        "--enable-lora-overlap-loading",
    )
    shared = ServerFlags().extra_args()
    assert shared[:2] == ["--max-loras-per-batch", "8"]  # the arm's own flags come after


def test_best_prefers_no_failures_then_the_lowest_p99_ttft():
    records = [
        {"flags": ["a"], "failed": 0, "ttft_p99": 2.0},
        {"flags": ["b"], "failed": 1, "ttft_p99": 0.5},
        {"flags": ["c"], "failed": 0, "ttft_p99": 1.0},
        {"flags": ["d"], "error": "RuntimeError: did not start"},
    ]
    assert best(records)["flags"] == ["c"]
    assert best([records[1], records[3]])["flags"] == ["b"]
    assert best([records[3]]) is None
    assert tune_stock.rank_key(records[3]) == (math.inf, math.inf)


def test_arm_command_needs_flags_for_the_tuned_arm():
    with pytest.raises(ValueError):
        arm_command(TUNED_STOCK_ARM, None, 0, [], ServerFlags())
    cfg = RunConfig(assets=None, adapters=(), flags=ServerFlags())
    with pytest.raises(ValueError, match="tune it first"):
        cfg.own_flags(TUNED_STOCK_ARM)
    assert cfg.own_flags("chameleon") == ("--chameleon",)


def test_tune_sweeps_slots_then_drainer_then_overlap_and_records_failures(monkeypatch, tmp_path):
    """P99 TTFT falls with more slots up to 32; the drainer helps; overlap loading does not
    start: the choice is 32 slots with the drainer, and every candidate is recorded."""
    p99 = {8: 3.0, 16: 1.5, 32: 1.0, 64: 1.2, 100: 1.3}
    seen = []

    def fake_run_arm(arm, repeat, workload, cfg, run_dir):
        assert arm == TUNED_STOCK_ARM
        flags = cfg.own_flags(arm)
        seen.append(flags)
        if "--enable-lora-overlap-loading" in flags:
            raise RuntimeError("server exited during start-up: needs CUDA")
        value = p99[int(flags[1])] * (0.8 if "--lora-drain-wait-threshold" in flags else 1.0)
        metrics = {k: 0.1 for k in tune_stock.METRIC_KEYS}
        metrics.update(ttft_p99=value, failed=0, completed=10)
        return SimpleNamespace(metrics=metrics)

    monkeypatch.setattr(tune_stock, "run_arm", fake_run_arm)
    cfg = RunConfig(assets=None, adapters=tuple(range(100)), flags=ServerFlags())
    result = tune([], cfg, tmp_path, log=lambda s: None)
    assert [f[1] for f in seen] == ["8", "16", "32", "64", "100", "32", "50"]
    assert seen[5] == candidate_flags(32, 1.0)
    assert seen[6] == candidate_flags(50, 1.0, overlap=True)  # max loaded <= 2 x slots
    assert result["flags"] == list(candidate_flags(32, 1.0))
    assert sum(r["chosen"] for r in result["candidates"]) == 1
    failed = result["candidates"][-1]
    assert "needs CUDA" in failed["error"] and not failed["chosen"]
