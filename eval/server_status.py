"""What a server says about itself: ``GET /server_info``, Chameleon cache statistics, sampling.

Contract:
* :func:`cache_stats` finds, anywhere inside ``chameleon_status``, the first dict holding a numeric
  ``hit_rate`` (the shape of ``AdapterCache.stats()``) and returns it, else None.
* :func:`memory_split` returns the numeric byte counts the server reports for the adapter cache
  and KV (keys ending in ``_bytes`` inside a ``memory`` dict of ``chameleon_status``, plus the
  cache's ``resident_bytes``), else an empty dict.
* :class:`StatusSampler` polls ``/server_info`` on a background thread every ``interval_s``
  until stopped, keeping ``(t_s, chameleon_status)`` pairs; it never raises into the caller.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

from eval.loadgen import check_loopback

STATUS_KEY = "chameleon_status"


def server_info(url: str, timeout_s: float = 30.0) -> Dict[str, Any]:
    """The JSON of ``GET <url>/server_info``."""
    url = check_loopback(url)
    with urllib.request.urlopen(url + "/server_info", timeout=timeout_s) as resp:
        return json.loads(resp.read())


def chameleon_status(info: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """``chameleon_status`` plus, under ``live``, each scheduler's live Chameleon statistics
    (``internal_states[i]["chameleon"]``: scheduler and adapter-cache counters). Under data
    parallelism the server has no engine-wide ``chameleon_status``: then ``{"live": [...]}``,
    one entry per replica in SGLang's order, or None when no replica reports."""
    status = info.get(STATUS_KEY)
    live = [
        state["chameleon"]
        for state in info.get("internal_states") or []
        if isinstance(state, dict) and isinstance(state.get("chameleon"), dict)
    ]
    if not isinstance(status, dict):
        return {"live": live} if live else None
    return {**status, "live": live} if live else status


def _find_dict_with(obj: Any, key: str) -> Optional[Dict[str, Any]]:
    if isinstance(obj, dict):
        if isinstance(obj.get(key), (int, float)) and not isinstance(obj.get(key), bool):
            return obj
        for value in obj.values():
            found = _find_dict_with(value, key)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for value in obj:
            found = _find_dict_with(value, key)
            if found is not None:
                return found
    return None


def cache_stats(status: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The cache statistics dict inside ``chameleon_status``, if any."""
    return _find_dict_with(status, "hit_rate") if status else None


def cache_hit_rate(status: Optional[Dict[str, Any]]) -> Optional[float]:
    """The adapter cache's hit rate; over every replica's lookups when the status is only the
    replicas' live statistics (data parallelism)."""
    if status and set(status) == {"live"}:
        caches = [c for c in map(cache_stats, status["live"]) if c]
        hits = sum(float(c.get("hits") or 0) for c in caches)
        lookups = hits + sum(float(c.get("misses") or 0) for c in caches)
        return hits / lookups if lookups else None
    stats = cache_stats(status)
    return float(stats["hit_rate"]) if stats else None


def memory_split(status: Optional[Dict[str, Any]]) -> Dict[str, float]:
    """Byte counts reported for the adapter cache and KV (see the module contract)."""
    if not status:
        return {}
    out: Dict[str, float] = {}
    memory = _find_dict_with(status, "kv_bytes") or status.get("memory")
    if isinstance(memory, dict):
        for k, v in memory.items():
            if k.endswith("_bytes") and isinstance(v, (int, float)):
                out[k] = float(v)
    stats = cache_stats(status)
    if stats and isinstance(stats.get("resident_bytes"), (int, float)):
        out.setdefault("adapter_cache_bytes", float(stats["resident_bytes"]))
    return out


def components_active(status: Optional[Dict[str, Any]]) -> List[str]:
    """Names of the Chameleon components the server reports as active."""
    if not status:
        return []
    return [str(c) for c in status.get("active_components") or []]


class StatusSampler:
    """Background poller of ``chameleon_status`` (see the module contract)."""

    def __init__(self, url: str, interval_s: float = 5.0, max_samples: int = 2000) -> None:
        self.url = check_loopback(url)
        self.interval_s = interval_s
        self.max_samples = max_samples
        self.samples: List[Tuple[float, Optional[Dict[str, Any]]]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._t0 = 0.0

    def start(self) -> StatusSampler:
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="status-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> List[Tuple[float, Optional[Dict[str, Any]]]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        return self.samples

    def _loop(self) -> None:
        while not self._stop.is_set() and len(self.samples) < self.max_samples:
            try:
                status = chameleon_status(server_info(self.url, timeout_s=20))
            except Exception:
                status = None
            self.samples.append((time.perf_counter() - self._t0, status))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> StatusSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
