"""How busy the machine was with other work during a run (Linux ``/proc``; None elsewhere).

Contract: :func:`snapshot` records the machine's busy CPU time, the CPU time of one process group
(the server's) and of this process; :func:`foreign_share` turns two snapshots into the fraction of
all cores' time spent by *other* processes between them (0 = the machine was ours, 1 = every core
busy with something else). Also reports the 1-minute load average at both ends.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Dict, Optional

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclasses.dataclass(frozen=True)
class LoadSnapshot:
    """CPU seconds at one moment (busy = all but idle and iowait)."""

    t: float
    machine_busy_s: float
    group_s: float
    self_s: float
    loadavg_1m: float


def _machine_busy_s() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / _TICKS


def _proc_cpu_s(stat: str) -> float:
    rest = stat[stat.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / _TICKS  # utime, stime


def _group_cpu_s(pgid: Optional[int]) -> float:
    if pgid is None:
        return 0.0
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
                total += _proc_cpu_s(stat)
        except (OSError, ValueError, IndexError):
            continue
    return total


def snapshot(pgid: Optional[int]) -> Optional[LoadSnapshot]:
    """A snapshot for the server process group ``pgid``; None where /proc is unavailable."""
    try:
        return LoadSnapshot(
            t=time.monotonic(),
            machine_busy_s=_machine_busy_s(),
            group_s=_group_cpu_s(pgid),
            self_s=_proc_cpu_s(Path("/proc/self/stat").read_text()),
            loadavg_1m=os.getloadavg()[0],
        )
    except (OSError, ValueError, IndexError):
        return None


def foreign_share(a: Optional[LoadSnapshot], b: Optional[LoadSnapshot]) -> Dict[str, object]:
    """Share of all cores used by other processes between ``a`` and ``b``, and load averages."""
    if a is None or b is None or b.t <= a.t:
        return {"foreign_cpu_share": None, "loadavg_1m_start": None, "loadavg_1m_end": None}
    cores = os.cpu_count() or 1
    own = (b.group_s - a.group_s) + (b.self_s - a.self_s)
    foreign = max(0.0, (b.machine_busy_s - a.machine_busy_s) - own)
    return {
        "foreign_cpu_share": min(1.0, foreign / ((b.t - a.t) * cores)),
        "loadavg_1m_start": a.loadavg_1m,
        "loadavg_1m_end": b.loadavg_1m,
    }


def wait_until_quiet(
    max_wait_s: float, threshold: float = 0.25, window_s: float = 5.0
) -> Dict[str, object]:
    """Sample other processes' CPU share over ``window_s`` windows until it is at most
    ``threshold`` or ``max_wait_s`` has passed; returns the last share and the time waited."""
    t0 = time.monotonic()
    share: Optional[float] = None
    while True:
        a = snapshot(None)
        time.sleep(window_s)
        share = foreign_share(a, snapshot(None))["foreign_cpu_share"]  # type: ignore[assignment]
        waited = time.monotonic() - t0
        if share is None or share <= threshold or waited + window_s > max_wait_s:
            return {
                "foreign_cpu_share": share,
                "waited_s": waited,
                "quiet": share is not None and share <= threshold,
            }
