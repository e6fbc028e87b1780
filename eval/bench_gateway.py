"""Chameleon servers behind SGLang's model gateway (``smg``): routing by adapter against the
gateway's own policies, same workload, same run.

``python -m eval.bench_gateway [eval.compare's workload and server options] [--policies
prefix_hash,cache_aware,round_robin] [--servers 2] [--no-dp-reference] [--out DIR]``

Each gateway arm starts ``--servers`` Chameleon servers (eval.compare's ``chameleon`` arm, each
pinned to its own core with ``taskset`` where the machine has enough) and ``smg launch --policy
P`` in front; the ``prefix_hash`` arm sends each request's adapter in ``X-SMG-Routing-Key``
(chameleon_sglang.dev.gateway), the others send nothing extra. The reference arm ``dp-2`` is one
server with ``--dp-size 2 --load-balance-method chameleon`` (adapter affinity inside SGLang).
Per arm: adapter bytes loaded over every server (whole run, and after warm-up: after the first
third of the arrivals), adapter-cache hit rate, TTFT P50/P99, requests per server and balance
(max / mean). Writes ``OUT/gateway.json`` and ``OUT/gateway.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import requests

from chameleon_sglang.dev.assets import build
from chameleon_sglang.dev.gateway import ROUTING_HEADER, gateway_command, workers_ready
from chameleon_sglang.dev.serve import ServerProcess, free_port
from eval.cli import (
    add_profile_args,
    add_run_args,
    add_server_args,
    add_workload_args,
    out_dir,
    run_config,
    spec_from_args,
)
from eval.experiment import select_adapters
from eval.loadgen import run_load_sync
from eval.metrics import percentile
from eval.runner import RunConfig, planned_command
from eval.summary import machine_header
from eval.warmup import warm_up
from eval.workload import build_workload, save_workload

POLICIES = ("prefix_hash", "cache_aware", "round_robin")
DP_REFERENCE = "dp-2"
WARM_FRACTION = 1.0 / 3.0
TARGETS = {"bytes_after_warm": 0.5, "ttft_p99": 1.0, "balance": 1.3}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(p)
    add_server_args(p)
    add_profile_args(p)
    add_run_args(p)
    p.add_argument("--policies", default=",".join(POLICIES), help="smg --policy values")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--no-dp-reference", action="store_true")
    return p


def _stats(url: str) -> List[Dict[str, Any]]:
    """Each scheduler's adapter cache and DP counters (``/chameleon/stats``)."""
    ranks = requests.get(url + "/chameleon/stats", timeout=60).json().get("ranks") or []
    return [
        {
            "bytes_loaded": int((r.get("adapter_cache") or {}).get("bytes_loaded") or 0),
            "hits": int((r.get("adapter_cache") or {}).get("hits") or 0),
            "misses": int((r.get("adapter_cache") or {}).get("misses") or 0),
            "dp_requests": (r.get("dp") or {}).get("num_requests"),
        }
        for r in ranks
    ]


def _answered(server: ServerProcess) -> int:
    """``/generate`` requests the server answered (its access log)."""
    if server.log_path is None or not server.log_path.exists():
        return 0
    return server.log_path.read_text(errors="replace").count('"POST /generate HTTP/1.1" 200')


def _pinned(cmd: List[str], core: int) -> List[str]:
    """``cmd`` on one core where the machine has a core per server, else as it is."""
    return ["taskset", "-c", str(core), *cmd] if (os.cpu_count() or 1) > core else cmd


@contextlib.contextmanager
def gateway_arm(
    policy: str, cfg: RunConfig, log_dir: Path, num_servers: int
) -> Iterator[Tuple[str, List[ServerProcess]]]:
    """``num_servers`` Chameleon servers (one core each) and smg with ``--policy policy``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    servers = []
    for i in range(num_servers):
        port = free_port()
        cmd, _ = planned_command("chameleon", cfg, port)
        servers.append(ServerProcess(_pinned(cmd, i), port, log_dir / f"server{i}.log"))
    port = free_port()
    gateway = ServerProcess(
        gateway_command(port, [s.url for s in servers], ("--policy", policy)),
        port,
        log_dir / "gateway.log",
    )
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_healthy(cfg.start_timeout_s)
        gateway.launch()
        deadline = time.monotonic() + 60
        while not workers_ready(gateway.url, num_servers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"smg did not register the servers (log: {log_dir})")
            time.sleep(0.2)
        yield gateway.url, servers
    finally:
        for process in (gateway, *servers):
            process.stop()


@contextlib.contextmanager
def dp_arm(cfg: RunConfig, log_dir: Path) -> Iterator[Tuple[str, List[ServerProcess]]]:
    """One server, two replicas with adapter-affinity dispatch."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd, _ = planned_command("dp-affinity", cfg, port)
    with ServerProcess(cmd, port, log_dir / "server.log") as server:
        yield server.url, [server]


def run_arm(
    name: str, arm: Any, cfg: RunConfig, workload: Sequence[Any], out: Path
) -> Dict[str, Any]:
    """Warm up every server, replay the workload through the arm, read the counters."""
    with arm as (url, servers):
        for server in servers:
            warm_up(server.url, cfg.adapters, cfg.assets.recipe.vocab_size, 64, seed=cfg.seed)
        before = [_stats(s.url) for s in servers]
        answered_before = [_answered(s) for s in servers]
        cut_s = sorted(r.arrival_s for r in workload)[int(len(workload) * WARM_FRACTION)]
        at_cut: Dict[str, Any] = {}
        timer = threading.Timer(
            cut_s, lambda: at_cut.update(stats=[_stats(s.url) for s in servers])
        )
        timer.start()
        deadline = max(r.arrival_s for r in workload) + cfg.drain_s
        header = ROUTING_HEADER if name == "prefix_hash" else None
        results = run_load_sync(url, workload, deadline, cfg.progress, name, header)
        timer.cancel()
        after = [_stats(s.url) for s in servers]
        answered = [_answered(s) - b for s, b in zip(servers, answered_before)]
    return summarize(name, results, before, at_cut.get("stats"), after, answered, cut_s)


def _total(stats: Optional[List[List[Dict[str, Any]]]], key: str) -> Optional[int]:
    if stats is None:
        return None
    return sum(int(rank[key] or 0) for server in stats for rank in server)


def summarize(
    name: str,
    results: Sequence[Any],
    before: List[List[Dict[str, Any]]],
    at_cut: Optional[List[List[Dict[str, Any]]]],
    after: List[List[Dict[str, Any]]],
    answered: List[int],
    cut_s: float,
) -> Dict[str, Any]:
    """One arm's row (module docstring)."""
    ok = [r for r in results if r.is_ok and r.ttft_s is not None]
    warm = [r.ttft_s for r in ok if r.arrival_s >= cut_s]
    per_server = answered
    if name == DP_REFERENCE:  # one server: requests per replica from its own counters
        per_server = [
            int(a["dp_requests"] or 0) - int(b["dp_requests"] or 0)
            for a, b in zip(after[0], before[0])
        ]
    hits = _total(after, "hits") - _total(before, "hits")
    lookups = hits + _total(after, "misses") - _total(before, "misses")
    mean = sum(per_server) / len(per_server) if per_server else 0
    return {
        "arm": name,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "ttft_p50": percentile([r.ttft_s for r in ok], 50),
        "ttft_p99": percentile([r.ttft_s for r in ok], 99),
        "ttft_p99_after_warm": percentile(warm, 99),
        "bytes_loaded": _total(after, "bytes_loaded") - _total(before, "bytes_loaded"),
        "bytes_after_warm": None
        if at_cut is None
        else _total(after, "bytes_loaded") - _total(at_cut, "bytes_loaded"),
        "hit_rate": hits / lookups if lookups else None,
        "requests_per_server": per_server,
        "balance": max(per_server) / mean if mean else None,
    }


def ratios(rows: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Optional[float]]]:
    """``prefix_hash`` over each other gateway policy."""
    ours = rows.get("prefix_hash")
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for name, row in rows.items():
        if ours is None or name in ("prefix_hash", DP_REFERENCE):
            continue
        out[name] = {
            key: (ours[key] / row[key]) if ours.get(key) and row.get(key) else None
            for key in ("bytes_loaded", "bytes_after_warm", "ttft_p50", "ttft_p99")
        }
    return out


def format_markdown(report: Dict[str, Any]) -> str:
    keys = [
        ("bytes_loaded", "bytes loaded (MB)", 1e-6),
        ("bytes_after_warm", "after warm-up (MB)", 1e-6),
        ("hit_rate", "hit rate", 1),
        ("ttft_p50", "TTFT P50 (s)", 1),
        ("ttft_p99", "TTFT P99 (s)", 1),
        ("balance", "balance", 1),
    ]
    lines = [
        f"{report['header']['date']}, dtype {report['header']['dtype']}, "
        f"{report['num_requests']} requests; command: `{report['command_line']}`",
        "",
        "| arm | " + " | ".join(label for _, label, _ in keys) + " | requests per server |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for row in report["arms"].values():
        cells = ["-" if row.get(k) is None else f"{row[k] * scale:.3g}" for k, _, scale in keys]
        lines.append(
            f"| {row['arm']} | " + " | ".join(cells) + f" | {row['requests_per_server']} |"
        )
    for name, r in report["ratios"].items():
        parts = ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in r.items())
        lines.append(f"\nprefix_hash over {name}: {parts}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    out = out_dir(args, "gateway-")
    assets = build(args.preset)
    adapters = select_adapters(assets, args.adapters)
    workload = build_workload(spec_from_args(args), adapters, assets.recipe.vocab_size)
    save_workload(out / "workload.jsonl", workload)
    cfg = run_config(args, assets, adapters)
    arms: List[Tuple[str, Any]] = [
        (p, gateway_arm(p, cfg, out / p, args.servers)) for p in args.policies.split(",") if p
    ]
    if not args.no_dp_reference:
        arms.append((DP_REFERENCE, dp_arm(cfg, out / DP_REFERENCE)))
    rows: Dict[str, Dict[str, Any]] = {}
    for name, arm in arms:
        print(f"arm {name}: {len(workload)} requests", flush=True)
        rows[name] = run_arm(name, arm, cfg, workload, out)
        print(json.dumps(rows[name]), flush=True)
    report = {
        "header": machine_header(cfg.flags.dtype) | {"date": datetime.date.today().isoformat()},
        "command_line": "python -m eval.bench_gateway " + " ".join(argv or sys.argv[1:]),
        "num_requests": len(workload),
        "arms": rows,
        "ratios": ratios(rows),
        "targets": TARGETS,
    }
    (out / "gateway.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gateway.md").write_text(format_markdown(report))
    print(format_markdown(report), flush=True)
    return 0 if all(r["completed"] > 0 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
