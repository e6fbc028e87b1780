"""Tuning stock SGLang for a workload (eval.tune_stock): candidates, order and choice, with the
server runs replaced by fakes (the end-to-end run is in test_compare_smoke)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from eval import tune_stock
from eval.arms import TUNED_STOCK_ARM, ServerFlags, arm_command
from eval.runner import InfeasibleArm, RunConfig
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


def served(tmp_path, count: int, rank: int = 64):
    """``count`` fake adapters sharing one directory with a peft config of ``rank``."""
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    config = {"r": rank, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    (d / "adapter_config.json").write_text(json.dumps(config))
    return tuple(SimpleNamespace(path=d, name=f"a{i}") for i in range(count))


def test_fitted_slot_flags_are_the_largest_rank_and_the_union_of_modules(tmp_path):
    (a,) = served(tmp_path, 1, rank=16)
    b = tmp_path / "b"
    b.mkdir()
    (b / "adapter_config.json").write_text(json.dumps({"r": 32, "target_modules": ["o_proj"]}))
    flags = tune_stock.fitted_slot_flags([a.path, b])
    modules = ("down_proj", "o_proj", "q_proj", "v_proj")
    assert flags == ("--max-lora-rank", "32", "--lora-target-modules", *modules)
    assert tune_stock.fitted_slot_flags([]) == ()
    assert slot_counts(100, (8, "max", "all"), 40) == [8, 40, 100]
    assert slot_counts(100, (8, "max"), 0) == [8]  # not even one slot fits: nothing to add


def test_tune_sweeps_slots_then_drainer_then_overlap_and_records_failures(monkeypatch, tmp_path):
    """P99 TTFT falls with more slots up to 32; the drainer helps; overlap loading does not
    start; above 40 slots the memory budget is exceeded: the choice is 32 slots with the
    drainer, and every candidate is recorded, infeasible ones as such."""
    p99 = {8: 3.0, 16: 1.5, 32: 1.0, 40: 1.1}
    seen = []

    def fake_run_arm(arm, repeat, workload, cfg, run_dir):
        assert arm == TUNED_STOCK_ARM
        flags = cfg.own_flags(arm)
        seen.append(flags)
        if int(flags[1]) > 40:
            raise InfeasibleArm(f"{flags[1]} slots leave too little KV")
        if "--enable-lora-overlap-loading" in flags:
            raise RuntimeError("server exited during start-up: needs CUDA")
        value = p99[int(flags[1])] * (0.8 if "--lora-drain-wait-threshold" in flags else 1.0)
        metrics = {k: 0.1 for k in tune_stock.METRIC_KEYS}
        metrics.update(ttft_p99=value, failed=0, completed=10)
        return SimpleNamespace(metrics=metrics, settings={"memory": {"kv_tokens": 1}})

    monkeypatch.setattr(tune_stock, "run_arm", fake_run_arm)
    monkeypatch.setattr(tune_stock, "max_slots", lambda cfg, own: 40)
    cfg = RunConfig(assets=None, adapters=served(tmp_path, 100), flags=ServerFlags())
    result = tune([], cfg, tmp_path, log=lambda s: None)
    fit = ("--max-lora-rank", "64", "--lora-target-modules", "down_proj", "q_proj", "v_proj")
    assert [f[1] for f in seen] == ["8", "16", "32", "40", "64", "100", "32", "50"]
    assert all(f[-len(fit) :] == fit for f in seen)
    assert seen[6] == candidate_flags(32, 1.0, fit=fit)
    assert seen[7] == candidate_flags(50, 1.0, overlap=True, fit=fit)  # max loaded <= 2 x slots
    assert result["flags"] == list(candidate_flags(32, 1.0, fit=fit))
    assert result["max_slots"] == 40 and result["memory_budget"] == "equal"
    assert sum(r["chosen"] for r in result["candidates"]) == 1
    infeasible = [r for r in result["candidates"] if r.get("infeasible")]
    assert [r["flags"][1] for r in infeasible] == ["64", "100", "50"]
    assert not any(r["chosen"] for r in infeasible)
