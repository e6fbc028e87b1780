"""Run arms over one workload (interleaved repetitions) and write every output of a comparison.

Contract:
* :func:`run_interleaved` runs repetition k of every arm before repetition k+1 of any (A B A B),
  one server at a time, each in ``out/runs/<arm>-r<k>/``.
* :func:`write_outputs` writes ``summary.json`` (shape checked, see ``eval.summary``),
  ``details.json``, ``report.md`` and the PNGs ``ttft_cdf.png``, ``ttft_vs_load.png``,
  ``queueing_share.png``, ``cache_memory.png`` into ``out`` and returns the summary.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from chameleon_sglang.dev.assets import AdapterInfo, Assets
from eval import plots
from eval.metrics import pooled_queueing_share, queue_source
from eval.report import write_report
from eval.runner import RunConfig, RunOutcome, run_arm, run_record
from eval.server_status import components_active
from eval.summary import build_summary, machine_info, pick_pair, validate_summary
from eval.trace import has_adapter_column
from eval.workload import WorkloadRequest, WorkloadSpec, describe

PNG_FILES: Tuple[str, ...] = (
    "ttft_cdf.png",
    "ttft_vs_load.png",
    "queueing_share.png",
    "cache_memory.png",
)


def select_adapters(assets: Assets, count: Optional[int]) -> Tuple[AdapterInfo, ...]:
    """The first ``count`` adapters of ``assets`` (all when None); ranks cycle, so any prefix
    keeps the rank mix as even as possible."""
    if count is None:
        return tuple(assets.adapters)
    if not 1 <= count <= len(assets.adapters):
        raise ValueError(f"asked for {count} adapters; the build has {len(assets.adapters)}")
    return tuple(assets.adapters[:count])


def check_workload_adapters(
    workload: Sequence[WorkloadRequest], adapters: Sequence[AdapterInfo]
) -> None:
    """Raise if a request names an adapter that will not be served."""
    served = {a.name for a in adapters}
    missing = sorted({r.adapter for r in workload} - served)
    if missing:
        raise ValueError(f"workload uses adapters not served: {missing[:10]}")


def run_interleaved(
    arms: Sequence[str],
    repeats: int,
    workload: Sequence[WorkloadRequest],
    cfg: RunConfig,
    out: Path,
    log: Callable[[str], None] = print,
) -> Dict[str, List[RunOutcome]]:
    """Every arm ``repeats`` times, interleaved (see the module contract)."""
    outcomes: Dict[str, List[RunOutcome]] = {arm: [] for arm in arms}
    for k in range(repeats):
        for arm in arms:
            log(f"[{arm} #{k}] starting server")
            o = run_arm(arm, k, workload, cfg, out / "runs" / f"{arm}-r{k}")
            m = o.metrics
            log(
                f"[{arm} #{k}] server start {o.start_s:.0f} s, load {o.load_s:.0f} s: "
                f"completed {m['completed']}, failed {m['failed']}, TTFT p50 "
                f"{_s(m['ttft_p50'])} p99 {_s(m['ttft_p99'])}, throughput "
                f"{_s(m['throughput_rps'])} req/s; other processes' CPU share "
                f"{_s(o.machine_load.get('foreign_cpu_share'))}, client lag max "
                f"{_s(o.machine_load.get('client_lag_max_s'))} s"
            )
            outcomes[arm].append(o)
    return outcomes


def _s(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def workload_info(
    spec: WorkloadSpec,
    workload: Sequence[WorkloadRequest],
    assets: Assets,
    adapters: Sequence[AdapterInfo],
    workload_file: Path,
    dtype: str,
    replayed_from: Optional[str],
) -> Dict[str, Any]:
    """The ``workload`` block of the summary: spec, description and where it came from."""
    info: Dict[str, Any] = dataclasses.asdict(spec)
    info.update(describe(workload))
    info.update(
        {
            "preset": assets.preset,
            "dtype": dtype,
            "num_adapters": len(adapters),
            "synthetic_adapters": not has_adapter_column(Path(spec.trace)),
            "workload_file": str(workload_file),
            "replayed_from": replayed_from,
        }
    )
    return info


def write_outputs(
    out: Path, info: Dict[str, Any], outcomes: Dict[str, List[RunOutcome]], meta: Dict[str, Any]
) -> Dict[str, Any]:
    """summary.json, details.json, report.md and the PNGs (see the module contract)."""
    runs = {arm: [o.metrics for o in os_] for arm, os_ in outcomes.items()}
    summary = build_summary(info, machine_info(), runs)
    errors = validate_summary(summary)
    if errors:
        raise ValueError("summary.json would not conform: " + "; ".join(errors))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    details = _details(summary, outcomes, meta)
    _plots(out, info, summary, outcomes, details)
    (out / "details.json").write_text(json.dumps(details, indent=1, default=str) + "\n")
    write_report(out / "report.md", summary, details)
    return summary


def _details(
    summary: Dict[str, Any], outcomes: Dict[str, List[RunOutcome]], meta: Dict[str, Any]
) -> Dict[str, Any]:
    arms = list(outcomes)
    ref, cand = pick_pair(arms)
    first = {arm: os_[0] for arm, os_ in outcomes.items() if os_}
    sources = {queue_source(o.results) for os_ in outcomes.values() for o in os_}
    return {
        **meta,
        "workload": summary["workload"],
        "machine": summary["machine"],
        "reference": ref,
        "candidate": cand,
        "repeats": max(len(v) for v in outcomes.values()),
        "arm_flags": {arm: list(o.own_flags) for arm, o in first.items()},
        "shared_command": _shared_command(first),
        "settings": {
            arm: {k: v for k, v in o.settings.items() if k != "chameleon_status"}
            for arm, o in first.items()
        },
        "active_components": {
            arm: components_active(o.settings.get("chameleon_status")) for arm, o in first.items()
        },
        "queue_source": sources.pop() if len(sources) == 1 else "mixed",
        "queueing": {
            arm: pooled_queueing_share([(o.results, o.profile) for o in os_])
            for arm, os_ in outcomes.items()
        },
        "profiles": {arm: o.profile.to_json() for arm, o in first.items()},
        "runs": [run_record(o) for os_ in outcomes.values() for o in os_],
        "files": [
            "summary.json",
            "details.json",
            "report.md",
            "workload.jsonl",
            *PNG_FILES,
            "runs/<arm>-r<k>/{requests.jsonl,status.jsonl,server_info.json,run.json,server.log}",
        ],
    }


def _shared_command(first: Dict[str, RunOutcome]) -> List[str]:
    """One arm's launch command without the arm's own flags, port and adapter list."""
    if not first:
        return []
    arm, o = next(iter(first.items()))
    cmd = list(o.command)
    own = list(o.own_flags)
    if own and cmd[-len(own) :] == own:
        cmd = cmd[: -len(own)]
    if "--lora-paths" in cmd:
        i = cmd.index("--lora-paths")
        j = next((k for k in range(i + 1, len(cmd)) if cmd[k].startswith("--")), len(cmd))
        cmd[i + 1 : j] = [f"<{j - i - 1} adapters>"]
    if "--port" in cmd:
        cmd[cmd.index("--port") + 1] = "<free port>"
    return cmd


def _plots(
    out: Path,
    info: Dict[str, Any],
    summary: Dict[str, Any],
    outcomes: Dict[str, List[RunOutcome]],
    details: Dict[str, Any],
) -> None:
    ttfts = {
        arm: [r.ttft_s for o in os_ for r in o.results if r.is_ok and r.ttft_s is not None]
        for arm, os_ in outcomes.items()
    }
    plots.ttft_cdf(
        ttfts,
        out / "ttft_cdf.png",
        f"TTFT CDF, {info.get('requests')} requests at {_s(info.get('offered_rps'))} req/s",
    )
    load = info.get("rps") or info.get("offered_rps")
    points = {arm: [(load, m["ttft_p50"], m["ttft_p99"])] for arm, m in summary["arms"].items()}
    plots.ttft_vs_load(points, out / "ttft_vs_load.png")
    plots.queueing_share(details["queueing"], out / "queueing_share.png", details["queue_source"])
    plots.cache_and_memory(
        {arm: os_[0].status_samples for arm, os_ in outcomes.items() if os_},
        out / "cache_memory.png",
    )
