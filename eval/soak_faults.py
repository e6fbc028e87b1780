"""Faults the overload soak plays under traffic (``python -m eval.soak --faults``).

- **Disk** (a server with ``--chameleon-adapter-dir``): the soak owns the directory and, every
  ``every_s``, changes it in a fixed cycle: a new adapter appears; a bad one appears (no
  config, a config that is not JSON, truncated weights); an adapter's weights are truncated in
  place, deleted, replaced by another adapter's weights under the same name, and restored. A
  share of requests names an adapter of the directory (good or bad) at the time it is sent.
- **Admin storms**: every ``storm_every_s``, all spare adapters unloaded and loaded again,
  concurrently, ``storm_rounds`` times.
- **Hang-ups at random points**: a hanging-up client leaves after a uniformly drawn number of
  tokens, zero meaning as soon as the response headers arrive.
- **Bursts**: ``bursts`` windows of ``burst_seconds`` at ``burst_factor`` times the rate.

Requests for bad adapters must end in an explicit error, never in a completion.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import aiohttp

BAD_KINDS = ("no-config", "config-not-json", "truncated-weights")
DISK_CYCLE = ("appear", "appear-bad", "truncate", "delete", "replace", "restore")


@dataclasses.dataclass
class FaultPlan:
    catalog_share: float = 0.2
    every_s: float = 10.0
    storm_every_s: float = 30.0
    storm_rounds: int = 3
    burst_factor: float = 10.0
    burst_seconds: float = 10.0
    bursts: int = 2


class AdapterDirectory:
    """The soak's adapter directory: good copies of preset adapters, and the faults on it."""

    def __init__(self, root: Path, sources: Sequence[Path], seed: int) -> None:
        self.root = root
        self.sources = list(sources)
        self.rng = random.Random(seed)
        self.good: List[str] = []
        self.bad: List[str] = []
        self.damaged: Dict[str, str] = {}  # name -> fault, until restored
        self.log: List[Dict[str, Any]] = []
        root.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            self._appear()

    def names(self) -> List[str]:
        return self.good + self.bad

    def is_bad(self, name: str) -> bool:
        return name in self.bad

    def play(self, step: int) -> None:
        fault = DISK_CYCLE[step % len(DISK_CYCLE)]
        getattr(self, "_" + fault.replace("-", "_"))()

    def _copy(self, name: str) -> None:
        source = self.rng.choice(self.sources)
        staging = self.root / f".staging-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        target = self.root / name
        if target.exists():
            retired = self.root / f".retired-{name}-{time.monotonic_ns()}"
            target.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)
        staging.rename(target)
        self._record("copy", name, source=source.name)

    def _appear(self) -> None:
        name = f"cat{len(self.good) + len(self.bad):03d}"
        self._copy(name)
        self.good.append(name)

    def _appear_bad(self) -> None:
        kind = BAD_KINDS[len(self.bad) % len(BAD_KINDS)]
        name = f"bad{len(self.bad):03d}"
        self._copy(name)
        _damage(self.root / name, kind)
        self.bad.append(name)
        self._record(kind, name)

    def _victim(self) -> Optional[str]:
        healthy = [n for n in self.good if n not in self.damaged]
        return self.rng.choice(healthy) if healthy else None

    def _truncate(self) -> None:
        name = self._victim()
        if name:
            _damage(self.root / name, "truncated-weights")
            self.damaged[name] = "truncated"
            self._record("truncate", name)

    def _delete(self) -> None:
        name = self._victim()
        if name:
            shutil.rmtree(self.root / name)
            self.damaged[name] = "deleted"
            self._record("delete", name)

    def _replace(self) -> None:
        name = self._victim()
        if name:
            self._copy(name)
            self._record("replace", name)

    def _restore(self) -> None:
        for name in list(self.damaged):
            self._copy(name)
            del self.damaged[name]
            self._record("restore", name)

    def _record(self, what: str, name: str, **extra: Any) -> None:
        self.log.append({"t": time.time(), "fault": what, "adapter": name, **extra})


def _damage(adapter: Path, kind: str) -> None:
    if kind == "no-config":
        (adapter / "adapter_config.json").unlink()
    elif kind == "config-not-json":
        (adapter / "adapter_config.json").write_text("{ not json")
    else:
        for weights in adapter.glob("*.safetensors"):
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 3])


async def disk_faults(directory: AdapterDirectory, every_s: float, stop: asyncio.Event) -> None:
    step = 0
    while not await stopped_within(stop, every_s):
        await asyncio.to_thread(directory.play, step)
        step += 1


async def reload_adapter(
    session: aiohttp.ClientSession, url: str, adapter: Any, **tags: Any
) -> Dict[str, Any]:
    """Unload ``adapter`` (name, path), then load it again; what each call answered (no answer
    within 300 s, or a broken connection, is recorded as a failure of that call)."""
    entry: Dict[str, Any] = {"adapter": adapter.name, "t": time.time(), **tags}
    for op, body in (
        ("unload", {"lora_name": adapter.name}),
        ("load", {"lora_name": adapter.name, "lora_path": str(adapter.path)}),
    ):
        try:
            async with session.post(
                f"{url}/{op}_lora_adapter", json=body, timeout=aiohttp.ClientTimeout(total=300)
            ) as resp:
                payload = await resp.json(content_type=None)
                entry[op] = bool(resp.status == 200 and payload.get("success"))
                if not entry[op]:
                    entry[f"{op}_error"] = f"HTTP {resp.status} {str(payload)[:300]}"
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:  # a failed reload, recorded
            entry[op] = False
            entry[f"{op}_error"] = f"no answer: {type(exc).__name__} {exc}"[:300]
    return entry


async def admin_storms(
    url: str,
    adapters: Sequence[Any],
    every_s: float,
    rounds: int,
    stop: asyncio.Event,
    log: List[Dict[str, Any]],
    headers: Optional[Dict[str, str]] = None,
) -> None:
    """Every ``every_s``: ``rounds`` times, unload and reload all ``adapters`` concurrently."""
    async with aiohttp.ClientSession(headers=headers) as session:
        while not await stopped_within(stop, every_s):
            for _ in range(rounds):
                cycles = (reload_adapter(session, url, a, storm=True) for a in adapters)
                log.extend(await asyncio.gather(*cycles))


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``; True when ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return False


def burst_windows(duration_s: float, plan: FaultPlan) -> List[tuple]:
    """``(start, stop)`` of each burst, spread evenly over the run."""
    return [
        (
            duration_s * (i + 1) / (plan.bursts + 1),
            duration_s * (i + 1) / (plan.bursts + 1) + plan.burst_seconds,
        )
        for i in range(plan.bursts)
    ]


def rate_at(t: float, rate: float, windows: Sequence[tuple], factor: float) -> float:
    return rate * factor if any(a <= t < b for a, b in windows) else rate


def describe(directory: Optional[AdapterDirectory], plan: FaultPlan) -> Dict[str, Any]:
    out: Dict[str, Any] = {"plan": dataclasses.asdict(plan)}
    if directory is not None:
        out.update(
            disk_faults=len(directory.log),
            good=len(directory.good),
            bad=len(directory.bad),
            disk_log=directory.log[-60:],
        )
    return out
