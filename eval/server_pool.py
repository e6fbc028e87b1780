"""Servers shared across runs whose launch commands are identical (for the test suite).

With ``CHAMELEON_EVAL_SERVER_POOL=DIR`` in the environment, :func:`eval.runner.arm_server` looks the
launch command (its port left out) of a ``stock`` or ``chameleon`` run up in ``DIR``: a healthy
server started for the same command earlier, by this process or another, is reused and left running;
otherwise the server it starts is recorded there and left running too. :func:`stop_pool` stops every
recorded server. Results of a run then depend on the runs before it on that server (warm caches, a
trained predictor): the pool is for smoke tests of the harness, never for measurements. Runs are
assumed sequential (no two processes start the same command at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence

POOL_ENV = "CHAMELEON_EVAL_SERVER_POOL"
POOLED_ARMS = ("stock", "stock-tuned", "chameleon")
"""Arms whose servers the pool keeps: the two that most runs share, and stock-tuned (the tuning
runs its chosen candidate first). Servers of other arms are started and stopped as usual (idle
servers left running cost memory and some CPU)."""
PORT_PLACEHOLDER = "{port}"


def pool_dir(arm: str) -> Optional[Path]:
    """The pool directory for servers of ``arm``, or None (pooling off, or not for this arm)."""
    value = os.environ.get(POOL_ENV)
    return Path(value) if value and arm in POOLED_ARMS else None


def command_key(command: Sequence[str], port: int) -> str:
    """A name for ``command`` that ignores the port it was given."""
    shape = [PORT_PLACEHOLDER if arg == str(port) else arg for arg in command]
    return hashlib.sha1("\0".join(shape).encode()).hexdigest()[:16]


def lookup(pool: Path, key: str) -> Optional[Dict[str, object]]:
    """The record of a healthy pooled server for ``key`` (None: none, or it died)."""
    path = pool / f"{key}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if _is_alive(int(record["pid"])) and _is_healthy(str(record["url"])):
        return record
    path.unlink()
    return None


def record(pool: Path, key: str, url: str, pid: int, command: Sequence[str]) -> None:
    """Remember a started server for later runs of the same command."""
    pool.mkdir(parents=True, exist_ok=True)
    entry = {"url": url, "pid": pid, "command": list(command)}
    (pool / f"{key}.json").write_text(json.dumps(entry))


def stop_pool(pool: Path, grace_s: float = 15.0) -> List[int]:
    """Stop every pooled server (SIGINT to its launcher, then SIGKILL to its process group);
    the launchers' PIDs."""
    pids = []
    for path in sorted(pool.glob("*.json")):
        pid = int(json.loads(path.read_text())["pid"])
        pids.append(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        while _is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        path.unlink()
    return pids


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False
