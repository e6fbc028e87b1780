"""Token quotas per queue (paper §4.3): a minimum from queueing theory, the rest by queue size.

Minimum of queue q from K x M/M/1: ``Tok_min = S * D * (1/SLO + lambda)`` with S the p99 charge
(tokens), D the mean service time (s, admission to finish) and lambda the arrival rate (req/s).
The rest of the total is split with weights ``1/q`` (q = 1 for the smallest queue). If the
minimums exceed the total they are scaled down proportionally and nothing is left to split.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Deque, Sequence, Tuple

from chameleon_sglang.scheduler.quantile import nearest_rank


@dataclasses.dataclass(frozen=True)
class QueueDemand:
    """What one queue asks of the system."""

    p99_charge: float
    """S: tokens."""
    mean_service_s: float
    """D: seconds from admission to finish."""
    arrival_rate: float
    """lambda: requests per second."""

    def min_tokens(self, slo_s: float) -> float:
        """``S * D * (1/SLO + lambda)``."""
        return self.p99_charge * self.mean_service_s * (1.0 / slo_s + self.arrival_rate)


class QueueStats:
    """One queue's demand, estimated from events the caller feeds with explicit times.

    Arrival rate and mean service time are exponentially time-decayed averages with time constant
    ``time_constant_s``; the rate is normalised by the decayed length of the observation period
    (which starts at ``start_s``), so it is unbiased before a full time constant has passed. The
    p99 charge is exact over the last ``charge_window`` arrivals. Times must not decrease.
    """

    def __init__(self, time_constant_s: float, start_s: float, charge_window: int = 1024) -> None:
        if time_constant_s <= 0:
            raise ValueError("time_constant_s must be > 0")
        self.time_constant_s = time_constant_s
        self.start_s = start_s
        self._arrivals = 0.0
        self._arrivals_at = start_s
        self._service_sum = 0.0
        self._service_weight = 0.0
        self._service_at = start_s
        self._charges: Deque[int] = collections.deque(maxlen=charge_window)

    def observe_arrival(self, now: float, charge: int) -> None:
        self._arrivals = self._arrivals * self._decay(self._arrivals_at, now) + 1.0
        self._arrivals_at = max(now, self._arrivals_at)
        self._charges.append(charge)

    def observe_service(self, now: float, service_s: float) -> None:
        decay = self._decay(self._service_at, now)
        self._service_sum = self._service_sum * decay + service_s
        self._service_weight = self._service_weight * decay + 1.0
        self._service_at = max(now, self._service_at)

    def arrival_rate(self, now: float) -> float:
        period = self.time_constant_s * -math.expm1(-(now - self.start_s) / self.time_constant_s)
        if period <= 0:
            return 0.0
        return self._arrivals * self._decay(self._arrivals_at, now) / period

    def mean_service_s(self) -> float:
        return self._service_sum / self._service_weight if self._service_weight > 0 else 0.0

    def p99_charge(self) -> float:
        return float(nearest_rank(self._charges, 0.99)) if self._charges else 0.0

    def demand(self, now: float) -> QueueDemand:
        return QueueDemand(self.p99_charge(), self.mean_service_s(), self.arrival_rate(now))

    def _decay(self, since: float, now: float) -> float:
        return math.exp(-max(now - since, 0.0) / self.time_constant_s)


@dataclasses.dataclass(frozen=True)
class QuotaPlan:
    """Token quotas per queue (index 0 = smallest queue) and how they were reached.

    ``sum(quotas) == total_tokens`` always.
    """

    quotas: Tuple[int, ...]
    minimums: Tuple[float, ...]
    """``Tok_min`` per queue before any scaling."""
    total_tokens: int
    scale_factor: float = 1.0
    """What the minimums were multiplied by to fit the total (1.0 when they fit)."""

    @property
    def num_queues(self) -> int:
        return len(self.quotas)

    @property
    def scaled_down(self) -> bool:
        return self.scale_factor < 1.0


def plan_quotas(demands: Sequence[QueueDemand], total_tokens: int, slo_s: float) -> QuotaPlan:
    """Minimum per queue, then the rest split ``1/q``; minimums scaled down if they don't fit."""
    if not demands:
        raise ValueError("need at least one queue")
    _check_total(total_tokens)
    minimums = tuple(d.min_tokens(slo_s) for d in demands)
    needed = sum(minimums)
    if needed > total_tokens:
        scale = total_tokens / needed
        shares = [m * scale for m in minimums]
        return QuotaPlan(_round_to_total(shares, total_tokens), minimums, total_tokens, scale)
    weights = [1.0 / q for q in range(1, len(demands) + 1)]
    spare = total_tokens - needed
    shares = [m + spare * w / sum(weights) for m, w in zip(minimums, weights)]
    return QuotaPlan(_round_to_total(shares, total_tokens), minimums, total_tokens)


def equal_quotas(num_queues: int, total_tokens: int) -> QuotaPlan:
    """The static plan: ``total_tokens`` split equally (leftover tokens to the smallest queues)."""
    if num_queues < 1:
        raise ValueError("need at least one queue")
    _check_total(total_tokens)
    shares = [total_tokens / num_queues] * num_queues
    return QuotaPlan(_round_to_total(shares, total_tokens), (0.0,) * num_queues, total_tokens)


def _round_to_total(shares: Sequence[float], total: int) -> Tuple[int, ...]:
    """Floor every share, then hand the leftover tokens out one each, smallest queue first."""
    quotas = [min(int(math.floor(s)), total) for s in shares]
    leftover = total - sum(quotas)
    for i in range(max(leftover, 0)):
        quotas[i % len(quotas)] += 1
    return tuple(quotas)


def _check_total(total_tokens: int) -> None:
    if total_tokens < 0:
        raise ValueError("total_tokens must be >= 0")
