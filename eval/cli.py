"""Command-line options shared by ``eval.compare`` and ``eval.sweep``.

Contract: options left unset resolve to the ``quick`` defaults when ``--quick`` is given, else to
the full defaults (:data:`FULL` / :data:`QUICK`); :func:`spec_from_args` and
:func:`flags_from_args` turn the parsed options into a :class:`WorkloadSpec` and
:class:`ServerFlags`.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from chameleon_sglang.dev.assets import AdapterInfo, Assets
from eval.arms import ServerFlags, auto_dtype
from eval.memory_budget import MEMORY_BUDGETS
from eval.profiles import PROFILES
from eval.runner import RunConfig
from eval.trace import DEFAULT_TRACE, REPO_ROOT
from eval.workload import WorkloadSpec

RESULTS_DIR = REPO_ROOT / "eval" / "results"

FULL: Dict[str, Any] = {
    "requests": 300,
    "rps": 3.0,
    "repeats": 2,
    "drain": 120.0,
    "arms": "stock,chameleon",
    "wait_quiet": 120.0,
}
QUICK: Dict[str, Any] = {
    "requests": 150,
    "rps": 3.0,
    "repeats": 1,
    "drain": 60.0,
    "arms": "stock,chameleon",
    "wait_quiet": 30.0,
}


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help="CSV TIMESTAMP,ContextTokens,GeneratedTokens[,AdapterId]",
    )
    g.add_argument(
        "--replay",
        type=Path,
        default=None,
        help="replay this workload.jsonl exactly instead of building one",
    )
    g.add_argument("--requests", type=int, default=None, help="number of requests")
    g.add_argument("--duration", type=float, default=None, help="keep arrivals within S seconds")
    g.add_argument("--rps", type=float, default=None, help="Poisson arrival rate (req/s)")
    g.add_argument(
        "--trace-arrivals",
        action="store_true",
        help="use the trace's timestamps (times --time-scale) instead of Poisson",
    )
    g.add_argument("--time-scale", type=float, default=1.0, help="multiply trace offsets")
    g.add_argument("--start-row", type=int, default=0, help="first trace row used")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent within a rank")
    g.add_argument(
        "--rank-zipf",
        type=float,
        default=0.0,
        help="Zipf exponent over ranks, smallest rank most popular (0: uniform)",
    )
    g.add_argument("--length-divisor", type=float, default=8.0)
    g.add_argument("--max-input", type=int, default=512)
    g.add_argument("--max-output", type=int, default=64)
    g.add_argument("--min-output", type=int, default=4)


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server (same for every arm)")
    g.add_argument("--preset", default="eval", choices=["tiny", "eval"])
    g.add_argument(
        "--adapters",
        type=int,
        default=None,
        help="serve the first N adapters of the preset (default: all)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="auto: bfloat16 where the CPU has AVX512-BF16/AMX, else float32",
    )
    g.add_argument(
        "--max-total-tokens",
        type=int,
        default=65536,
        help="KV tokens; under --memory-budget equal, every arm's whole memory budget",
    )
    g.add_argument(
        "--memory-budget",
        choices=MEMORY_BUDGETS,
        default="equal",
        help="equal: arms with LoRA slot buffers (stock) lose their bytes from the KV pool, as "
        "on a GPU, so every arm has the same memory; as-is: every arm gets --max-total-tokens "
        "of KV on top of its slots",
    )
    g.add_argument("--max-lora-rank", type=int, default=128)
    g.add_argument("--max-loras-per-batch", type=int, default=8)
    g.add_argument(
        "--no-server-metrics",
        action="store_true",
        help="do not pass --enable-metrics (queueing time is then estimated)",
    )
    g.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra sglang flag for every arm (repeatable; use --server-arg=--flag)",
    )


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument_group("cost profile").add_argument(
        "--profile",
        choices=PROFILES,
        default="cpu",
        help="gpu-like: every arm's adapter copies held to a host link at which a mean adapter "
        "load costs, next to an unloaded TTFT, what it costs on the paper's GPU (eval.profiles; "
        "calibrated on a stock server first)",
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--quick", action="store_true", help="small, fast defaults")
    g.add_argument("--arms", default=None, help="comma-separated arm names")
    g.add_argument("--repeats", type=int, default=None, help="repetitions per arm")
    g.add_argument(
        "--drain",
        type=float,
        default=None,
        help="seconds allowed after the last arrival before a run is cut off",
    )
    g.add_argument(
        "--status-interval",
        type=float,
        default=5.0,
        help="seconds between /server_info samples during a run",
    )
    g.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        help="before each server start, wait up to S seconds for other processes "
        "to use at most 25%% of the CPU (0: do not wait)",
    )
    g.add_argument("--out", type=Path, default=None, help="output directory")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve(args: argparse.Namespace, name: str) -> Any:
    """``args.<name>`` if set, else the quick or full default."""
    value = getattr(args, name)
    if value is not None:
        return value
    return (QUICK if args.quick else FULL)[name]


def spec_from_args(args: argparse.Namespace, **overrides: Any) -> WorkloadSpec:
    spec = WorkloadSpec(
        trace=str(args.trace),
        seed=args.seed,
        zipf_s=args.zipf,
        rank_zipf_s=args.rank_zipf,
        length_divisor=args.length_divisor,
        max_input=args.max_input,
        max_output=args.max_output,
        min_output=args.min_output,
        time_scale=args.time_scale,
        rps=None if args.trace_arrivals else resolve(args, "rps"),
        max_requests=resolve(args, "requests"),
        duration_s=args.duration,
        start_row=args.start_row,
    )
    return WorkloadSpec(**{**spec.__dict__, **overrides})


def flags_from_args(args: argparse.Namespace) -> ServerFlags:
    """The shared server flags; ``--dtype auto`` resolved for this CPU."""
    return ServerFlags(
        dtype=auto_dtype() if args.dtype == "auto" else args.dtype,
        max_total_tokens=args.max_total_tokens,
        max_lora_rank=args.max_lora_rank,
        max_loras_per_batch=args.max_loras_per_batch,
        enable_metrics=not args.no_server_metrics,
        extra=tuple(args.server_arg),
        memory_budget=args.memory_budget,
    )


def run_config(
    args: argparse.Namespace, assets: Assets, adapters: Sequence[AdapterInfo]
) -> RunConfig:
    """The :class:`RunConfig` for the parsed options."""
    return RunConfig(
        assets=assets,
        adapters=tuple(adapters),
        flags=flags_from_args(args),
        drain_s=resolve(args, "drain"),
        status_interval_s=args.status_interval,
        progress=not args.no_progress,
        seed=args.seed,
        quiet_max_wait_s=resolve(args, "wait_quiet"),
        min_kv_tokens=args.max_input + args.max_output,
    )


def out_dir(args: argparse.Namespace, prefix: str = "") -> Path:
    """``--out`` or ``eval/results/<prefix><timestamp>``, created."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path: Optional[Path] = args.out or RESULTS_DIR / f"{prefix}{stamp}"
    path.mkdir(parents=True, exist_ok=True)
    return path
