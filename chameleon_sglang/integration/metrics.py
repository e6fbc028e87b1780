"""Chameleon's statistics as Prometheus gauges (with SGLang's ``--enable-metrics``).

Gauges are created in the scheduler process with ``multiprocess_mode="mostrecent"``, like
SGLang's own scheduler metrics, so SGLang's ``/metrics`` endpoint exports them. Counters are
exported as gauges of their running totals. A :class:`MetricsPublisher` per component publishes
at most every ``PUBLISH_PERIOD_S`` and gathers the statistics only when it publishes.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Protocol

PUBLISH_PERIOD_S = 0.5

_SCALARS = {
    "num_queues": "Number of multi-level queues (K).",
    "num_bypasses": "Requests admitted by opportunistic bypass (total).",
    "num_squashes": "Bypass requests squashed and requeued (total).",
    "num_queue_misfits": "Candidates that did not fit memory or quota in a pass (total).",
    "num_adapter_misfits": "Candidates whose adapter could not be placed (total).",
    "num_retractions": "Running requests SGLang retracted back to the queue (total).",
    "num_refreshes": "Queue re-fits (total).",
    "quota_scaled_down": "1 when the M/M/1 minimum quotas exceeded the pool and were scaled.",
}
_PER_QUEUE = {
    "quotas": ("queue_quota_tokens", "Token quota of each queue."),
    "usage": ("queue_usage_tokens", "Tokens charged to each queue by running requests."),
    "num_waiting": ("queue_waiting_requests", "Requests waiting in each queue."),
}


def metrics_labels(owner: Any) -> Optional[Dict[str, str]]:
    """SGLang's metric labels when it runs with ``--enable-metrics`` in ``owner``'s process (a
    scheduler rank or the tokenizer manager), else None."""
    reporter = getattr(owner, "metrics_reporter", None)
    enabled = getattr(reporter if reporter is not None else owner, "enable_metrics", False)
    if not enabled:
        return None
    collector = getattr(owner, "metrics_collector", None)
    return dict(getattr(collector, "labels", {}) or {})


class Gauges(Protocol):
    def publish(self, stats: Dict[str, Any]) -> None:
        """Set every gauge from ``stats``."""
        ...


class MetricsPublisher:
    """Publishes one component's statistics where SGLang runs with ``--enable-metrics`` on this
    rank. SGLang builds its metrics reporter after our components, so the gauges are made at
    the first :meth:`maybe_publish`."""

    def __init__(self, scheduler: Any, make_gauges: Callable[[Dict[str, str]], Gauges]) -> None:
        self._scheduler = scheduler
        self._make_gauges = make_gauges
        self._gauges: Optional[Gauges] = None
        self._looked_up = False
        self._last_publish: Optional[float] = None

    def maybe_publish(self, now: float, stats: Callable[[], Dict[str, Any]]) -> None:
        """Publish ``stats()`` if metrics are on and ``PUBLISH_PERIOD_S`` passed since the last."""
        if not self._looked_up:
            self._looked_up = True
            labels = metrics_labels(self._scheduler)
            self._gauges = None if labels is None else self._make_gauges(labels)
        if self._gauges is None or (
            self._last_publish is not None and now - self._last_publish < PUBLISH_PERIOD_S
        ):
            return
        self._last_publish = now
        self._gauges.publish(stats())


class SchedulerMetrics:
    """``SchedulerBridge`` statistics as ``chameleon:*`` gauges."""

    def __init__(self, labels: Optional[Dict[str, str]] = None) -> None:
        from prometheus_client import Gauge

        self._labels = dict(labels or {})
        names = list(self._labels)
        self._scalars = {
            key: Gauge(f"chameleon:{key}", doc, labelnames=names, multiprocess_mode="mostrecent")
            for key, doc in _SCALARS.items()
        }
        self._per_queue = {
            key: Gauge(
                f"chameleon:{name}",
                doc,
                labelnames=names + ["queue"],
                multiprocess_mode="mostrecent",
            )
            for key, (name, doc) in _PER_QUEUE.items()
        }
        self._accuracy = Gauge(
            "chameleon:predictor_within_tolerance",
            "Fraction of output-length predictions within tolerance of the real length.",
            labelnames=names,
            multiprocess_mode="mostrecent",
        )
        self._max_queues_seen = 0

    def publish(self, stats: Dict[str, Any]) -> None:
        for key, gauge in self._scalars.items():
            gauge.labels(**self._labels).set(float(stats.get(key, 0) or 0))
        num_queues = int(stats.get("num_queues", 0))
        self._max_queues_seen = max(self._max_queues_seen, num_queues)
        for key, gauge in self._per_queue.items():
            values = list(stats.get(key, []))
            for q in range(self._max_queues_seen):  # queues that vanished on a refit read 0
                value = values[q] if q < len(values) else 0
                gauge.labels(**self._labels, queue=str(q)).set(float(value))
        accuracy = (stats.get("predictor") or {}).get("within_tolerance")
        if accuracy is not None:
            self._accuracy.labels(**self._labels).set(float(accuracy))


_CACHE_SCALARS = {
    "hits": "Adapter-cache lookups that found the adapter resident (total).",
    "misses": "Adapter-cache lookups that loaded the adapter (total).",
    "hit_rate": "Adapter-cache hits over lookups.",
    "prefetch_loads": "Adapters loaded ahead of their queued requests (total).",
    "bytes_loaded": "KV-memory bytes of adapters loaded into the cache (total).",
    "resident_bytes": "KV-memory bytes held by cached adapters.",
    "num_resident": "Adapters resident in the cache.",
    "num_in_use": "Cached adapters used by running requests.",
    "max_distinct_adapters_per_batch": "Most distinct adapters in one forward batch.",
    "mean_distinct_adapters_per_batch": "Mean distinct adapters per forward batch with adapters.",
}


class CacheMetrics:
    """``CacheBridge`` statistics as ``chameleon:cache_*`` gauges."""

    def __init__(self, labels: Optional[Dict[str, str]] = None) -> None:
        from prometheus_client import Gauge

        self._labels = dict(labels or {})
        names = list(self._labels)
        self._scalars = {
            key: Gauge(
                f"chameleon:cache_{key}", doc, labelnames=names, multiprocess_mode="mostrecent"
            )
            for key, doc in _CACHE_SCALARS.items()
        }
        self._by_tier = Gauge(
            "chameleon:cache_evictions_by_tier",
            "Policy evictions by tier: unused, queued (total).",
            labelnames=names + ["tier"],
            multiprocess_mode="mostrecent",
        )
        self._by_reason = Gauge(
            "chameleon:cache_evictions_by_reason",
            "Removals by reason: make_room, kv_pressure, unload (total).",
            labelnames=names + ["reason"],
            multiprocess_mode="mostrecent",
        )

    def publish(self, stats: Dict[str, Any]) -> None:
        for key, gauge in self._scalars.items():
            gauge.labels(**self._labels).set(float(stats.get(key, 0) or 0))
        for tier, value in (stats.get("evictions_by_tier") or {}).items():
            self._by_tier.labels(**self._labels, tier=tier).set(float(value))
        for reason, value in (stats.get("evictions_by_reason") or {}).items():
            self._by_reason.labels(**self._labels, reason=reason).set(float(value))


_HOST_TIER_SCALARS = {
    "budget_bytes": "Host-memory budget of loaded adapters (--chameleon-host-cache-gb).",
    "used_bytes": "Host-memory bytes of loaded adapters.",
    "adapters": "Adapters loaded in host memory.",
    "hits": "Requests whose adapter was loaded (total).",
    "misses": "Requests whose adapter had to be read from disk (total).",
    "hit_rate": "Host-tier hits over lookups.",
    "evictions": "Adapters unloaded to fit the budget (total).",
    "evicted_bytes": "Bytes of adapters unloaded to fit the budget (total).",
    "loading": "Adapter names being loaded for waiting requests.",
}
_READ_SCALARS = {
    "pending": "Adapter reads in progress off the scheduler loop.",
    "reads": "Adapter reads finished (total).",
    "failures": "Adapter reads that failed or timed out (total).",
    "timeouts": "Adapter reads that timed out (total).",
    "latency_sum_s": "Seconds spent in finished adapter reads (total).",
}


class ScalarMetrics:
    """Scalar statistics as ``chameleon:<prefix><key>`` gauges."""

    def __init__(self, prefix: str, docs: Dict[str, str], labels: Dict[str, str]) -> None:
        from prometheus_client import Gauge

        self._labels = dict(labels)
        self._gauges = {
            key: Gauge(
                f"chameleon:{prefix}{key}",
                doc,
                labelnames=list(self._labels),
                multiprocess_mode="mostrecent",
            )
            for key, doc in docs.items()
        }

    def publish(self, stats: Dict[str, Any]) -> None:
        for key, gauge in self._gauges.items():
            gauge.labels(**self._labels).set(float(stats.get(key, 0) or 0))


def host_tier_metrics(labels: Optional[Dict[str, str]] = None) -> ScalarMetrics:
    """The host tier's statistics as ``chameleon:host_tier_*`` gauges (launcher process)."""
    return ScalarMetrics("host_tier_", _HOST_TIER_SCALARS, labels or {})


class ReadMetrics(ScalarMetrics):
    """Background adapter reads as ``chameleon:adapter_read_*`` gauges, with the read-latency
    histogram as ``chameleon:adapter_read_seconds_bucket{le=...}`` (cumulative counts)."""

    def __init__(self, labels: Optional[Dict[str, str]] = None) -> None:
        from prometheus_client import Gauge

        super().__init__("adapter_read_", _READ_SCALARS, labels or {})
        self._buckets = Gauge(
            "chameleon:adapter_read_seconds_bucket",
            "Finished adapter reads that took at most `le` seconds (total).",
            labelnames=[*self._labels, "le"],
            multiprocess_mode="mostrecent",
        )

    def publish(self, stats: Dict[str, Any]) -> None:
        super().publish(stats)
        for bound, count in zip(stats["latency_buckets_s"], stats["latency_cumulative"]):
            self._buckets.labels(**self._labels, le=str(bound)).set(float(count))
