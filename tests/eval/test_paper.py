"""eval.paper: each experiment's rows put the paper's figure beside ours, read from the tool's
own outputs (fake outputs here; one quick experiment end to end, slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval import paper

REPO = Path(__file__).resolve().parents[2]


def arms(**p99):
    return {"arms": {a: {"ttft_p99": v, "ttft_p50": v / 2} for a, v in p99.items()}}


def test_compare_rows_are_changes_over_the_reference():
    rows = paper.EXPERIMENTS["eviction"].rows({"summary": arms(
        stock=2.0, chameleon=1.5, **{"evict-lru": 1.8, "evict-fairshare": 2.2}), "details": {}})
    by_claim = {c: o for c, _, o, _ in rows}
    assert by_claim["P99 TTFT, Chameleon eviction"] == pytest.approx(-0.25)
    assert by_claim["P99 TTFT, LRU eviction"] == pytest.approx(-0.10)
    assert by_claim["P99 TTFT, FairShare eviction"] == pytest.approx(0.10)
    assert by_claim["P99 TTFT, GDSF eviction"] is None  # that arm did not run
    assert all(p for _, p, _, _ in rows)  # a paper column on every row


def test_load_rows_read_the_sweep_points_and_throughput_at_slo():
    points = [{"arm": a, "point": lvl, "metrics": {"ttft_p99": v, "ttft_p50": v / 3}}
              for a, v in (("stock", 4.0), ("chameleon", 1.0)) for lvl in ("medium", "high")]
    sweep = {"load_points": points, "throughput_at_slo": {
        "stock": {"rps": 2.0}, "chameleon": {"rps": 3.0}, "cache-only": {"rps": None}}}
    rows = {c: o for c, _, o, _ in paper.EXPERIMENTS["load"].rows({"sweep": sweep})}
    assert rows["P99 TTFT at high load"] == pytest.approx(-0.75)
    assert rows["P99 TTFT at overload load"] is None
    assert rows["throughput at SLO, chameleon"] == pytest.approx(1.5)
    assert rows["throughput at SLO, cache-only"] is None


def test_outputs_and_not_built_experiments(tmp_path, capsys):
    exp = paper.EXPERIMENTS["queues"]
    rows = exp.rows({"summary": arms(chameleon=0.9, **{"chameleon-static": 1.0}), "details": {}})
    paper.write_paper_outputs(tmp_path, "queues", exp, rows, ["--quick"])
    record = json.loads((tmp_path / "paper.json").read_text())
    assert record["rows"][0]["ours"] == pytest.approx(-0.1)
    assert "-10.0%" in (tmp_path / "paper.md").read_text()
    assert (tmp_path / "paper.png").stat().st_size > 1000
    assert set(paper.POPULARITY_MIXES) == {"U-U", "U-P", "P-P"}


@pytest.mark.slow
def test_queues_experiment_quick_end_to_end(tiny_assets, tmp_path):
    out = tmp_path / "queues"
    proc = subprocess.run(
        [sys.executable, "-m", "eval.paper", "queues", "--quick", "--out", str(out), "--",
         "--preset", "tiny", "--requests", "12", "--rps", "3", "--wait-quiet", "0",
         "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "paper.json").read_text())
    assert record["rows"][0]["ours"] is not None
    assert (out / "summary.json").exists() and (out / "paper.png").exists()
