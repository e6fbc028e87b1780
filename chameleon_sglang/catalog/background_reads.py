"""Adapter reads off the caller's thread: a few daemon workers, a FIFO of pending reads, and
completion the caller polls from its own loop (the scheduler's event loop never waits on a disk).

Contract: :meth:`BackgroundReads.submit` returns at once; :meth:`BackgroundReads.status` says, for
each pending read in submission order, whether it is done and whether it succeeded (a read
running longer than ``timeout_s`` counts as done and failed; its worker is left to finish or
hang, the others go on); :meth:`BackgroundReads.take` removes the reads the caller decided are
done (with tensor parallelism, what every rank agrees on) and hands back their outcomes. A
worker never touches the caller's state: it only runs the ``read`` callable it was given.
"""

from __future__ import annotations

import bisect
import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

LATENCY_BUCKETS_S: Tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds of the read-latency histogram (seconds); one more bucket holds the rest."""

ReadStatus = Tuple[bool, bool]
"""(done, succeeded) of one pending read."""


@dataclasses.dataclass
class Outcome:
    """A finished read: what ``read`` returned, or the error it raised (or a timeout)."""

    key: str
    payload: Any
    value: Any = None
    error: Optional[BaseException] = None
    seconds: float = 0.0


@dataclasses.dataclass
class _Pending:
    key: str
    payload: Any
    future: Future
    started: float


class BackgroundReads:
    """Reads run by ``workers`` daemon threads; the caller polls and takes finished ones."""

    def __init__(
        self,
        workers: int,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        name: str = "chameleon-adapter-read",
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self._clock = clock
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: List[_Pending] = []
        self.reads = 0
        self.failures = 0
        self.timeouts = 0
        self.latency_counts: List[int] = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0
        for i in range(workers):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, key: str, read: Callable[[], Any], payload: Any = None) -> None:
        """Queue ``read`` (run on a worker); ``payload`` comes back with its outcome."""
        future: Future = Future()
        self._pending.append(_Pending(key, payload, future, self._clock()))
        self._jobs.put((future, read))

    @property
    def num_pending(self) -> int:
        """Reads submitted and not yet taken."""
        return len(self._pending)

    def pending_keys(self) -> List[str]:
        """The keys of the pending reads, in submission order."""
        return [p.key for p in self._pending]

    def status(self) -> List[ReadStatus]:
        """(done, succeeded) of every pending read, in submission order."""
        now = self._clock()
        result: List[ReadStatus] = []
        for p in self._pending:
            if p.future.done():
                result.append((True, p.future.exception() is None))
            else:
                result.append((now - p.started > self.timeout_s, False))
        return result

    def take(self, agreed: Sequence[ReadStatus]) -> List[Outcome]:
        """Remove the pending reads ``agreed`` marks done (one entry per pending read, as
        :meth:`status` gave them, possibly combined across ranks) and return their outcomes; a
        read agreed done but not succeeded comes back with an error, whatever it did here."""
        if len(agreed) != len(self._pending):
            raise ValueError(f"{len(agreed)} statuses for {len(self._pending)} pending reads")
        now = self._clock()
        kept: List[_Pending] = []
        outcomes: List[Outcome] = []
        for p, (done, ok) in zip(self._pending, agreed):
            if not done:
                kept.append(p)
                continue
            outcomes.append(self._outcome(p, ok, now))
        self._pending = kept
        return outcomes

    def stats(self) -> Dict[str, Any]:
        """Counters and the read-latency histogram (cumulative, Prometheus style)."""
        cumulative, total = [], 0
        for count in self.latency_counts:
            total += count
            cumulative.append(total)
        return {
            "pending": self.num_pending,
            "reads": self.reads,
            "failures": self.failures,
            "timeouts": self.timeouts,
            "latency_buckets_s": [*LATENCY_BUCKETS_S, "+Inf"],
            "latency_cumulative": cumulative,
            "latency_sum_s": round(self.latency_sum_s, 6),
        }

    def _outcome(self, p: _Pending, ok: bool, now: float) -> Outcome:
        seconds = now - p.started
        self.reads += 1
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.latency_sum_s += seconds
        if ok and p.future.done() and p.future.exception() is None:
            return Outcome(p.key, p.payload, value=p.future.result(), seconds=seconds)
        self.failures += 1
        if not p.future.done():
            self.timeouts += 1
            error: BaseException = TimeoutError(
                f"reading adapter {p.key} did not finish within {self.timeout_s:g} s"
            )
        else:
            error = p.future.exception() or RuntimeError(
                f"reading adapter {p.key} failed on another rank"
            )
        return Outcome(p.key, p.payload, error=error, seconds=seconds)

    def _work(self) -> None:
        while True:
            future, read = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(read())
            except BaseException as exc:  # the caller gets it as the read's outcome
                future.set_exception(exc)
