"""PNG figures of a comparison (matplotlib, Agg backend, no display needed).

Contract: each function writes one PNG at ``path`` and returns it. Where there is nothing to
draw (no completed request, no statistic reported by the server), the figure says so in words
instead of showing made-up data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from eval.server_status import cache_hit_rate, memory_split
from eval.workload import SIZE_CLASSES

NOT_REPORTED = "not reported by this server version"
Samples = Sequence[Tuple[float, Optional[Dict[str, Any]]]]


def _note(ax: Any, text: str) -> None:
    ax.text(
        0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, wrap=True
    )


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ttft_cdf(ttfts: Mapping[str, Sequence[float]], path: Path, title: str = "") -> Path:
    """Empirical CDF of TTFT per arm (log x axis)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for arm, values in ttfts.items():
        v = np.sort(np.asarray(values, dtype=float))
        if len(v):
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=f"{arm} (n={len(v)})")
            drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (s)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        _note(ax, "no completed requests")
    ax.set_title(title or "TTFT CDF")
    return _save(fig, path)


def ttft_vs_load(
    points: Mapping[str, Sequence[Tuple[float, Optional[float], Optional[float]]]],
    path: Path,
    slo_s: Optional[float] = None,
) -> Path:
    """P50 (dashed) and P99 (solid) TTFT against offered load, one colour per arm."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (arm, pts) in enumerate(points.items()):
        pts = sorted((x, a, b) for x, a, b in pts if x is not None)
        color = f"C{i}"
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], "o--", color=color, label=f"{arm} P50")
        ax.plot(xs, [p[2] for p in pts], "s-", color=color, label=f"{arm} P99")
    if slo_s is not None:
        ax.axhline(slo_s, color="grey", ls=":", label=f"SLO {slo_s:.2f} s")
    ax.set_xlabel("offered load (req/s)")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("TTFT vs load")
    return _save(fig, path)


def queueing_share(
    shares: Mapping[str, Mapping[str, Mapping[str, object]]], path: Path, source: str
) -> Path:
    """Grouped bars: queueing time as a share of end-to-end time per size class and arm."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    arms = list(shares)
    width = 0.8 / max(1, len(arms))
    x = np.arange(len(SIZE_CLASSES))
    for i, arm in enumerate(arms):
        vals = [shares[arm].get(c, {}).get("share") for c in SIZE_CLASSES]
        heights = [100.0 * float(v) if isinstance(v, (int, float)) else 0.0 for v in vals]
        ax.bar(x + i * width - 0.4 + width / 2, heights, width, label=arm)
    ax.set_xticks(x, SIZE_CLASSES)
    ax.set_ylabel("queueing / end-to-end time (%)")
    ax.set_xlabel("request size class (WRS tertile)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(f"Queueing share per size class\n(source: {source})", fontsize=10)
    return _save(fig, path)


def cache_and_memory(samples: Mapping[str, Samples], path: Path) -> Path:
    """Cache hit rate (top) and reported memory split (bottom) over time, per arm."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    hit_drawn = mem_drawn = False
    for i, (arm, ss) in enumerate(samples.items()):
        hits = [(t, cache_hit_rate(s)) for t, s in ss]
        hits = [(t, h) for t, h in hits if h is not None]
        if hits:
            top.plot(*zip(*hits), color=f"C{i}", label=arm)
            hit_drawn = True
        series: Dict[str, List[Tuple[float, float]]] = {}
        for t, s in ss:
            for key, v in memory_split(s).items():
                series.setdefault(key, []).append((t, v / 2**20))
        for j, (key, pts) in enumerate(sorted(series.items())):
            bottom.plot(
                *zip(*pts), color=f"C{i}", ls=["-", "--", ":", "-."][j % 4], label=f"{arm} {key}"
            )
            mem_drawn = True
    top.set_ylabel("adapter cache hit rate")
    bottom.set_ylabel("MiB")
    bottom.set_xlabel("time since load start (s)")
    panels = ((top, hit_drawn, "cache hit rate"), (bottom, mem_drawn, "memory split"))
    for ax, drawn, what in panels:
        if drawn:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            _note(ax, f"{what}: {NOT_REPORTED}")
    top.set_title("Adapter cache over time")
    return _save(fig, path)
