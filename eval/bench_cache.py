"""Adapter-cache benchmark: the stock-SGLang baseline's setup, stock and --chameleon in one run.

``python -m eval.bench_cache [--rates 2,4,6,8] [--requests 200] [--out DIR] [--quick]``

Repeats ``shared/design/baseline-stock-sglang-cpu.md``: the ``eval`` preset (100 adapters,
ranks 8-128), the Azure conversation trace scaled (/8, input <= 512, output <= 64), Poisson
arrivals, streaming ``/generate``. Two sweeps, run back to back on this machine:

1. ``stock`` and ``chameleon`` with all 100 adapters at every rate of ``--rates``;
2. ``stock`` with a single adapter at 4 req/s: the reference the issue's target is stated against.

Prints one line per point (TTFT P50/P99, TBT P50/P99, completed/s, failed, cache hit rate and
bytes loaded, cumulative per server) and the targets: chameleon's P99 TTFT at 4 req/s over the
single-adapter figure (target <= 2), and each arm's saturation (the highest rate at which it
completed >= 90% of the offered rate with no failure; target for chameleon > 8 req/s, i.e. it
does not saturate within the sweep). Writes ``OUT/bench_cache.json``; the sweeps' own files are
under ``OUT/many`` and ``OUT/single``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from eval import sweep

REFERENCE_RPS = 4.0
SATURATION_FRACTION = 0.9


def _levels(rates: Sequence[float], capacity: float) -> str:
    return ",".join(f"{r / capacity:g}" for r in rates)


def _sweep(
    out: Path, arms: str, rates: Sequence[float], requests: int, extra: Sequence[str]
) -> Dict[str, Any]:
    argv = [
        "--preset",
        "eval",
        "--arms",
        arms,
        "--capacity-rps",
        str(REFERENCE_RPS),
        "--levels",
        _levels(rates, REFERENCE_RPS),
        "--no-adapter-sweep",
        "--requests",
        str(requests),
        "--out",
        str(out),
        *extra,
    ]
    if sweep.main(argv) != 0:
        raise RuntimeError(f"eval.sweep failed: {argv}")
    return json.loads((out / "sweep.json").read_text())


def _cache_counters(point_dir: Path) -> Dict[str, Optional[float]]:
    """Cumulative adapter-cache counters of the arm's server after this point, if any."""
    try:
        info = json.loads((point_dir / "server_info.json").read_text())
    except (OSError, ValueError):
        return {}
    for state in info.get("internal_states") or []:
        cache = (state.get("chameleon") or {}).get("adapter_cache")
        if isinstance(cache, dict):
            return {
                k: cache.get(k)
                for k in (
                    "hit_rate",
                    "bytes_loaded",
                    "evictions",
                    "max_distinct_adapters_per_batch",
                )
            }
    return {}


def _rows(result: Dict[str, Any], out: Path, label: str) -> List[Dict[str, Any]]:
    rows = []
    for p in result["load_points"]:
        m = p["metrics"]
        rows.append(
            {
                "setup": label,
                "arm": p["arm"],
                "rps": p["rps"],
                "ttft_p50": m["ttft_p50"],
                "ttft_p99": m["ttft_p99"],
                "tbt_p50": m.get("tbt_p50"),
                "tbt_p99": m["tbt_p99"],
                "completed_per_s": m["throughput_rps"],
                "failed": m["failed"],
                "retractions": m.get("retractions"),
                **_cache_counters(out / "points" / "load" / p["point"] / p["arm"]),
            }
        )
    return rows


def saturation(rows: Sequence[Dict[str, Any]], arm: str) -> Optional[float]:
    """Highest swept rate at which ``arm`` kept up (see the module docstring)."""
    ok = [
        r["rps"]
        for r in rows
        if r["arm"] == arm
        and r["failed"] == 0
        and (r["completed_per_s"] or 0) >= SATURATION_FRACTION * r["rps"]
    ]
    return max(ok) if ok else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.bench_cache", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--rates", default="2,4,6,8")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="rates 4,8 and 120 requests per point")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra SGLang flag for every arm (e.g. --server-arg=--chameleon-host-"
        "link-gbps=25); written into the output",
    )
    args = p.parse_args(argv)
    rates = [4.0, 8.0] if args.quick else [float(r) for r in args.rates.split(",")]
    requests = 120 if args.quick else args.requests
    out = args.out or sweep.out_dir(argparse.Namespace(out=None), prefix="bench-cache-")
    extra = [f"--server-arg={a}" for a in args.server_arg]
    many = _sweep(out / "many", "stock,chameleon", rates, requests, extra)
    single = _sweep(out / "single", "stock", [REFERENCE_RPS], requests, ["--adapters", "1", *extra])
    rows = _rows(many, out / "many", "100 adapters") + _rows(single, out / "single", "1 adapter")
    ref = next((r for r in rows if r["setup"] == "1 adapter"), None)
    cham = next(
        (
            r
            for r in rows
            if r["arm"] == "chameleon"
            and r["rps"] == REFERENCE_RPS
            and r["setup"] == "100 adapters"
        ),
        None,
    )
    ratio = (
        cham["ttft_p99"] / ref["ttft_p99"]
        if cham and ref and cham["ttft_p99"] and ref["ttft_p99"]
        else None
    )
    result = {
        "command_line": "python -m eval.bench_cache "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "server_args": args.server_arg,
        "rows": rows,
        "chameleon_p99_ttft_at_4_over_single_adapter": ratio,
        "saturation_rps": {
            arm: saturation([r for r in rows if r["setup"] == "100 adapters"], arm)
            for arm in ("stock", "chameleon")
        },
        "max_rate_swept": max(rates),
    }
    (out / "bench_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    cols = [
        "setup",
        "arm",
        "rps",
        "ttft_p50",
        "ttft_p99",
        "tbt_p50",
        "tbt_p99",
        "completed_per_s",
        "failed",
        "hit_rate",
        "bytes_loaded",
        "max_distinct_adapters_per_batch",
    ]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)) for c in cols))
    print(
        f"chameleon P99 TTFT at {REFERENCE_RPS:g} req/s / single-adapter stock: "
        f"{_fmt(ratio)} (target <= 2)"
    )
    print(
        f"saturation (highest rate kept up, of {_fmt(max(rates))} swept): "
        f"{result['saturation_rps']} (target: chameleon above 8 req/s)"
    )
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
