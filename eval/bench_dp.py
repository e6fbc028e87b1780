"""Dispatch across data-parallel replicas: SGLang's round robin and shortest queue vs adapter
affinity, Chameleon on every replica, same workload, same run.

``python -m eval.bench_dp [eval.compare options]`` runs ``eval.compare`` with the arms
``dp-round-robin``, ``dp-shortest-queue`` and ``dp-affinity`` (``--dp-size 2``; ``--arms``
overrides), then reads each run's per-replica statistics and writes ``OUT/dp.json`` and
``OUT/dp.md``: per arm, TTFT P50/P99, adapter-cache hit rate per replica, bytes loaded, requests
and tokens per replica and the load imbalance (max / mean of the tokens each replica took), and
the ratios of ``dp-affinity`` to ``dp-round-robin`` beside the targets (bytes loaded <= 0.5x,
P99 TTFT <= 0.8x, imbalance <= 1.25).

Bytes loaded are given twice: over the whole run, and *after warm-up*: what the replicas loaded
after the first ``WARM_FRACTION`` of the arrivals (the final count minus the count at the first
``/server_info`` sample at or after that time). Every run starts with cold caches, so the whole
run's figure includes each replica's first load of every adapter it serves, a cost a serving
deployment pays once; after warm-up is the steady reload traffic. TTFT is given after warm-up
too: over the requests that arrived after the same cut (the cold start, when every request of
every arm misses, otherwise supplies much of a short run's P99).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from eval import compare
from eval.arms import DP_ARMS
from eval.summary import ratio

REFERENCE = "dp-round-robin"
CANDIDATE = "dp-affinity"
TARGETS = {
    "bytes_loaded": 0.5,
    "bytes_after_warm": 0.5,
    "ttft_p99": 0.8,
    "ttft_p99_after_warm": 0.8,
}
WARM_FRACTION = 1.0 / 3.0
MAX_IMBALANCE = 1.25


def replica_stats(server_info: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per replica (DP rank order): hit rate, bytes loaded, requests and tokens taken."""
    rows = []
    for state in server_info.get("internal_states") or []:
        live = (state or {}).get("chameleon") or {}
        cache, dp = live.get("adapter_cache") or {}, live.get("dp") or {}
        rows.append(
            {
                "dp_rank": dp.get("dp_rank", len(rows)),
                "hit_rate": cache.get("hit_rate"),
                "bytes_loaded": cache.get("bytes_loaded"),
                "num_loads": cache.get("num_loads"),
                "num_requests": dp.get("num_requests"),
                "num_tokens": dp.get("num_tokens"),
            }
        )
    return sorted(rows, key=lambda r: r["dp_rank"])


def imbalance(values: Sequence[Optional[float]]) -> Optional[float]:
    """max / mean of ``values`` (None when any is missing or all are zero)."""
    if not values or any(v is None for v in values):
        return None
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else None


def request_rows(requests_path: Path) -> List[Dict[str, Any]]:
    """One run's ``requests.jsonl`` (empty when the file is missing)."""
    if not requests_path.exists():
        return []
    return list(map(json.loads, requests_path.read_text().splitlines()))


def warm_cut(rows: Sequence[Dict[str, Any]]) -> Optional[float]:
    """``WARM_FRACTION`` of the last arrival (module docs); None without arrivals."""
    arrivals = [r["arrival_s"] for r in rows if r.get("arrival_s") is not None]
    return WARM_FRACTION * max(arrivals) if arrivals else None


def ttft_spread(rows: Sequence[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """Mean and P90 TTFT of one run's completed requests: steadier than the P99 of a few
    hundred requests, which is their second or fourth worst."""
    ttfts = [r["ttft_s"] for r in rows if r.get("ttft_s") is not None]
    if not ttfts:
        return {"ttft_mean": None, "ttft_p90": None}
    return {"ttft_mean": float(np.mean(ttfts)), "ttft_p90": float(np.percentile(ttfts, 90))}


def ttft_after_warm(rows: Sequence[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """Mean and P99 TTFT of the completed requests that arrived at or after the warm-up cut
    (:func:`warm_cut`); None where there are none."""
    none: Dict[str, Optional[float]] = {"ttft_mean_after_warm": None, "ttft_p99_after_warm": None}
    cut = warm_cut(rows)
    if cut is None:
        return none
    ttfts = [
        r["ttft_s"]
        for r in rows
        if r.get("arrival_s") is not None and r["arrival_s"] >= cut and r.get("ttft_s") is not None
    ]
    if not ttfts:
        return none
    return {
        "ttft_mean_after_warm": float(np.mean(ttfts)),
        "ttft_p99_after_warm": float(np.percentile(ttfts, 99)),
    }


def _bytes_of(status: Optional[Dict[str, Any]]) -> Optional[int]:
    """Total bytes loaded over the replicas in one status sample (None if any is missing)."""
    live = (status or {}).get("live") or []
    loaded = [((r or {}).get("adapter_cache") or {}).get("bytes_loaded") for r in live]
    return sum(loaded) if loaded and None not in loaded else None


def bytes_after_warm(
    run_dir: Path, rows: Sequence[Dict[str, Any]], total: Optional[int]
) -> Dict[str, Optional[float]]:
    """Bytes loaded after the warm-up cut (:func:`warm_cut`; module docs), and the time (s from
    the run's start) it is counted from; None where the run has no such sample."""
    none: Dict[str, Optional[float]] = {"bytes_after_warm": None, "warm_s": None}
    status_path = run_dir / "status.jsonl"
    warm_s = warm_cut(rows)
    if total is None or warm_s is None or not status_path.exists():
        return none
    for sample in map(json.loads, status_path.read_text().splitlines()):
        at = _bytes_of(sample.get("chameleon_status"))
        if sample["t_s"] >= warm_s and at is not None:
            return {"bytes_after_warm": float(total - at), "warm_s": float(sample["t_s"])}
    return none


def arm_row(out: Path, arm: str, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """One arm's figures from its first run (``runs/<arm>-r0/server_info.json``,
    ``requests.jsonl``) and summary."""
    run_dir = out / "runs" / f"{arm}-r0"
    info_path = run_dir / "server_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    replicas = replica_stats(info)
    loaded = [r["bytes_loaded"] for r in replicas]
    total = sum(loaded) if loaded and None not in loaded else None
    rows = request_rows(run_dir / "requests.jsonl")
    # requests a replica took before the measured load (warm-up) are counted too: same for all
    return {
        "arm": arm,
        "ttft_p50": metrics.get("ttft_p50"),
        "ttft_p99": metrics.get("ttft_p99"),
        "throughput_rps": metrics.get("throughput_rps"),
        "completed": metrics.get("completed"),
        "failed": metrics.get("failed"),
        "replicas": replicas,
        **ttft_spread(rows),
        **ttft_after_warm(rows),
        "bytes_loaded": total,
        **bytes_after_warm(run_dir, rows, total),
        "imbalance_tokens": imbalance([r["num_tokens"] for r in replicas]),
        "imbalance_requests": imbalance([r["num_requests"] for r in replicas]),
    }


def dp_summary(out: Path) -> Dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    rows = {arm: arm_row(out, arm, m) for arm, m in summary["arms"].items()}
    ref, cand = rows.get(REFERENCE, {}), rows.get(CANDIDATE, {})
    ratios = {
        k: ratio(cand.get(k), ref.get(k))
        for k in (
            "bytes_loaded",
            "bytes_after_warm",
            "ttft_p99",
            "ttft_p90",
            "ttft_p50",
            "ttft_mean",
            "ttft_p99_after_warm",
            "ttft_mean_after_warm",
        )
    }
    checks = {
        f"{k} <= {t}x": (ratios[k] is not None and ratios[k] <= t) for k, t in TARGETS.items()
    }
    checks[f"imbalance <= {MAX_IMBALANCE}"] = (
        cand.get("imbalance_tokens") is not None and cand["imbalance_tokens"] <= MAX_IMBALANCE
    )
    return {
        "workload": summary.get("workload"),
        "machine": summary.get("machine"),
        "arms": rows,
        "ratios_vs_round_robin": ratios,
        "targets_met": checks,
    }


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _mb(num_bytes: Optional[float]) -> str:
    return _f(num_bytes / 1e6, 1) if num_bytes is not None else "-"


def format_markdown(s: Dict[str, Any]) -> str:
    lines = [
        "| arm | TTFT mean s | TTFT P50 s | TTFT P90 s | TTFT P99 s | after warm-up: TTFT "
        "mean s, P99 s | req/s | hit rate per replica | MB loaded | MB loaded after warm-up "
        "| requests per replica | imbalance (tokens) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in s["arms"].items():
        reps = r["replicas"]
        lines.append(
            f"| {arm} | {_f(r.get('ttft_mean'))} | {_f(r['ttft_p50'])} | {_f(r.get('ttft_p90'))}"
            f" | {_f(r['ttft_p99'])}"
            f" | {_f(r.get('ttft_mean_after_warm'))}, {_f(r.get('ttft_p99_after_warm'))}"
            f" | {_f(r['throughput_rps'], 2)}"
            f" | {', '.join(_f(x['hit_rate'], 2) for x in reps) or '-'}"
            f" | {_mb(r['bytes_loaded'])}"
            f" | {_mb(r.get('bytes_after_warm'))}"
            f"{' (from ' + _f(r['warm_s'], 0) + ' s)' if r.get('warm_s') is not None else ''}"
            f" | {', '.join(_f(x['num_requests']) for x in reps) or '-'}"
            f" | {_f(r['imbalance_tokens'], 2)} |"
        )
    lines.append("")
    lines.append(
        f"{CANDIDATE} / {REFERENCE}: "
        + ", ".join(f"{k} {_f(v, 2)}" for k, v in s["ratios_vs_round_robin"].items())
    )
    lines.append(
        "targets: "
        + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in s["targets_met"].items())
    )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--arms" not in args:
        args += ["--arms", ",".join(DP_ARMS)]
    parsed = compare.parser().parse_args(args)
    out = compare.out_dir(parsed)
    if "--out" not in args:
        args += ["--out", str(out)]
    status = compare.main(args)
    summary = dp_summary(out)
    (out / "dp.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = format_markdown(summary)
    (out / "dp.md").write_text(text)
    print(text, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
