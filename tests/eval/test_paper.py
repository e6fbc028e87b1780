"""eval.paper: each experiment's rows put the paper's figure beside ours, read from the tool's
own outputs (fake outputs here; every experiment's quick variant end to end, slow, its servers
shared with the other eval smoke tests where their launch commands are identical)."""

from __future__ import annotations

import json

import pytest
from eval_factories import run_eval_tool

from eval import paper


def arms(**p99):
    return {"arms": {a: {"ttft_p99": v, "ttft_p50": v / 2} for a, v in p99.items()}}


def test_compare_rows_are_changes_over_the_reference():
    rows = paper.EXPERIMENTS["eviction"].rows(
        {
            "summary": arms(stock=2.0, chameleon=1.5, **{"evict-lru": 1.8, "evict-fairshare": 2.2}),
            "details": {},
        }
    )
    by_claim = {c: o for c, _, o, _ in rows}
    assert by_claim["P99 TTFT, Chameleon eviction"] == pytest.approx(-0.25)
    assert by_claim["P99 TTFT, LRU eviction"] == pytest.approx(-0.10)
    assert by_claim["P99 TTFT, FairShare eviction"] == pytest.approx(0.10)
    assert by_claim["P99 TTFT, GDSF eviction"] is None  # that arm did not run
    assert all(p for _, p, _, _ in rows)  # a paper column on every row


def test_load_rows_read_the_sweep_points_and_throughput_at_slo():
    points = [
        {"arm": a, "point": lvl, "metrics": {"ttft_p99": v, "ttft_p50": v / 3}}
        for a, v in (("stock", 4.0), ("chameleon", 1.0))
        for lvl in ("medium", "high")
    ]
    sweep = {
        "load_points": points,
        "throughput_at_slo": {
            "stock": {"rps": 2.0},
            "chameleon": {"rps": 3.0},
            "cache-only": {"rps": None},
        },
    }
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
def test_queues_experiment_quick_end_to_end(tiny_assets, eval_server_pool, tmp_path):
    out = tmp_path / "queues"
    run_eval_tool(
        "eval.paper",
        "queues",
        "--quick",
        "--out",
        str(out),
        "--",
        "--preset",
        "tiny",
        "--requests",
        "10",
        "--rps",
        "4",
        "--wait-quiet",
        "0",
        "--no-progress",
    )
    record = json.loads((out / "paper.json").read_text())
    assert record["rows"][0]["ours"] is not None
    assert (out / "summary.json").exists() and (out / "paper.png").exists()


TINY = ["--preset", "tiny", "--requests", "8", "--rps", "4", "--wait-quiet", "0", "--no-progress"]
QUICK_RUNS = {  # experiment: (extra options, claims that must be measured)
    "eviction": ([], ["P99 TTFT, Chameleon eviction", "P99 TTFT, LRU eviction"]),
    "predictor": ([], ["P99 TTFT, 60% over 100% accurate predictor"]),
    "prefetch": ([], ["P99 TTFT, predictive over queue-driven prefetch"]),
    # three mixes: chameleon alone (the rows need stock too; 3 servers instead of 6)
    "popularity": (["--arms", "chameleon"], []),
    "load": (
        [
            "--arms",
            "stock,chameleon",
            "--levels",
            "0.5,0.75",
            "--capacity-rps",
            "3",
            "--settle",
            "0",
        ],
        ["P99 TTFT at medium load", "P50 TTFT at medium load"],
    ),
    "adapters": (
        [
            "--arms",
            "stock,chameleon",
            "--adapter-counts",  # every tiny adapter: the pooled servers' command
            "8",
            "--capacity-rps",
            "3",
            "--slo-ttft",  # the SLO given: no calibration server (the load run calibrates)
            "5",
            "--settle",
            "0",
        ],
        [],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(QUICK_RUNS))
def test_each_experiment_runs_quick_end_to_end(tiny_assets, eval_server_pool, tmp_path, experiment):
    """Every experiment's quick variant on the tiny preset: its tool runs real servers, and the
    rows it was given arms for are measured (the adapter sweep's row may honestly be empty: no
    point need meet an SLO it never measured)."""
    extra, measured = QUICK_RUNS[experiment]
    out = tmp_path / experiment
    run_eval_tool(
        "eval.paper", experiment, "--quick", "--out", str(out), "--", *TINY, *extra, timeout=1200
    )
    rows = {r["claim"]: r["ours"] for r in json.loads((out / "paper.json").read_text())["rows"]}
    assert rows, "no rows"
    for claim in measured:
        assert rows[claim] is not None, (claim, rows)
    assert (out / "paper.md").exists() and (out / "paper.png").exists()
    if experiment == "popularity":
        assert set(rows) == {f"P99 TTFT, {mix}" for mix in paper.POPULARITY_MIXES}
        assert all((out / mix / "summary.json").exists() for mix in paper.POPULARITY_MIXES)
    if experiment == "adapters":  # the SLO its row is judged by was measured (no load sweep)
        sweep = json.loads((out / "sweep.json").read_text())
        assert sweep["slo_ttft_s"] is not None and sweep["capacity_rps"] == 3.0
        assert {p["adapters"] for p in sweep["adapter_points"]} == {8}
