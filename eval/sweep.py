"""Load and adapter-count sweeps relative to stock SGLang's measured capacity.

``python -m eval.sweep [--quick] [--preset eval] [--arms stock,chameleon] [--levels ...]
[--capacity-rps R] [--slo-ttft S] [--probe-rps R] [--requests N] [--adapter-counts 10,50,100,200]
[--no-load-sweep] [--no-adapter-sweep] [--settle S] [--out DIR]``

1. Stock first: its server measures the unloaded latency (sequential sample of the workload;
   SLO = ``--slo-factor`` (5) x unloaded mean TTFT, as the paper) unless ``--slo-ttft`` is
   given, and the capacity (completed req/s under an overload probe at ``--probe-rps``) unless
   ``--capacity-rps`` is given; on its load-sweep server, or on a server of its own when only
   the adapter sweep runs.
2. Load sweep: every arm at ``level x capacity`` for the levels low / medium / high / overload
   (default 0.5, 0.75, 0.9, 1.2), one server per arm reused for all its levels (ascending),
   prompts salted per point so no point shares a prefix with another.
3. Throughput at SLO: per arm, the highest swept rate whose P99 TTFT meets the SLO with no
   failed request.
4. Adapter sweep: every arm at the ``high`` rate with the first N adapters of one build, for each
   N of ``--adapter-counts`` (a fresh server per point).
Writes ``OUT/sweep.json``, ``OUT/report.md``, ``OUT/ttft_vs_load.png``,
``OUT/adapters_sweep.png`` and ``OUT/points/<point>/<arm>/`` run files.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from chameleon_sglang.dev.assets import Assets, build
from eval.arms import parse_arms
from eval.cli import (
    add_profile_args,
    add_run_args,
    add_server_args,
    add_workload_args,
    out_dir,
    resolve,
    run_config,
    spec_from_args,
)
from eval.experiment import select_adapters
from eval.profiles import apply_gpu_like
from eval.runner import ArmServer, RunConfig, RunOutcome, arm_server, measure, warm
from eval.summary import machine_info
from eval.sweep_report import write_sweep_outputs
from eval.warmup import fit_profile, run_sequential
from eval.workload import WorkloadRequest, build_workload, save_workload

LEVEL_NAMES = ("low", "medium", "high", "overload")
DEFAULT_LEVELS = (0.5, 0.75, 0.9, 1.2)
UNLOADED_SALT = 999
PROBE_SALT = 998
SETTLE_S = 5.0
SWEEP_FULL: Dict[str, Any] = {"requests": 200, "adapter_counts": "10,50,100,200"}
SWEEP_QUICK: Dict[str, Any] = {"requests": 60, "adapter_counts": "10,100"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.sweep", description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    add_server_args(p)
    add_profile_args(p)
    add_run_args(p)
    g = p.add_argument_group("sweep")
    g.add_argument(
        "--levels",
        default=",".join(map(str, DEFAULT_LEVELS)),
        help="load levels as fractions of stock capacity (low,medium,high,overload)",
    )
    g.add_argument("--capacity-rps", type=float, default=None, help="skip the capacity probe")
    g.add_argument("--probe-rps", type=float, default=8.0, help="overload rate of the probe")
    g.add_argument("--slo-factor", type=float, default=5.0, help="SLO = factor x unloaded TTFT")
    g.add_argument(
        "--slo-ttft",
        type=float,
        default=None,
        help="the TTFT SLO in seconds (skips the unloaded measurement)",
    )
    g.add_argument("--unloaded-requests", type=int, default=20)
    g.add_argument("--adapter-counts", default=None, help="comma-separated adapter counts")
    g.add_argument(
        "--settle",
        type=float,
        default=SETTLE_S,
        help="seconds the server idles between points (default %(default)s)",
    )
    g.add_argument("--no-load-sweep", action="store_true")
    g.add_argument("--no-adapter-sweep", action="store_true")
    return p


@dataclasses.dataclass
class SweepState:
    """Everything measured so far; written to ``sweep.json``."""

    slo_ttft_s: Optional[float] = None
    slo_tbt_s: Optional[float] = None
    unloaded: Dict[str, Any] = dataclasses.field(default_factory=dict)
    capacity_rps: Optional[float] = None
    load_points: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    adapter_points: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    throughput_at_slo: Dict[str, Any] = dataclasses.field(default_factory=dict)
    timings_s: Dict[str, float] = dataclasses.field(default_factory=dict)

    def calibrated(self) -> bool:
        """Both the SLO and the capacity are known (given or measured)."""
        return self.slo_ttft_s is not None and self.capacity_rps is not None


def _workload(
    args: argparse.Namespace, assets: Assets, adapters: Sequence[Any], rps: float, salt: int, n: int
) -> List[WorkloadRequest]:
    spec = spec_from_args(args, rps=rps, prompt_salt=salt, max_requests=n)
    return build_workload(spec, adapters, assets.recipe.vocab_size)


def _point(
    kind: str, name: str, rps: float, o: RunOutcome, adapters: int, slo: Optional[float]
) -> Dict[str, Any]:
    m = o.metrics
    meets = (
        slo is not None and m["ttft_p99"] is not None and m["ttft_p99"] <= slo and m["failed"] == 0
    )
    return {
        "kind": kind,
        "point": name,
        "arm": o.arm,
        "rps": rps,
        "adapters": adapters,
        "metrics": m,
        "queueing": o.queueing,
        "meets_slo": meets,
        "server_start_s": o.start_s,
        "load_s": o.load_s,
        "machine_load": o.machine_load,
    }


def measure_unloaded(
    server: ArmServer,
    args: argparse.Namespace,
    assets: Assets,
    adapters: Sequence[Any],
    state: SweepState,
) -> None:
    """Sequential sample of the workload on ``server``: the unloaded means and the SLOs."""
    sample = _workload(args, assets, adapters, 1.0, UNLOADED_SALT, args.unloaded_requests)
    prof = fit_profile(asyncio.run(run_sequential(server.url, sample)))
    state.unloaded = prof.to_json()
    if prof.ttft_mean_s is not None:
        state.slo_ttft_s = args.slo_factor * prof.ttft_mean_s
    if prof.tbt_mean_s is not None:
        state.slo_tbt_s = args.slo_factor * prof.tbt_mean_s


def calibrate_on(
    server: ArmServer,
    profile: Any,
    args: argparse.Namespace,
    cfg: RunConfig,
    out: Path,
    n: int,
    state: SweepState,
    log: Any,
) -> None:
    """The SLO (unless ``--slo-ttft``) and the capacity (unless ``--capacity-rps``), measured
    on ``server`` (stock's, the reference): step 1 of the module contract."""
    if state.slo_ttft_s is None:
        measure_unloaded(server, args, cfg.assets, cfg.adapters, state)
    if state.capacity_rps is None:
        probe = _workload(args, cfg.assets, cfg.adapters, args.probe_rps, PROBE_SALT, n)
        o = measure(server, 0, probe, cfg, profile, out / "points" / "probe" / server.arm)
        state.capacity_rps = o.metrics["throughput_rps"]
    log(
        f"[{server.arm}] unloaded TTFT {state.unloaded.get('ttft_mean_s')} s, SLO "
        f"{state.slo_ttft_s} s, capacity {state.capacity_rps} req/s"
    )
    time.sleep(args.settle)


def calibrate(
    args: argparse.Namespace,
    arm: str,
    cfg: RunConfig,
    out: Path,
    n: int,
    state: SweepState,
    log: Any,
) -> None:
    """:func:`calibrate_on` a fresh server of ``arm`` (an adapter sweep without a load sweep)."""
    with arm_server(arm, cfg, out / "points" / "calibrate" / arm) as server:
        calibrate_on(server, warm(server, cfg, args.max_input), args, cfg, out, n, state, log)


def load_sweep(
    args: argparse.Namespace,
    arms: List[str],
    cfg: RunConfig,
    out: Path,
    levels: List[float],
    n: int,
    state: SweepState,
    log: Any,
) -> None:
    """Stock first (unloaded, capacity), then every arm over the levels on one server each."""
    for arm in arms:
        with arm_server(arm, cfg, out / "points" / "load" / arm) as server:
            profile = warm(server, cfg, args.max_input)
            if arm == arms[0] and not state.calibrated():
                calibrate_on(server, profile, args, cfg, out, n, state, log)
            for i, level in enumerate(levels):
                rps = level * (state.capacity_rps or args.probe_rps)
                name = LEVEL_NAMES[i] if i < len(LEVEL_NAMES) else f"level{i}"
                wl = _workload(args, cfg.assets, cfg.adapters, rps, i + 1, n)
                save_workload(out / "points" / "load" / name / "workload.jsonl", wl)
                o = measure(server, 0, wl, cfg, profile, out / "points" / "load" / name / arm)
                state.load_points.append(
                    _point("load", name, rps, o, len(cfg.adapters), state.slo_ttft_s)
                )
                log(
                    f"[{arm}] {name} {rps:.2f} req/s: TTFT p99 {o.metrics['ttft_p99']}, "
                    f"completed {o.metrics['completed']}/{len(wl)}"
                )
                time.sleep(args.settle)


def adapter_sweep(
    args: argparse.Namespace,
    arms: List[str],
    cfg: RunConfig,
    out: Path,
    counts: List[int],
    rps: float,
    n: int,
    state: SweepState,
    log: Any,
) -> None:
    """Every arm at ``rps`` serving the first N adapters, for each N (fresh server each)."""
    assets = cfg.assets
    if max(counts) > len(assets.adapters):
        assets = build(assets.preset, max(counts))
    for count in counts:
        adapters = select_adapters(assets, count)
        sub = dataclasses.replace(cfg, assets=assets, adapters=adapters)
        wl = _workload(args, assets, adapters, rps, 100 + count, n)
        save_workload(out / "points" / f"adapters-{count}" / "workload.jsonl", wl)
        for arm in arms:
            run_dir = out / "points" / f"adapters-{count}" / arm
            with arm_server(arm, sub, run_dir) as server:
                o = measure(server, 0, wl, sub, warm(server, sub, args.max_input), run_dir)
            state.adapter_points.append(
                _point("adapters", f"adapters-{count}", rps, o, count, state.slo_ttft_s)
            )
            log(
                f"[{arm}] {count} adapters at {rps:.2f} req/s: TTFT p99 "
                f"{o.metrics['ttft_p99']}, completed {o.metrics['completed']}/{len(wl)}"
            )


def throughput_at_slo(points: Sequence[Dict[str, Any]], arms: Sequence[str]) -> Dict[str, Any]:
    """Per arm: the highest swept rate meeting the SLO and the throughput measured there."""
    out: Dict[str, Any] = {}
    for arm in arms:
        ok = [p for p in points if p["arm"] == arm and p["meets_slo"]]
        best = max(ok, key=lambda p: p["rps"]) if ok else None
        out[arm] = {
            "rps": best["rps"] if best else None,
            "throughput_rps": best["metrics"]["throughput_rps"] if best else None,
            "point": best["point"] if best else None,
        }
    return out


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    arms = parse_arms(resolve(args, "arms"))
    if "stock" in arms:
        arms = ["stock"] + [a for a in arms if a != "stock"]
    preset = SWEEP_QUICK if args.quick else SWEEP_FULL
    n = args.requests or preset["requests"]
    counts = _ints(args.adapter_counts or preset["adapter_counts"])
    levels = [float(x) for x in args.levels.split(",")]
    out = out_dir(args, prefix="sweep-")
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"output: {out}")
    assets = build(args.preset)
    cfg = run_config(args, assets, select_adapters(assets, args.adapters))
    cost_profile: Dict[str, Any] = {"profile": args.profile}
    if args.profile == "gpu-like":
        probe = _workload(args, assets, cfg.adapters, args.probe_rps, 0, n)
        mean_input = round(sum(r.input_len for r in probe) / max(1, len(probe)))
        cfg, cost_profile = apply_gpu_like(cfg, mean_input, out, cfg.adapters)
        log(f"gpu-like cost profile: {cost_profile}")
    state = SweepState(capacity_rps=args.capacity_rps, slo_ttft_s=args.slo_ttft)
    if not args.no_load_sweep:
        t = time.perf_counter()
        load_sweep(args, arms, cfg, out, levels, n, state, log)
        state.timings_s["load_sweep"] = time.perf_counter() - t
        state.throughput_at_slo = throughput_at_slo(state.load_points, arms)
    if not args.no_adapter_sweep:
        t = time.perf_counter()
        if not state.calibrated():
            calibrate(args, arms[0], cfg, out, n, state, log)
        high = levels[min(2, len(levels) - 1)] * (state.capacity_rps or args.probe_rps)
        adapter_sweep(args, arms, cfg, out, counts, high, n, state, log)
        state.timings_s["adapter_sweep"] = time.perf_counter() - t
    state.timings_s["total"] = time.perf_counter() - t0
    meta = {
        "arms": arms,
        "levels": dict(zip(LEVEL_NAMES, levels)),
        "requests_per_point": n,
        "adapter_counts": counts,
        "machine": machine_info(),
        "preset": args.preset,
        "memory_budget": cfg.flags.memory_budget,
        "cost_profile": cost_profile,
        "command_line": "python -m eval.sweep " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    result = {**meta, **dataclasses.asdict(state)}
    (out / "sweep.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    write_sweep_outputs(out, result)
    log(f"throughput at SLO: {state.throughput_at_slo}")
    log(f"wall time {state.timings_s['total']:.0f} s; results in {out}")
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
