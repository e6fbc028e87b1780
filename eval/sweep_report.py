"""The combined report of ``eval.sweep``: ``report.md``, ``ttft_vs_load.png``,
``adapters_sweep.png``.

Contract: :func:`write_sweep_outputs` renders the ``sweep.json`` record (as built by
``eval.sweep``) into those files in ``out``; missing parts (a sweep that was skipped) are left out
of the report, and the figures say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from eval import plots
from eval.report import fmt, md_table


def _points_table(points: Sequence[Mapping[str, Any]]) -> List[str]:
    header = [
        "point",
        "arm",
        "rate (req/s)",
        "adapters",
        "TTFT p50",
        "TTFT p99",
        "TBT p99",
        "throughput",
        "completed",
        "failed",
        "meets SLO",
        "other CPU share",
    ]
    rows = [
        [
            p["point"],
            p["arm"],
            p["rps"],
            p["adapters"],
            p["metrics"]["ttft_p50"],
            p["metrics"]["ttft_p99"],
            p["metrics"]["tbt_p99"],
            p["metrics"]["throughput_rps"],
            p["metrics"]["completed"],
            p["metrics"]["failed"],
            "yes" if p["meets_slo"] else "no",
            (p.get("machine_load") or {}).get("foreign_cpu_share"),
        ]
        for p in points
    ]
    return md_table(header, rows)


def _slo_table(result: Mapping[str, Any]) -> List[str]:
    tas = result.get("throughput_at_slo") or {}
    ref = (tas.get("stock") or {}).get("rps")
    rows = [
        [
            arm,
            v.get("point"),
            v.get("rps"),
            v.get("throughput_rps"),
            (v["rps"] / ref) if ref and v.get("rps") else None,
        ]
        for arm, v in tas.items()
    ]
    return md_table(
        ["arm", "highest point within SLO", "rate (req/s)", "measured throughput", "rate vs stock"],
        rows,
    )


def adapters_plot(points: Sequence[Mapping[str, Any]], path: Path, slo_s: Any) -> Path:
    """P99 TTFT against the number of adapters served, per arm."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    arms = sorted({p["arm"] for p in points})
    for i, arm in enumerate(arms):
        pts = sorted(
            (p["adapters"], p["metrics"]["ttft_p99"])
            for p in points
            if p["arm"] == arm and p["metrics"]["ttft_p99"] is not None
        )
        if pts:
            ax.plot(*zip(*pts), "s-", color=f"C{i}", label=f"{arm} P99")
    if slo_s:
        ax.axhline(slo_s, color="grey", ls=":", label=f"SLO {slo_s:.2f} s")
    if points:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "adapter sweep not run", ha="center", transform=ax.transAxes)
    ax.set_xlabel("adapters served")
    ax.set_ylabel("TTFT P99 (s)")
    ax.set_title("TTFT P99 vs number of adapters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep_outputs(out: Path, result: Mapping[str, Any]) -> None:
    """report.md and the two figures (see the module contract)."""
    load = result.get("load_points") or []
    by_arm: Dict[str, List[Any]] = {}
    for p in load:
        by_arm.setdefault(p["arm"], []).append(
            (p["rps"], p["metrics"]["ttft_p50"], p["metrics"]["ttft_p99"])
        )
    plots.ttft_vs_load(by_arm, out / "ttft_vs_load.png", slo_s=result.get("slo_ttft_s"))
    adapters_plot(
        result.get("adapter_points") or [], out / "adapters_sweep.png", result.get("slo_ttft_s")
    )
    m = result.get("machine") or {}
    un = result.get("unloaded") or {}
    lines = [
        "# Load and adapter sweeps — Chameleon vs stock SGLang",
        "",
        f"Run `{result.get('command_line')}`; arms {result.get('arms')}; "
        f"{result.get('requests_per_point')} requests per point; preset "
        f"`{result.get('preset')}`.",
        "",
        f"- Unloaded (stock, sequential sample): TTFT {fmt(un.get('ttft_mean_s'))} s, TBT "
        f"{fmt(un.get('tbt_mean_s'))} s, e2e {fmt(un.get('e2e_mean_s'))} s.",
        f"- SLO: TTFT {fmt(result.get('slo_ttft_s'))} s, TBT {fmt(result.get('slo_tbt_s'))}"
        " s (5x unloaded mean); a point meets the SLO when its P99 TTFT does and no request "
        "failed.",
        f"- Stock capacity: {fmt(result.get('capacity_rps'))} completed req/s under the "
        f"overload probe; levels {result.get('levels')} of it.",
        "- Time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in (result.get("timings_s") or {}).items())
        + ".",
        f"- Machine: {m.get('cpu_count')} x {m.get('cpu_model')}; torch {m.get('torch')}, "
        f"sglang {m.get('sglang')}, commit {m.get('git_commit')}.",
        "",
    ]
    if load:
        lines += ["## Load sweep", ""] + _points_table(load) + [""]
        lines += ["## Throughput at SLO", ""] + _slo_table(result) + [""]
    if result.get("adapter_points"):
        lines += ["## Adapter-count sweep", ""] + _points_table(result["adapter_points"]) + [""]
    lines += [
        "## Caveats",
        "",
        "- Adapters were assigned synthetically (rank uniform, Zipf within a rank).",
        "- One server per arm serves all load levels in ascending order (prompts differ "
        "per point); the adapter sweep starts a fresh server per point.",
        "- Percentiles: numpy `linear`; one repetition per point; shared 2-core CPU.",
        "- Which Chameleon components were active is in each run's `server_info.json` "
        "(`chameleon_status`).",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
