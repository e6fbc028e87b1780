"""Chameleon vs stock SGLang on a real trace: same machine, same workload, same run.

``python -m eval.compare [--quick] [--trace PATH] [--rps R] [--duration S] [--requests N]
[--adapters N] [--arms stock,chameleon] [--repeats K] [--seed S] [--preset eval|tiny]
[--dtype auto] [--memory-budget equal|as-is] [--client harness|bench-serving] [--out DIR]
[--replay workload.jsonl]``

Builds (or replays) one workload, then for each repetition starts every arm's server in turn
(never two at once), warms it up, replays the workload open-loop and stops it by PID. Writes
``OUT/workload.jsonl``, ``OUT/summary.json``, ``OUT/details.json``, ``OUT/report.md``, the PNGs
and ``OUT/runs/<arm>-r<k>/`` (see ``eval/README.md``). Exit status 0 when every run completed
at least one request. Every arm gets the same memory under ``--memory-budget equal`` (the
default, :mod:`eval.memory_budget`); an arm that does not fit it is reported and not run.
``--client bench-serving`` drives the arms with SGLang's own benchmark client instead
(:mod:`eval.bench_serving_client`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from chameleon_sglang.dev.assets import build
from eval.arms import ARM_NAMES, TUNED_STOCK_ARM, parse_arms
from eval.bench_serving_client import DISTRIBUTIONS, BenchSpec, report_lines, run_arms
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
from eval.experiment import (
    check_workload_adapters,
    run_interleaved,
    select_adapters,
    workload_info,
    write_outputs,
)
from eval.metrics import ARM_KEYS
from eval.profiles import apply_gpu_like
from eval.runner import RunConfig, infeasible_arms
from eval.summary import pick_pair
from eval.tune_stock import DEFAULT_DRAIN_WAIT_S, parse_slots, tune
from eval.workload import (
    SPEC_FILE,
    build_workload,
    load_spec,
    load_workload,
    save_spec,
    save_workload,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.compare",
        description=__doc__.split("\n\n")[0],
        epilog="arms: " + ", ".join(ARM_NAMES),
    )
    add_workload_args(p)
    add_server_args(p)
    add_run_args(p)
    g = p.add_argument_group("stock-tuned arm (eval.tune_stock)")
    g.add_argument(
        "--stock-tuned-flags",
        default=None,
        help="flags of the stock-tuned arm, e.g. '--max-loras-per-batch 32' "
        "(default: tune them on the workload first)",
    )
    g.add_argument(
        "--tune-slots",
        default="8,16,32,64,all,max",
        help="--max-loras-per-batch values the tuning tries (max: the most the budget allows)",
    )
    g.add_argument(
        "--tune-drain-wait",
        type=float,
        default=DEFAULT_DRAIN_WAIT_S,
        help="--lora-drain-wait-threshold the tuning tries (0: not tried)",
    )
    g.add_argument(
        "--no-tune-overlap", action="store_true", help="do not try --enable-lora-overlap-loading"
    )
    add_profile_args(p)
    g = p.add_argument_group("client")
    g.add_argument(
        "--client",
        choices=("harness", "bench-serving"),
        default="harness",
        help="harness: replay the trace workload with our load generator; bench-serving: drive "
        "each arm with python -m sglang.bench_serving (random-ids, --requests at --rps; "
        "writes OUT/bench_serving.{json,md})",
    )
    g.add_argument("--bench-input-len", type=int, default=256)
    g.add_argument("--bench-output-len", type=int, default=48)
    g.add_argument("--bench-range-ratio", type=float, default=0.5)
    g.add_argument("--bench-lora-distribution", choices=DISTRIBUTIONS, default="uniform")
    return p


def format_summary(summary: Dict[str, Any]) -> str:
    """A short plain-text table of the per-arm medians and the ratios."""
    keys = list(ARM_KEYS)
    lines = ["arm".ljust(18) + "".join(k.rjust(15) for k in keys)]
    for arm, m in summary["arms"].items():
        lines.append(arm.ljust(18) + "".join(_cell(m[k]).rjust(15) for k in keys))
    ref, cand = pick_pair(list(summary["arms"]))
    ratios = dict(summary["ratios"])
    tuned = ratios.pop("vs_tuned", None)
    lines.append(f"ratios {cand}/{ref}: " + ", ".join(f"{k} {_cell(v)}" for k, v in ratios.items()))
    if tuned:
        lines.append(
            f"ratios {cand}/stock-tuned: " + ", ".join(f"{k} {_cell(v)}" for k, v in tuned.items())
        )
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    arms = parse_arms(resolve(args, "arms"))
    out = out_dir(args)
    print(f"output: {out}", flush=True)
    assets = build(args.preset)
    adapters = select_adapters(assets, args.adapters)
    spec = spec_from_args(args)
    if args.replay:
        workload = load_workload(args.replay)
        spec = load_spec(args.replay.with_name(SPEC_FILE)) or spec
    else:
        workload = build_workload(spec, adapters, assets.recipe.vocab_size)
    if not workload:
        print("empty workload: nothing to do", file=sys.stderr)
        return 2
    check_workload_adapters(workload, adapters)
    save_workload(out / "workload.jsonl", workload)
    save_spec(out / SPEC_FILE, spec)
    cfg = run_config(args, assets, adapters)
    cfg, cost_profile = _cost_profile(args, cfg, workload, out)
    arms, cfg, tuning = _stock_tuned(args, arms, cfg, workload, out)
    infeasible = infeasible_arms(arms, cfg)
    for why in infeasible.values():
        print(f"not run, does not fit the memory budget: {why}", flush=True)
    arms = [a for a in arms if a not in infeasible]
    if not arms:
        return 2
    repeats = resolve(args, "repeats")
    meta = {
        "command_line": _command_line(argv),
        "started": started,
        "stock_tuning": tuning,
        "memory_budget": cfg.flags.memory_budget,
        "cost_profile": cost_profile,
        "infeasible_arms": infeasible,
    }
    if args.client == "bench-serving":
        return _bench_serving(args, arms, repeats, cfg, out, meta)
    print(f"{len(workload)} requests, arms {arms}, {repeats} repeat(s)", flush=True)
    outcomes = run_interleaved(
        arms, repeats, workload, cfg, out, log=lambda s: print(s, flush=True)
    )
    info = workload_info(
        spec,
        workload,
        assets,
        adapters,
        out / "workload.jsonl",
        cfg.flags.dtype,
        str(args.replay) if args.replay else None,
    )
    meta["wall_s"] = time.perf_counter() - t0
    summary = write_outputs(out, info, outcomes, meta)
    print(format_summary(summary), flush=True)
    print(f"wall time {time.perf_counter() - t0:.0f} s; results in {out}", flush=True)
    return 0 if all(o.metrics["completed"] > 0 for os_ in outcomes.values() for o in os_) else 1


def _cost_profile(
    args: argparse.Namespace, cfg: RunConfig, workload: Sequence[Any], out: Path
) -> Tuple[RunConfig, Dict[str, Any]]:
    """``cfg`` under ``--profile`` and the profile's record (``eval.profiles``)."""
    if args.profile != "gpu-like":
        return cfg, {"profile": args.profile}
    mean_input = round(sum(r.input_len for r in workload) / len(workload))
    if args.client == "bench-serving":  # its prompts: uniform in [ratio * len, len]
        mean_input = round(args.bench_input_len * (1 + args.bench_range_ratio) / 2)
    cfg, record = apply_gpu_like(cfg, mean_input, out, cfg.adapters)
    print(f"gpu-like cost profile: {record}", flush=True)
    return cfg, record


def _stock_tuned(
    args: argparse.Namespace, arms: List[str], cfg: RunConfig, workload: Sequence[Any], out: Path
) -> Tuple[List[str], RunConfig, Optional[Dict[str, Any]]]:
    """With ``stock-tuned`` among the arms: its flags given or tuned on the workload (written
    to ``OUT/tune.json``); the arms (without it when no candidate started), the config with its
    flags, the tuning record."""
    if TUNED_STOCK_ARM not in arms:
        return arms, cfg, None
    tuning: Optional[Dict[str, Any]] = None
    if args.stock_tuned_flags is not None:
        tuned = tuple(shlex.split(args.stock_tuned_flags))
    else:
        print("tuning stock SGLang on this workload", flush=True)
        tuning = tune(
            workload,
            cfg,
            out,
            parse_slots(args.tune_slots),
            args.tune_drain_wait,
            not args.no_tune_overlap,
            log=lambda s: print(s, flush=True),
        )
        (out / "tune.json").write_text(json.dumps(tuning, indent=1) + "\n")
        if tuning["flags"] is None:
            print("no stock candidate started: stock-tuned dropped", file=sys.stderr)
            arms = [a for a in arms if a != TUNED_STOCK_ARM]
        tuned = tuple(tuning["flags"] or ())
    cfg = dataclasses.replace(cfg, arm_flags={**cfg.arm_flags, TUNED_STOCK_ARM: tuned})
    print(f"stock-tuned: {' '.join(tuned)}", flush=True)
    return arms, cfg, tuning


def _bench_serving(
    args: argparse.Namespace,
    arms: Sequence[str],
    repeats: int,
    cfg: RunConfig,
    out: Path,
    meta: Dict[str, Any],
) -> int:
    """The comparison with SGLang's own client (``eval.bench_serving_client``)."""
    spec = BenchSpec(
        num_prompts=resolve(args, "requests"),
        rps=resolve(args, "rps"),
        input_len=args.bench_input_len,
        output_len=args.bench_output_len,
        range_ratio=args.bench_range_ratio,
        distribution=args.bench_lora_distribution,
        seed=args.seed,
    )
    log = lambda s: print(s, flush=True)  # noqa: E731
    summary = run_arms(arms, repeats, cfg, spec, out, log=log, meta=meta)
    print("\n".join(report_lines(summary)), flush=True)
    print(f"results in {out}", flush=True)
    return 0 if all((m["completed"] or 0) > 0 for m in summary["arms"].values()) else 1


def _command_line(argv: Optional[Sequence[str]]) -> str:
    rest: List[str] = list(sys.argv[1:] if argv is None else argv)
    return "python -m eval.compare " + " ".join(shlex.quote(a) for a in rest)


if __name__ == "__main__":
    sys.exit(main())
