"""The adapter-catalog benchmark: a thousand adapters on disk, stock SGLang against Chameleon.

Arms, started one after another on this machine, same workload, same run:

* ``stock``: every adapter pre-registered with ``--lora-paths`` (how stock SGLang serves a
  catalog today; ``--max-loaded-loras`` cannot be below the number of ``--lora-paths``, so every
  adapter sits in host memory);
* ``chameleon``: ``--chameleon --chameleon-adapter-dir`` only (adapters read on first request,
  off the scheduler loop, into a bounded host tier);
* ``chameleon-empty``: Chameleon with an empty adapter directory, start-up only (the start-up of
  a server with no adapters).

Reported per arm and dtype: start-up time (launch to healthy), host RSS of the server's process
tree after start and after the load, TTFT P50/P99 of warm and cold requests (cold: the first
request of the run for its adapter), TBT P99 of warm requests whose tokens arrived while a cold
request waited for its first token (what a cold read costs the others) and outside such windows,
and the host tier's hit rate. The workload: ``--requests`` Poisson arrivals at ``--rate`` over
the catalog with Zipf popularity (``--zipf``), prompts 64-256 tokens, outputs 16-48.

    python -m eval.catalog                       # the catalog preset, fp32 and bf16
    python -m eval.catalog --dtypes float32 --host-cache-gb 0.2   # a host tier under pressure
    python -m eval.catalog --preset tiny --requests 20 --dtypes float32   # a smoke run
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from chameleon_sglang.dev.assets import Assets, build
from chameleon_sglang.dev.serve import ServerProcess, free_port, server_command
from eval.loadgen import RequestResult, run_load_sync
from eval.metrics import percentile
from eval.summary import machine_header
from eval.workload import MIN_TOKEN_ID, WorkloadRequest

ARMS = ("stock", "chameleon")
SEED = 20261207


def catalog_workload(
    assets: Assets, num_requests: int, rate: float, zipf: float, seed: int = SEED
) -> List[WorkloadRequest]:
    """Poisson arrivals at ``rate``; adapter ``k`` (in a seeded random order of the catalog)
    drawn with probability proportional to ``1 / k**zipf``; random prompts (no shared prefix)."""
    rng = np.random.default_rng(seed)
    adapters = list(assets.adapters)
    order = rng.permutation(len(adapters))
    weights = 1.0 / np.arange(1, len(adapters) + 1) ** zipf
    picks = rng.choice(len(adapters), size=num_requests, p=weights / weights.sum())
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=num_requests))
    vocab = assets.recipe.vocab_size
    requests = []
    for i in range(num_requests):
        adapter = adapters[int(order[picks[i]])]
        input_len = int(rng.integers(64, 257))
        output_len = int(rng.integers(16, 49))
        ids = tuple(int(t) for t in rng.integers(MIN_TOKEN_ID, vocab, size=input_len))
        requests.append(
            WorkloadRequest(
                index=i,
                arrival_s=float(arrivals[i]),
                adapter=adapter.name,
                rank=adapter.rank,
                input_len=input_len,
                output_len=output_len,
                size_class="-",
                wrs=0.0,
                trace_row=-1,
                trace_input=input_len,
                trace_output=output_len,
                input_ids=ids,
            )
        )
    return requests


def cold_indices(requests: Sequence[WorkloadRequest]) -> set:
    """Indices of the first request of each adapter (in arrival order)."""
    seen, cold = set(), set()
    for req in sorted(requests, key=lambda r: r.arrival_s):
        if req.adapter not in seen:
            seen.add(req.adapter)
            cold.add(req.index)
    return cold


def tbt_during_cold_waits(
    results: Sequence[RequestResult], cold: set
) -> Tuple[List[float], List[float]]:
    """Gaps between tokens of warm requests: those ending while a cold request waited for its
    first token, and the others."""
    windows = sorted(
        (r.sent_s, r.sent_s + r.ttft_s)
        for r in results
        if r.index in cold and r.is_ok and r.sent_s is not None and r.ttft_s is not None
    )
    starts = [w[0] for w in windows]
    during: List[float] = []
    outside: List[float] = []
    for r in results:
        if r.index in cold or not r.is_ok or r.sent_s is None or r.ttft_s is None:
            continue
        t = r.sent_s + r.ttft_s
        for gap in r.tbt_s:
            t += gap
            i = bisect.bisect_right(starts, t) - 1
            inside = any(windows[j][0] <= t <= windows[j][1] for j in range(max(0, i - 8), i + 1))
            (during if inside else outside).append(gap)
    return during, outside


def process_tree_rss_mb(server: ServerProcess) -> Optional[float]:
    """Resident memory of the server's processes together (MB)."""
    import psutil

    if server.proc is None:
        return None
    try:
        root = psutil.Process(server.proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return round(total / 1e6, 1)


def arm_command(
    arm: str,
    assets: Assets,
    port: int,
    dtype: str,
    scratch: Path,
    chameleon_args: Sequence[str] = (),
) -> List[str]:
    """The launch command of ``arm`` (module docstring); ``scratch`` holds the empty directory;
    ``chameleon_args`` are added to the Chameleon arms' flags."""
    if arm == "stock":
        return server_command(assets, port, chameleon=False, dtype=dtype, warmup=False)
    directory = Path(assets.root) / "adapters" if arm == "chameleon" else scratch / "empty"
    directory.mkdir(exist_ok=True)
    return server_command(
        assets,
        port,
        chameleon=True,
        dtype=dtype,
        adapters=[],
        warmup=False,
        extra_args=[
            "--chameleon-adapter-dir",
            str(directory),
            "--max-lora-rank",
            str(assets.max_rank),
            *chameleon_args,
        ],
    )


def run_arm(
    arm: str,
    assets: Assets,
    dtype: str,
    requests: Sequence[WorkloadRequest],
    log_dir: Path,
    measure_load: bool = True,
    chameleon_args: Sequence[str] = (),
) -> Dict[str, Any]:
    """Start ``arm``, measure its start-up, run the workload, collect the figures."""
    port = free_port()
    cmd = arm_command(arm, assets, port, dtype, log_dir, chameleon_args)
    server = ServerProcess(cmd, port, log_path=log_dir / f"{arm}-{dtype}.log")
    started = time.monotonic()
    server.start(timeout_s=1800.0)
    try:
        record: Dict[str, Any] = {
            "arm": arm,
            "dtype": dtype,
            "startup_s": round(time.monotonic() - started, 2),
            "rss_after_start_mb": process_tree_rss_mb(server),
        }
        if not measure_load:
            return record
        warm_up(server.url)
        deadline = requests[-1].arrival_s + 600.0
        results = run_load_sync(server.url, requests, deadline, progress=False, desc=arm)
        record["rss_after_load_mb"] = process_tree_rss_mb(server)
        record.update(load_figures(results, cold_indices(requests)))
        record["host_tier"] = _host_tier(server.url)
        return record
    finally:
        server.stop()


def warm_up(url: str, count: int = 3) -> None:
    """A few base-model requests (no adapter), so that the first measured requests do not pay
    for the server's first batches."""
    import requests as http

    body = {"input_ids": list(range(MIN_TOKEN_ID, MIN_TOKEN_ID + 64)),
            "sampling_params": {"max_new_tokens": 8, "temperature": 0}}  # fmt: skip
    for _ in range(count):
        http.post(url + "/generate", json=body, timeout=300).raise_for_status()


def load_figures(results: Sequence[RequestResult], cold: set) -> Dict[str, Any]:
    """TTFT of warm and cold requests, TBT of warm requests during and outside cold waits."""
    ok = [r for r in results if r.is_ok]

    def ms(values: Sequence[float], q: float) -> Optional[float]:
        p = percentile(list(values), q)
        return None if p is None else round(p * 1000, 1)

    warm = [r.ttft_s for r in ok if r.index not in cold]
    cold_ttft = [r.ttft_s for r in ok if r.index in cold]
    during, outside = tbt_during_cold_waits(results, cold)
    return {
        "requests": len(results),
        "ok": len(ok),
        "cold_requests": len(cold),
        "ttft_p50_ms": ms([r.ttft_s for r in ok], 50),
        "ttft_p99_ms": ms([r.ttft_s for r in ok], 99),
        "warm_ttft_p50_ms": ms(warm, 50),
        "warm_ttft_p99_ms": ms(warm, 99),
        "cold_ttft_p50_ms": ms(cold_ttft, 50),
        "cold_ttft_p99_ms": ms(cold_ttft, 99),
        "warm_tbt_p99_during_cold_ms": ms(during, 99),
        "warm_tbt_p99_otherwise_ms": ms(outside, 99),
        "errors": sorted({(r.error or r.status)[:120] for r in results if not r.is_ok})[:5],
    }


def _host_tier(url: str) -> Optional[Dict[str, Any]]:
    import requests as http

    try:
        return http.get(url + "/chameleon/stats", timeout=30).json().get("host_tier")
    except (http.RequestException, ValueError):
        return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="catalog")
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second")
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument(
        "--host-cache-gb", type=float, default=None, help="the Chameleon arms' host budget"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the records (JSON)")
    args = parser.parse_args(argv)

    assets = build(args.preset)
    requests = catalog_workload(assets, args.requests, args.rate, args.zipf)
    extra = (
        [] if args.host_cache_gb is None else ["--chameleon-host-cache-gb", str(args.host_cache_gb)]
    )
    records: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="catalog-logs-") as logs:
        for dtype in args.dtypes:
            print(json.dumps(machine_header(dtype)), flush=True)
            print(json.dumps({"preset": args.preset, "adapters": len(assets.adapters),
                              "requests": args.requests, "rate": args.rate,
                              "zipf": args.zipf, "distinct_adapters_requested":
                              len({r.adapter for r in requests})}), flush=True)  # fmt: skip
            empty = run_arm("chameleon-empty", assets, dtype, requests, Path(logs), False, extra)
            print(json.dumps(empty), flush=True)
            records.append(empty)
            for arm in args.arms:
                record = run_arm(arm, assets, dtype, requests, Path(logs), True, extra)
                print(json.dumps(record), flush=True)
                records.append(record)
    if args.out is not None:
        args.out.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
