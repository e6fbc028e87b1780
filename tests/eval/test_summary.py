"""summary.json keeps its fixed shape and types; ratios are chameleon / stock."""

from __future__ import annotations

import json

import pytest
from eval_factories import result

from eval.arms import ARM_FLAGS, ServerFlags, parse_arms
from eval.metrics import ARM_KEYS, run_metrics
from eval.summary import (
    RATIO_KEYS,
    TOP_KEYS,
    build_summary,
    machine_info,
    pick_pair,
    validate_summary,
)


def summary_for(arms):
    runs = {
        arm: [
            run_metrics(
                [
                    result(0, ttft=0.1 * (i + 1), e2e=1.0, tbt=(0.02,)),
                    result(1, sent=1.0, ttft=0.2 * (i + 1), e2e=1.0, tbt=(0.04,)),
                ]
            )
            for _ in range(2)
        ]
        for i, arm in enumerate(arms)
    }
    return build_summary({"requests": 2}, {"cpu_count": 2}, runs)


def test_shape_keys_and_types():
    s = json.loads(json.dumps(summary_for(["stock", "chameleon"])))
    assert validate_summary(s) == []
    assert list(s) == list(TOP_KEYS)
    assert set(s["ratios"]) == set(RATIO_KEYS) | {"vs_tuned"} and s["ratios"]["vs_tuned"] is None
    for arm in ("stock", "chameleon"):
        assert set(s["arms"][arm]) == set(ARM_KEYS)
        for k in ("completed", "failed", "retractions"):
            assert isinstance(s["arms"][arm][k], int)
        for k in (
            "ttft_p50",
            "ttft_p99",
            "tbt_p50",
            "tbt_p99",
            "e2e_p50",
            "e2e_p99",
            "throughput_rps",
        ):
            assert isinstance(s["arms"][arm][k], float)
        assert s["arms"][arm]["cache_hit_rate"] is None


def test_ratios_are_chameleon_over_stock():
    s = summary_for(["chameleon", "stock"])  # order of the arms does not matter
    assert s["ratios"]["ttft_p50"] == pytest.approx(0.15 / 0.30)
    assert s["ratios"]["throughput"] == pytest.approx(1.0)
    assert s["ratios"]["tbt_p99"] == pytest.approx(1.0)


def test_vs_tuned_ratios_are_chameleon_over_stock_tuned():
    s = json.loads(json.dumps(summary_for(["stock", "stock-tuned", "chameleon"])))
    assert validate_summary(s) == []
    assert s["ratios"]["ttft_p50"] == pytest.approx(0.45 / 0.15)  # chameleon / stock
    assert s["ratios"]["vs_tuned"]["ttft_p50"] == pytest.approx(0.45 / 0.30)
    assert set(s["ratios"]["vs_tuned"]) == set(RATIO_KEYS)
    s["ratios"]["vs_tuned"] = {"ttft_p50": 1.0}
    assert any("vs_tuned" in e for e in validate_summary(s))
    only = summary_for(["stock-tuned", "chameleon"])  # no default stock: one reference
    assert only["ratios"]["vs_tuned"] is None and only["ratios"]["ttft_p50"] is not None


def test_single_arm_has_null_ratios():
    s = summary_for(["stock"])
    assert validate_summary(s) == []
    assert all(v is None for v in s["ratios"].values())


def test_validate_reports_departures():
    s = summary_for(["stock", "chameleon"])
    s["extra"] = 1
    del s["arms"]["stock"]["ttft_p99"]
    s["arms"]["chameleon"]["completed"] = 1.5
    s["ratios"]["ttft_p50"] = "fast"
    errors = validate_summary(s)
    assert len(errors) == 4


def test_pick_pair():
    assert pick_pair(["chameleon", "stock"]) == ("stock", "chameleon")
    assert pick_pair(["stock", "scheduler-only"]) == ("stock", "scheduler-only")
    assert pick_pair(["cache-only"]) == ("cache-only", None)


def test_machine_info_fields():
    m = machine_info()
    assert {"cpu_count", "cpu_model", "torch", "sglang", "git_commit"} <= set(m)
    assert isinstance(m["cpu_count"], int)


def test_arm_table_and_flags():
    assert ARM_FLAGS["stock"] == ()
    assert ARM_FLAGS["chameleon"] == ("--chameleon",)
    assert ARM_FLAGS["evict-gdsf"] == ("--chameleon", "--chameleon-eviction-policy", "gdsf")
    assert parse_arms("stock, chameleon") == ["stock", "chameleon"]
    with pytest.raises(ValueError):
        parse_arms("stock,nonsense")
    args = ServerFlags().extra_args()
    assert args[:2] == ["--max-loras-per-batch", "8"] and "--enable-metrics" in args
