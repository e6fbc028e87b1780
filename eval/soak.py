"""Overload soak: does a ``--chameleon`` server lose anything when driven past its capacity?

``python -m eval.soak [--preset eval] [--dtype auto] [--overload 2] [--duration 600]
[--warmup 600] [--hangup 0.1] [--reload-every 20] [--faults] [--out DIR]``

1. starts one ``--chameleon`` server (integrity checks on) and takes a probe: a greedy request's
   output before any load;
2. measures capacity: completed requests per second of a closed loop of concurrent clients
   over the soak's own request mix (``--capacity-rps`` skips this);
3. warm-up (``--warmup`` seconds, default: the soak's duration): the same overload, drained;
   the server's memory is read after it, so that the RSS check measures growth over a second
   backlog as deep as the first (a leak), not the high-water mark of the first (a backlog of
   thousands of requests legitimately holds memory that the allocator keeps);
4. sends Poisson arrivals at ``overload x capacity`` for ``duration`` seconds; a share
   ``--hangup`` of clients stream and hang up after the first tokens; every ``--reload-every``
   seconds an adapter is unloaded and loaded again under the traffic: one of the spare
   adapters no request names (default), or with ``--reload-in-use`` one the requests use;
   ``--faults`` adds :mod:`eval.soak_faults` (its own adapter directory changed on disk under
   the traffic, admin unload/load storms, hang-ups at random points, 10x bursts);
5. waits for the backlog to drain, then asserts: every request either completed with all its
   tokens or received an explicit error (HTTP error with a message, an error in the stream);
   none was lost (no response, a broken stream, a timeout: a client waits ``--request-timeout``
   seconds, default 3600, since a 10-minute 2x overload queues over 10,000 requests and this
   2-core CPU drains them for about 25 minutes); the invariant checker finds nothing;
   quota usage and adapter references are back to zero; the probe's greedy output is
   unchanged; the server's memory (RSS of its process group) grew by less than 5%; with
   faults, no request for a bad adapter of the directory completed.

Prints a verdict and writes ``soak.json``; exit status 0 only when every check holds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import aiohttp
import requests

from chameleon_sglang.dev.assets import Assets, build
from chameleon_sglang.dev.serve import ServerProcess, free_port, server_command
from chameleon_sglang.integration import integrity
from eval.arms import auto_dtype
from eval.soak_faults import (
    AdapterDirectory,
    FaultPlan,
    admin_storms,
    burst_windows,
    describe,
    disk_faults,
    rate_at,
    reload_adapter,
    stopped_within,
)
from eval.summary import cpu_flags

PROBE_IDS = [3, 14, 15, 92, 65, 35, 89, 79]
RSS_GROWTH_LIMIT = 0.05
OUTCOMES = ("completed", "error", "hung_up", "lost")


@dataclasses.dataclass
class Outcome:
    index: int
    adapter: str
    kind: str  # one of OUTCOMES
    detail: str = ""
    latency_s: float = 0.0


SPARE_ADAPTERS = 2
"""The preset's last adapters: reloaded under traffic, named by no request (by default)."""


def request_mix(
    assets: Assets, n: int, seed: int, max_input: int, max_output: int
) -> List[Dict[str, Any]]:
    """``n`` requests over the adapters but the spare ones, with a skewed popularity; prompt
    and output lengths uniform."""
    rng = random.Random(seed)
    names = [a.name for a in assets.adapters[:-SPARE_ADAPTERS]]
    weights = [1.0 / (i + 1) for i in range(len(names))]
    out = []
    for _ in range(n):
        length = rng.randint(8, max_input)
        out.append(
            {
                "adapter": rng.choices(names, weights)[0],
                "input_ids": [rng.randint(5, 1000) for _ in range(length)],
                "max_new_tokens": rng.randint(4, max_output),
            }
        )
    return out


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    index: int,
    spec: Dict[str, Any],
    hang_up_after: Optional[int],
    timeout_s: float,
) -> Outcome:
    """One streamed request; the client leaves after ``hang_up_after`` tokens (0: as soon as
    the response headers arrive) unless that is None."""
    body = {
        "input_ids": spec["input_ids"],
        "lora_path": spec["adapter"],
        "stream": True,
        "sampling_params": {
            "max_new_tokens": spec["max_new_tokens"],
            "temperature": 0,
            "ignore_eos": True,
        },
    }
    started = time.perf_counter()

    def done(kind: str, detail: str = "") -> Outcome:
        return Outcome(index, spec["adapter"], kind, detail, time.perf_counter() - started)

    try:
        async with session.post(
            url + "/generate", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                return done("error" if text.strip() else "lost", f"HTTP {resp.status} {text}")
            if hang_up_after == 0:
                return done("hung_up")
            tokens = 0
            async for raw in resp.content:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return done("error", str(chunk["error"])[:200])
                tokens = len(chunk.get("output_ids") or []) or tokens + 1
                if hang_up_after is not None and tokens >= hang_up_after:
                    return done("hung_up")
            if tokens >= spec["max_new_tokens"]:
                return done("completed")
            return done("lost", f"stream ended after {tokens} of {spec['max_new_tokens']}")
    except asyncio.TimeoutError:
        return done("lost", "timeout")
    except aiohttp.ClientError as exc:
        return done("lost", f"{type(exc).__name__}: {exc}")


async def closed_loop(
    url: str, mix: Sequence[Dict[str, Any]], clients: int, duration_s: float
) -> float:
    """Completed requests per second of ``clients`` back-to-back clients."""
    completed = 0
    deadline = time.perf_counter() + duration_s
    async with aiohttp.ClientSession() as session:

        async def client(c: int) -> None:
            nonlocal completed
            i = c
            while time.perf_counter() < deadline:
                out = await one_request(session, url, i, mix[i % len(mix)], None, 300)
                completed += out.kind == "completed"
                i += clients

        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return completed / (time.perf_counter() - started)


async def reloader(
    url: str,
    assets: Assets,
    every_s: float,
    stop: asyncio.Event,
    log: List[Dict[str, Any]],
    in_use: bool,
) -> None:
    """Unload and reload an adapter every ``every_s``: the spare ones, or (``in_use``) the
    most popular ones, which requests are using."""
    popular = assets.adapters[:4] if in_use else assets.adapters[-SPARE_ADAPTERS:]
    i = 0
    async with aiohttp.ClientSession() as session:
        while not await stopped_within(stop, every_s):
            adapter = popular[i % len(popular)]
            i += 1
            log.append(await reload_adapter(session, url, adapter))


@dataclasses.dataclass
class LoadPlan:
    """One open-loop phase: Poisson arrivals at ``rps`` for ``duration_s``, and what goes on
    beside them (hang-ups, reloads, and with ``faults`` the faults of :mod:`eval.soak_faults`)."""

    rps: float
    duration_s: float
    hangup: float
    reload_every_s: float
    seed: int
    timeout_s: float
    reload_in_use: bool
    faults: Optional[FaultPlan] = None
    directory: Optional[AdapterDirectory] = None


def _adapter_of(spec: Dict[str, Any], plan: LoadPlan, rng: random.Random) -> Dict[str, Any]:
    """The request as sent: with faults, a share names an adapter of the soak's directory."""
    directory = plan.directory
    if plan.faults is None or directory is None or rng.random() >= plan.faults.catalog_share:
        return spec
    names = directory.names()
    return dict(spec, adapter=rng.choice(names)) if names else spec


def _hang_up_point(spec: Dict[str, Any], plan: LoadPlan, rng: random.Random) -> Optional[int]:
    if rng.random() >= plan.hangup:
        return None
    return rng.randint(0, spec["max_new_tokens"] - 1) if plan.faults else 2


async def open_loop(
    url: str, assets: Assets, mix: Sequence[Dict[str, Any]], plan: LoadPlan
) -> Dict[str, Any]:
    rng = random.Random(plan.seed + 1)
    tasks: List[asyncio.Task] = []
    reloads: List[Dict[str, Any]] = []
    stop = asyncio.Event()
    side: List[Any] = []
    if plan.reload_every_s > 0 and plan.faults is None:  # storms reload the spares instead
        side.append(reloader(url, assets, plan.reload_every_s, stop, reloads, plan.reload_in_use))
    windows: List[tuple] = []
    if plan.faults is not None:
        windows = burst_windows(plan.duration_s, plan.faults)
        spares = assets.adapters[-SPARE_ADAPTERS:]
        side.append(
            admin_storms(
                url, spares, plan.faults.storm_every_s, plan.faults.storm_rounds, stop, reloads
            )
        )
        if plan.directory is not None:
            side.append(disk_faults(plan.directory, plan.faults.every_s, stop))
    connector = aiohttp.TCPConnector(limit=0)
    sent: List[Dict[str, Any]] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        side_tasks = [asyncio.create_task(c) for c in side]
        started = time.perf_counter()
        t, i = 0.0, 0
        factor = plan.faults.burst_factor if plan.faults else 1.0
        while t < plan.duration_s:
            delay = started + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            spec = _adapter_of(mix[i % len(mix)], plan, rng)
            sent.append(spec)
            hang_up_after = _hang_up_point(spec, plan, rng)
            tasks.append(
                asyncio.create_task(
                    one_request(session, url, i, spec, hang_up_after, plan.timeout_s)
                )
            )
            i += 1
            t += rng.expovariate(rate_at(t, plan.rps, windows, factor))
        stop.set()
        await asyncio.gather(*side_tasks)
        outcomes = await asyncio.gather(*tasks)
        drained_s = time.perf_counter() - started - plan.duration_s
    return {"outcomes": outcomes, "reloads": reloads, "drain_s": drained_s}


NOT_LOADED = "does not exist"
"""SGLang's answer to unloading a name its ``--max-loaded-loras`` LRU (or the host tier) has
already unloaded: an explicit refusal, and the adapter is not loaded, as the caller wanted."""


NO_ROOM = "every loaded adapter is in use"
"""Chameleon's answer to a load that ``--max-loaded-loras`` has no room for while every loaded
adapter serves requests: an explicit, immediate refusal (SGLang's LRU would stall every load)."""


def _reload_ok(entry: Dict[str, Any]) -> bool:
    """The load succeeded or was refused for want of room (every loaded adapter in use), and the
    unload did or was refused because the adapter was no longer loaded (with faults, directory
    adapters push registered ones out of SGLang's LRU)."""
    loaded = bool(entry.get("load")) or NO_ROOM in entry.get("load_error", "")
    return loaded and (bool(entry.get("unload")) or NOT_LOADED in entry.get("unload_error", ""))


def group_rss_kb(pid: int) -> int:
    """Resident memory of the process group led by ``pid`` (the server and its children)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pid:
                continue
            with open(f"/proc/{entry}/status") as status:
                total += sum(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        except (OSError, ProcessLookupError):
            continue
    return total


def probe(url: str, adapter: str, headers: Optional[Dict[str, str]] = None) -> List[int]:
    body = {
        "input_ids": PROBE_IDS,
        "lora_path": adapter,
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
    }
    resp = requests.post(url + "/generate", json=body, headers=headers, timeout=300)
    resp.raise_for_status()
    return resp.json()["output_ids"]


def settle(url: str, timeout_s: float, headers: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Wait until nothing runs or waits (quota usage and references zero); the last stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = requests.get(url + "/chameleon/stats", headers=headers, timeout=60)
        rank = stats.json()["ranks"][0]
        sched, cache = rank.get("scheduler") or {}, rank.get("adapter_cache") or {}
        quiet = (
            not any(sched.get("usage", []))
            and not any(sched.get("num_waiting", []))
            and cache.get("num_in_use", 0) == 0
            and cache.get("num_holding_requests", 0) == 0
        )
        if quiet or time.monotonic() > deadline:
            return rank
        time.sleep(1.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="eval")
    parser.add_argument(
        "--arm",
        default="chameleon",
        choices=["chameleon", "stock"],
        help="stock: the same soak on SGLang without --chameleon (the checks "
        "of Chameleon's own state are skipped)",
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    parser.add_argument("--overload", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of overload before the RSS baseline (default: --duration)",
    )
    parser.add_argument("--capacity-rps", type=float, default=0.0)
    parser.add_argument("--capacity-seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--hangup", type=float, default=0.1)
    parser.add_argument("--reload-every", type=float, default=20.0)
    parser.add_argument(
        "--reload-in-use",
        action="store_true",
        help="reload adapters the requests use (see the README: SGLang's "
        "unload waits for them and its registry races with reloads)",
    )
    parser.add_argument(
        "--faults",
        action="store_true",
        help="play eval.soak_faults' faults: disk (chameleon: its own adapter directory), "
        "admin storms (instead of --reload-every), hang-ups at random points, bursts",
    )
    parser.add_argument("--fault-every", type=float, default=10.0)
    parser.add_argument("--storm-every", type=float, default=30.0)
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--burst-factor", type=float, default=10.0)
    parser.add_argument("--burst-seconds", type=float, default=10.0)
    parser.add_argument("--max-input", type=int, default=256)
    parser.add_argument("--max-output", type=int, default=48)
    parser.add_argument("--request-timeout", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    dtype = auto_dtype() if args.dtype == "auto" else args.dtype
    out_dir = args.out or Path("eval/results") / time.strftime("soak-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    assets = build(args.preset)
    os.environ[integrity.ENV_FLAG] = "1"
    port = free_port()
    chameleon = args.arm == "chameleon"
    faults = (
        FaultPlan(
            every_s=args.fault_every,
            storm_every_s=args.storm_every,
            bursts=args.bursts,
            burst_seconds=args.burst_seconds,
            burst_factor=args.burst_factor,
        )
        if args.faults
        else None
    )
    directory = None
    extra: List[str] = []
    if faults is not None and chameleon:
        sources = [Path(a.path) for a in assets.adapters[:-SPARE_ADAPTERS]]
        directory = AdapterDirectory(out_dir / "adapter-dir", sources, args.seed)
        extra = ["--chameleon-adapter-dir", str(directory.root)]
    cmd = server_command(assets, port, chameleon=chameleon, dtype=dtype, extra_args=extra)

    def plan(duration_s: float, seed: int) -> LoadPlan:
        return LoadPlan(
            rps=rate,
            duration_s=duration_s,
            hangup=args.hangup,
            reload_every_s=args.reload_every,
            seed=seed,
            timeout_s=args.request_timeout,
            reload_in_use=args.reload_in_use,
            faults=faults,
            directory=directory,
        )

    report: Dict[str, Any] = {
        "arm": args.arm,
        "preset": args.preset,
        "dtype": dtype,
        "cpu_flags": cpu_flags(),
        "command": cmd,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    mix = request_mix(assets, 4096, args.seed, args.max_input, args.max_output)
    with ServerProcess(cmd, port, log_path=out_dir / "server.log") as server:
        url = server.url
        probe_adapter = assets.adapters[0].name
        before_probe = probe(url, probe_adapter)
        capacity = args.capacity_rps or asyncio.run(
            closed_loop(url, mix, args.clients, args.capacity_seconds)
        )
        rss_start = group_rss_kb(server.proc.pid)
        rate = args.overload * capacity
        warmup = args.duration if args.warmup is None else args.warmup
        warm: Dict[str, Any] = {"outcomes": [], "reloads": [], "drain_s": 0.0}
        if warmup > 0:
            print(
                f"capacity {capacity:.2f} req/s; warm-up at {rate:.2f} req/s for {warmup:.0f} s",
                flush=True,
            )
            warm = asyncio.run(open_loop(url, assets, mix, plan(warmup, args.seed + 7)))
            settle(url, timeout_s=300)
        rss_before = group_rss_kb(server.proc.pid)
        print(
            f"capacity {capacity:.2f} req/s; soak at {rate:.2f} req/s for {args.duration:.0f} s",
            flush=True,
        )
        run = asyncio.run(open_loop(url, assets, mix, plan(args.duration, args.seed)))
        final = settle(url, timeout_s=300)
        after_probe = probe(url, probe_adapter)
        rss_after = group_rss_kb(server.proc.pid)
    outcomes: List[Outcome] = list(warm["outcomes"]) + list(run["outcomes"])
    reloads = list(warm["reloads"]) + list(run["reloads"])
    counts = {k: sum(o.kind == k for o in outcomes) for k in OUTCOMES}
    sched, cache = final.get("scheduler") or {}, final.get("adapter_cache") or {}
    checks = {
        "nothing_lost": counts["lost"] == 0,
        "probe_unchanged": before_probe == after_probe,
        "rss_growth_below_5pct": rss_after <= rss_before * (1 + RSS_GROWTH_LIMIT),
        "reloads_succeeded": all(_reload_ok(r) for r in reloads),
    }
    if directory is not None:
        served_bad = [o for o in outcomes if directory.is_bad(o.adapter) and o.kind == "completed"]
        checks["bad_adapters_never_served"] = not served_bad
    if chameleon:
        checks.update(
            integrity=final.get("integrity", ["not reported"]) == [],
            quota_usage_zero=not any(sched.get("usage", [1])),
            references_zero=cache.get("num_in_use", 1) == 0
            and cache.get("num_holding_requests", 1) == 0,
        )
    report.update(
        capacity_rps=capacity,
        offered_rps=rate,
        duration_s=args.duration,
        warmup_s=warmup,
        arrivals=len(outcomes),
        outcomes=counts,
        drain_s=round(run["drain_s"], 1),
        warmup_drain_s=round(warm["drain_s"], 1),
        reloads=len(reloads),
        rss_kb={"start": rss_start, "before": rss_before, "after": rss_after},
        integrity=final.get("integrity"),
        refused_requests=cache.get("num_refused_requests"),
        refusals_repeated=cache.get("num_refusals_repeated"),
        refused_for_fragmentation=cache.get("refused_for_fragmentation"),
        lost=[dataclasses.asdict(o) for o in outcomes if o.kind == "lost"][:20],
        errors=[dataclasses.asdict(o) for o in outcomes if o.kind == "error"][:20],
        failed_reloads=[r for r in reloads if not _reload_ok(r)][:20],
        unloads_of_unloaded=sum(NOT_LOADED in r.get("unload_error", "") for r in reloads),
        loads_refused_for_room=sum(NO_ROOM in r.get("load_error", "") for r in reloads),
        checks=checks,
        passed=all(checks.values()),
        faults=describe(directory, faults) if faults else None,
    )
    (out_dir / "soak.json").write_text(json.dumps(report, indent=1, default=str))
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "arm",
                    "dtype",
                    "capacity_rps",
                    "offered_rps",
                    "arrivals",
                    "outcomes",
                    "drain_s",
                    "reloads",
                    "rss_kb",
                    "refused_requests",
                    "refusals_repeated",
                    "checks",
                )
            },
            indent=1,
        )
    )
    print(("PASSED" if report["passed"] else "FAILED") + f" -> {out_dir / 'soak.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
