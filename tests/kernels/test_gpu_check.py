"""``make gpu-check``'s script, in its CPU mode: tiny shapes, Triton interpreted, the graph part
under the host-sync guard. Run as the GPU machine runs it: a fresh Python on the bare file
(``kernels/`` imported as ``chameleon_kernels`` by the script itself). SGLang is installed here,
so its csgmv comparison runs too (fp32: the interpreter cannot compute its bf16 dots)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "kernels" / "gpu_check.py"
pytestmark = pytest.mark.slow  # the whole script in a fresh Python, Triton interpreted: minutes


def run_check(tmp_path_factory, *args: str) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu-check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-I", str(SCRIPT), "--cpu", "--reps", "1", *args, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(out.parent),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "PASSED" in proc.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return run_check(tmp_path_factory, "--replays", "6")


@pytest.fixture(scope="module")
def report_fp32(tmp_path_factory) -> dict:
    """fp32, the parts that compare with SGLang's csgmv (installed here)."""
    return run_check(tmp_path_factory, "--dtype", "float32", "--parts", "correctness,sglang")


def test_every_part_ran_and_passed(report):
    assert report["passed"] and report["failures"] == []
    assert {"correctness", "graph", "timing", "sglang"} <= set(report)
    assert report["dtype"] == "bfloat16"


def test_correctness_covers_every_module_on_sampled_layers_for_decode_and_prefill(report):
    rows = report["correctness"]
    modules = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    for case in ("decode", "prefill"):
        seen = {(r["module"], r["layer"]) for r in rows if r["case"] == case}
        layers = report["shapes"]["check_layers"]
        assert seen == {(module, layer) for module in modules for layer in layers}
    assert all(r["ok"] and 0 < r["rel_error"] < 2e-2 for r in rows)


def test_graph_part_replays_with_loads_and_evictions(report):
    graph = report["graph"]
    assert graph["ok"] and graph["replays"] == 6 and not graph["cuda_graph"]
    assert len(graph["events"]) == 3
    assert any(e["evicted"] != e["loaded"] for e in graph["events"])


def test_timing_compares_with_both_dense_references(report):
    rows = report["timing"]
    decode = [r for r in rows if r["case"].startswith("decode")]
    assert decode and all(
        {"ours_eager_s", "dense_segments_s", "dense_gather_s"} <= set(r) for r in decode
    )
    assert any(r["case"].startswith("prefill") for r in rows)
    distinct = {r["distinct_adapters"] for r in decode}
    assert 1 in distinct and max(distinct) >= 6  # one adapter and many, in the same run


def test_csgmv_is_not_compared_in_bf16_under_the_interpreter_and_the_report_says_why(report):
    assert report["sglang"]["available"] is False
    assert "raw bits" in report["sglang"]["reason"]


def test_ours_agree_with_sglangs_csgmv_on_every_module_in_fp32(report_fp32):
    sglang = report_fp32["sglang"]
    assert report_fp32["passed"] and sglang["available"]
    rows = sglang["agreement"]
    layers = report_fp32["shapes"]["check_layers"]
    modules = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    for case in ("decode", "prefill"):
        seen = {(r["module"], r["layer"]) for r in rows if r["case"] == case}
        assert seen == {(module, layer) for module in modules for layer in layers}
    assert all(r["ok"] and r["ours_vs_csgmv"] < 1e-5 for r in rows)
    assert all(0 < r["csgmv_rel_error"] < 1e-5 for r in rows)  # the oracle itself is right
    timing = sglang["timing"]
    assert {r["case"].split()[0] for r in timing} == {"decode", "prefill"}
    assert all(r["csgmv_eager_s"] > 0 and r["ours_eager_s"] > 0 for r in timing)


def test_without_sglang_the_comparison_is_skipped_with_the_reason(monkeypatch):
    from chameleon_kernels import gpu_check_sglang

    monkeypatch.setitem(sys.modules, "sglang.kernels.ops.lora.dense", None)
    kernels, why = gpu_check_sglang.load_csgmv()
    assert kernels is None and why.startswith("SGLang's csgmv kernels are not importable")
