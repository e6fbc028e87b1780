"""Chameleon's scheduling policy: predictor + WRS + queue layout + quotas + Algorithm 1.

The engine drives it with events (arrival, progress, retraction, finish, abort) and asks it for
one admission pass per iteration. Time enters only as ``now`` arguments (seconds on a monotonic
clock shared by all tensor-parallel ranks); nothing here reads a clock or draws random numbers.

Layouts: ``static`` mode uses ``max_queues`` equal-WRS-range queues with equal quotas, fixed.
``dynamic`` mode starts with one queue holding the whole capacity; once ``warmup_requests``
requests have arrived it fits a layout and quotas, then refits every ``refresh_period_s``. A fit
uses the WRS of arrivals of the last refresh period (at least the latest ``warmup_requests``);
queue demands are rebuilt by replaying that window's events under the new layout.
"""

from __future__ import annotations

import collections
from typing import Any, Deque, Dict, Generator, List, NamedTuple, Sequence

from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.scheduler.entry import AdmitResult, RequestEntry
from chameleon_sglang.scheduler.multi_level_queue import (
    BypassHooks,
    MultiLevelQueue,
    PassResult,
    TryAdmit,
)
from chameleon_sglang.scheduler.predictor import OutputPredictor, create_predictor
from chameleon_sglang.scheduler.queues import LayoutFit, QueueLayout, fit_layout, static_layout
from chameleon_sglang.scheduler.quotas import (
    QueueDemand,
    QueueStats,
    QuotaPlan,
    equal_quotas,
    plan_quotas,
)
from chameleon_sglang.scheduler.wrs import SizeLimits, compute_wrs, max_wrs


class _Arrival(NamedTuple):
    at_s: float
    wrs: float
    charge: int


class _Service(NamedTuple):
    at_s: float
    wrs: float
    service_s: float


class ChameleonPolicy:
    """The scheduler policy for one engine; identical call sequences give identical decisions."""

    def __init__(
        self,
        config: ChameleonConfig,
        limits: SizeLimits,
        total_tokens: int,
        *,
        predictor: OutputPredictor | None = None,
        history_size: int = 4096,
    ) -> None:
        if config.scheduler == "off":
            raise ValueError("scheduler mode 'off' uses SGLang's own scheduling, not this policy")
        self.config = config
        self.limits = limits
        self.total_tokens = total_tokens
        self.predictor = (
            predictor
            if predictor is not None
            else create_predictor(config.predictor, config.predictor_accuracy)
        )
        history = max(history_size, config.warmup_requests)
        self._arrivals: Deque[_Arrival] = collections.deque(maxlen=history)
        self._services: Deque[_Service] = collections.deque(maxlen=history)
        self.num_arrivals = 0
        self.num_refreshes = 0
        self.last_refresh_s: float | None = None
        self.last_fit: LayoutFit | None = None
        layout, self.plan = self._initial_layout()
        self.queue = MultiLevelQueue(layout, self.plan.quotas, bypass=config.bypass)

    # -- events -------------------------------------------------------------------------------

    def on_arrival(
        self,
        request_id: str,
        *,
        adapter_id: str | None,
        input_len: int,
        max_new_tokens: int,
        now: float,
        rank: int | None = None,
        adapter_tokens: int = 0,
    ) -> RequestEntry:
        """Predict, size and queue a new request. ``rank`` is required with an adapter and
        ignored without one (base model: the smallest rank); ``adapter_tokens`` is the adapter's
        memory in KV tokens."""
        if adapter_id is not None and rank is None:
            raise ValueError(f"request {request_id!r}: an adapter request needs its rank")
        rank = self.limits.rank_of(rank if adapter_id is not None else None)
        predicted = self.predictor.predict(adapter_id, input_len, max_new_tokens)
        wrs = compute_wrs(
            input_len,
            predicted,
            rank,
            self.limits,
            input_weight=self.config.wrs_input_weight,
            output_weight=self.config.wrs_output_weight,
        )
        entry = RequestEntry(
            request_id,
            adapter_id,
            input_len,
            max_new_tokens,
            predicted,
            rank,
            wrs,
            now,
            adapter_tokens=adapter_tokens if adapter_id is not None else 0,
        )
        self.queue.add(entry)
        self._arrivals.append(_Arrival(now, wrs, entry.charge))
        self.num_arrivals += 1
        return entry

    def on_progress(self, request_id: str, output_len: int) -> int:
        """A running request has ``output_len`` output tokens; returns its charge."""
        return self.queue.update_charge(request_id, output_len)

    def on_retracted(self, request_id: str) -> None:
        """The engine retracted a running request: it returns to the head of its queue."""
        self.queue.requeue_front(request_id)

    def on_finish(self, request_id: str, output_len: int, now: float) -> None:
        """A running request finished with ``output_len`` tokens: release, learn, record."""
        entry = self.queue.release(request_id)
        self.predictor.observe(
            entry.adapter_id, entry.input_len, output_len, predicted=entry.predicted_output
        )
        if entry.admitted_s is not None:
            self._services.append(_Service(now, entry.wrs, now - entry.admitted_s))

    def on_abort(self, request_id: str) -> None:
        """Forget a waiting or running request; unknown ids are ignored."""
        self.queue.remove(request_id)

    def squash(self, request_id: str) -> int:
        """The memory a bypass request jumped ahead of has freed: requeue it, return its charge."""
        return self.queue.squash(request_id)

    # -- decisions ----------------------------------------------------------------------------

    def schedule_pass(
        self, try_admit: TryAdmit, now: float, hooks: BypassHooks | None = None
    ) -> PassResult:
        """Refresh the layout if due, then run one admission pass."""
        self.maybe_refresh(now)
        return self.queue.schedule_pass(try_admit, now=now, hooks=hooks)

    def iter_pass(
        self, now: float, hooks: BypassHooks | None = None
    ) -> Generator[RequestEntry, AdmitResult, PassResult]:
        """``schedule_pass`` as a coroutine (see ``MultiLevelQueue.iter_pass``)."""
        self.maybe_refresh(now)
        return self.queue.iter_pass(now=now, hooks=hooks)

    def maybe_refresh(self, now: float) -> bool:
        """Refit layout and quotas if due (dynamic mode only); True if it did."""
        if self.config.scheduler != "dynamic" or self.num_arrivals < self.config.warmup_requests:
            return False
        last = self.last_refresh_s
        if last is not None and now - last < self.config.refresh_period_s:
            return False
        self.refresh(now)
        return True

    def refresh(self, now: float) -> None:
        """Refit the layout on recent WRS values, recompute quotas, re-bin queued requests."""
        arrivals = self._recent_arrivals(now)
        wrs = [a.wrs for a in arrivals]
        fit = fit_layout(wrs, self.config.max_queues, self.config.elbow_threshold)
        demands = self._demands(fit.layout, arrivals, now)
        self.plan = plan_quotas(demands, self.total_tokens, self.config.ttft_slo_s)
        self.queue.set_layout(fit.layout, self.plan.quotas)
        self.last_fit = fit
        self.last_refresh_s = now
        self.num_refreshes += 1

    # -- reporting ----------------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """A JSON-able snapshot for metrics and logs."""
        mlq = self.queue
        return {
            "mode": self.config.scheduler,
            "num_queues": mlq.num_queues,
            "cutoffs": list(mlq.layout.cutoffs),
            "quotas": list(mlq.quotas),
            "usage": list(mlq.usage),
            "num_waiting": [mlq.num_waiting(q) for q in range(mlq.num_queues)],
            "num_running": mlq.num_running,
            "min_quotas": list(self.plan.minimums),
            "quota_scaled_down": self.plan.scaled_down,
            "quota_scale_factor": self.plan.scale_factor,
            "num_bypasses": mlq.num_bypasses,
            "num_squashes": mlq.num_squashes,
            "num_arrivals": self.num_arrivals,
            "num_refreshes": self.num_refreshes,
            "last_refresh_s": self.last_refresh_s,
            "wcss": list(self.last_fit.wcss) if self.last_fit else [],
            "predictor": self.predictor.accuracy(),
        }

    # -- internals ----------------------------------------------------------------------------

    def _initial_layout(self) -> tuple[QueueLayout, QuotaPlan]:
        if self.config.scheduler == "static":
            weights = (self.config.wrs_input_weight, self.config.wrs_output_weight)
            layout = static_layout(self.config.max_queues, max_wrs(*weights))
        else:
            layout = QueueLayout()
        return layout, equal_quotas(layout.num_queues, self.total_tokens)

    def _recent_arrivals(self, now: float) -> List[_Arrival]:
        since = now - self.config.refresh_period_s
        recent = [a for a in self._arrivals if a.at_s >= since]
        if len(recent) < self.config.warmup_requests:
            recent = list(self._arrivals)[-self.config.warmup_requests :]
        return recent

    def _demands(
        self, layout: QueueLayout, arrivals: Sequence[_Arrival], now: float
    ) -> List[QueueDemand]:
        start = arrivals[0].at_s if arrivals else now
        services = [s for s in self._services if s.at_s >= start]
        stats = [QueueStats(self.config.refresh_period_s, start) for _ in range(layout.num_queues)]
        for a in arrivals:
            stats[layout.queue_of(a.wrs)].observe_arrival(a.at_s, a.charge)
        for s in services:
            stats[layout.queue_of(s.wrs)].observe_service(s.at_s, s.service_s)
        return [s.demand(now) for s in stats]
