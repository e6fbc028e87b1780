"""A burst of unknown adapter names: does it cost the server memory or slow other requests?

``python -m eval.name_burst [--names 10000] [--concurrency 32] [--preset tiny] [--dtype auto]
[--arms chameleon,stock] [--streams 2] [--baseline-s 30] [--out DIR]``

For each arm, one after the other (never both loaded at once):

1. starts its server -- ``chameleon``: an adapter directory holding copies of the preset's
   adapters and nothing registered; ``stock``: SGLang with four adapters in ``--lora-paths``, which
   refuses unknown names itself -- and takes a probe (a greedy request's output);
2. baseline: ``--streams`` clients in a closed loop of streamed generations of known adapters
   for ``--baseline-s`` seconds; the gaps between streamed tokens (TBT);
3. burst: the same streams while ``--names`` distinct names that no directory holds are sent,
   ``--concurrency`` at a time; TBT of the streams meanwhile;
4. asserts: every burst request answered with a 400 that names its adapter; no name
   registered afterwards (``/v1/models`` unchanged), with ``chameleon`` nothing loading and at
   most one load failure remembered (the catalog keeps none for a name it never found); the
   server's memory (RSS of its process group) grew by less than 5% over the burst; the probe's
   output unchanged. Reports TBT P50/P99 during the burst over the baseline, and chameleon over
   stock (burst duration, TBT P99 during it): on a 2-core machine the burst's HTTP handling (and
   this client) share the cores with the model, so both arms slow down; what the catalog must
   not add is a slowdown beyond stock's own refusals.

Writes ``name-burst.json``; exit status 0 only when every check holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import aiohttp
import requests

from chameleon_sglang.dev.assets import build
from chameleon_sglang.dev.serve import ServerProcess, free_port, server_command
from eval.arms import auto_dtype
from eval.metrics import percentile
from eval.soak import RSS_GROWTH_LIMIT, group_rss_kb, probe, settle
from eval.summary import cpu_flags

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]


async def stream_gaps(
    session: aiohttp.ClientSession, url: str, adapter: str, tokens: int
) -> List[float]:
    """One streamed greedy generation; the seconds between consecutive streamed chunks."""
    body = {
        "input_ids": PROMPT,
        "lora_path": adapter,
        "stream": True,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True},
    }
    gaps: List[float] = []
    last: Optional[float] = None
    async with session.post(url + "/generate", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            if not raw.startswith(b"data:") or raw.strip() == b"data: [DONE]":
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    return gaps


async def streams_until(
    url: str, adapters: Sequence[str], clients: int, stop: asyncio.Event, tokens: int
) -> List[float]:
    """``clients`` closed-loop streams over ``adapters`` until ``stop``; all their gaps."""
    gaps: List[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def client(i: int) -> None:
            n = i
            while not stop.is_set():
                gaps.extend(await stream_gaps(session, url, adapters[n % len(adapters)], tokens))
                n += clients

        await asyncio.gather(*(client(i) for i in range(clients)))
    return gaps


async def unknown_names(url: str, count: int, concurrency: int) -> Dict[str, Any]:
    """``count`` requests, each naming an adapter no directory holds, ``concurrency`` at a
    time: status counts and the answers that were not a 400 naming their adapter."""
    statuses: Dict[str, int] = {}
    wrong: List[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(f"nobody-{i:05d}")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def worker() -> None:
            while not queue.empty():
                name = queue.get_nowait()
                body = {
                    "input_ids": PROMPT,
                    "lora_path": name,
                    "sampling_params": {"max_new_tokens": 4},
                }
                try:
                    async with session.post(url + "/generate", json=body) as resp:
                        text = await resp.text()
                        key = str(resp.status)
                        if resp.status != 400 or name not in text:
                            wrong.append(f"{name}: HTTP {resp.status} {text[:120]}")
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    key = type(exc).__name__
                    wrong.append(f"{name}: {key}")
                statuses[key] = statuses.get(key, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"statuses": statuses, "wrong": wrong[:20], "num_wrong": len(wrong)}


async def phase(
    url: str, adapters: Sequence[str], args: argparse.Namespace, burst: bool
) -> Dict[str, Any]:
    stop = asyncio.Event()
    streams = asyncio.create_task(
        streams_until(url, adapters, args.streams, stop, args.stream_tokens)
    )
    started = time.perf_counter()
    result: Dict[str, Any] = {}
    if burst:
        result = await unknown_names(url, args.names, args.concurrency)
    else:
        await asyncio.sleep(args.baseline_s)
    result["seconds"] = round(time.perf_counter() - started, 2)
    stop.set()
    gaps = await streams
    result.update(
        tbt_p50_s=percentile(gaps, 50), tbt_p99_s=percentile(gaps, 99), tbt_samples=len(gaps)
    )
    return result


def models(url: str) -> List[str]:
    return sorted(m["id"] for m in requests.get(url + "/v1/models", timeout=30).json()["data"])


def run_arm(arm: str, assets: Any, dtype: str, args: argparse.Namespace, out: Path) -> Dict:
    """One server of ``arm`` (``chameleon``: the adapter directory only; ``stock``: the known
    adapters in ``--lora-paths``, SGLang refusing unknown names itself): baseline, burst, checks."""
    known = [a.name for a in assets.adapters[:4]]
    if arm == "chameleon":
        directory = out / "adapter-dir"
        shutil.rmtree(directory, ignore_errors=True)
        for adapter in assets.adapters:
            shutil.copytree(adapter.path, directory / adapter.name)
        extra = dict(adapters=[], extra_args=["--chameleon-adapter-dir", str(directory)])
    else:
        extra = dict(adapters=known)
    port = free_port()
    cmd = server_command(assets, port, chameleon=arm == "chameleon", dtype=dtype, **extra)
    with ServerProcess(cmd, port, log_path=out / f"server-{arm}.log") as server:
        url = server.url
        before_probe = probe(url, known[0])
        for name in known:  # loaded before the baseline: the streams never wait on a read
            probe(url, name)
        registered = models(url)
        baseline = asyncio.run(phase(url, known, args, burst=False))
        rss_before = group_rss_kb(server.proc.pid)
        burst = asyncio.run(phase(url, known, args, burst=True))
        if arm == "chameleon":
            settle(url, timeout_s=120)
        rss_after = group_rss_kb(server.proc.pid)
        after_probe = probe(url, known[0])
        stats = requests.get(url + "/chameleon/stats", timeout=30)
        host = (stats.json().get("host_tier") if stats.ok else None) or {}
        registered_after = models(url)
    checks = {
        "every_unknown_name_refused": burst["num_wrong"] == 0,
        "nothing_registered": registered_after == registered,
        "rss_growth_below_5pct": rss_after <= rss_before * (1 + RSS_GROWTH_LIMIT),
        "probe_unchanged": before_probe == after_probe,
    }
    if arm == "chameleon":
        checks["nothing_loading"] = host.get("loading", 0) == 0
        checks["no_failures_remembered"] = host.get("failures_remembered", 0) <= 1
    return {
        "command": cmd,
        "baseline": baseline,
        "burst": burst,
        "burst_rps": round(args.names / burst["seconds"], 1),
        "tbt_over_baseline": {
            k: (burst[k] / baseline[k] if burst.get(k) and baseline.get(k) else None)
            for k in ("tbt_p50_s", "tbt_p99_s")
        },
        "rss_kb": {"before": rss_before, "after": rss_after},
        "host_tier": host,
        "checks": checks,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--arms", default="chameleon,stock")
    parser.add_argument("--names", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--baseline-s", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    dtype = auto_dtype() if args.dtype == "auto" else args.dtype
    out_dir = args.out or Path("eval/results") / time.strftime("name-burst-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    assets = build(args.preset)
    arms = {arm: run_arm(arm, assets, dtype, args, out_dir) for arm in args.arms.split(",")}
    report: Dict[str, Any] = {
        "preset": args.preset,
        "dtype": dtype,
        "cpu_flags": cpu_flags(),
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: str(v) for k, v in vars(args).items()},
        "arms": arms,
    }
    if {"chameleon", "stock"} <= set(arms):
        report["chameleon_over_stock"] = {
            "burst_seconds": arms["chameleon"]["burst"]["seconds"]
            / arms["stock"]["burst"]["seconds"],
            "tbt_p99_during_burst": arms["chameleon"]["burst"]["tbt_p99_s"]
            / arms["stock"]["burst"]["tbt_p99_s"],
        }
    report["passed"] = all(all(a["checks"].values()) for a in arms.values())
    (out_dir / "name-burst.json").write_text(json.dumps(report, indent=1, default=str))
    summary = {
        arm: {k: a[k] for k in ("burst_rps", "tbt_over_baseline", "rss_kb", "checks")}
        for arm, a in arms.items()
    }
    summary["chameleon_over_stock"] = report.get("chameleon_over_stock")
    print(json.dumps(summary, indent=1))
    print(("PASSED" if report["passed"] else "FAILED") + f" -> {out_dir / 'name-burst.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
