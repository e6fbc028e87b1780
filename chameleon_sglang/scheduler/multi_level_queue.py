"""The multi-level queue and batch formation (paper §4.3, Algorithm 1), non-preemptive.

One ``schedule_pass`` forms one batch's admissions:

* Phase 1: every queue, smallest first, admits in FIFO order while the head's charge fits its
  quota remainder (``quota - usage``) and stops at the first misfit. A queue with nothing left
  waiting after its turn donates ``max(0, quota - usage)``; any other queue donates nothing.
* Phase 2: the donated pool is handed out, smallest queue first, same FIFO / first-misfit rule:
  a charge fits ``max(0, quota - usage) + pool`` and takes its own remainder first.
* A queue with nothing running always admits its head (so a request larger than its queue's
  whole quota still runs, alone in its queue).
* The engine's verdict ends things early: QUEUE_MISFIT stops that queue for the pass,
  ADAPTER_MISFIT too (after a bypass attempt), STOP ends the pass.
* A pass cut short by STOP leaves some queues without a turn; the next pass's phase 1 starts
  from the queue that was cut off (from the one after it if that queue admitted something this
  pass) and wraps round, so every queue gets a turn even when the batch keeps filling up.
  Without a STOP the next pass starts from queue 0 again.
* If a queue hits QUEUE_MISFIT in phase 1 (memory is short for a request within its own quota),
  phase 2 lends nothing this pass: lending would hand that memory to other queues and could
  starve it.
* Opportunistic bypass: when the head gets ADAPTER_MISFIT, the younger requests of its queue
  (within ``bypass_lookahead``) whose adapter is resident, whose charge fits, and which would
  finish before the head's memory frees, are offered instead, in FIFO order, until one does not
  fit memory. The head stays at the head.

Decisions depend only on the calls made, never on clocks, randomness or hash order, so every
tensor-parallel rank reaches the same ones.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Callable, Deque, Dict, Generator, Iterator, List, Sequence, Tuple

from chameleon_sglang.scheduler.entry import AdmitResult, RequestEntry
from chameleon_sglang.scheduler.queues import QueueLayout

TryAdmit = Callable[[RequestEntry], AdmitResult]
"""The engine's admission check: called once per attempt; on ADMITTED the engine has taken it."""


def predicted_output_steps(entry: RequestEntry) -> float:
    """Default finish estimate: one decode step per predicted output token."""
    return float(entry.predicted_output)


@dataclasses.dataclass(frozen=True)
class BypassHooks:
    """The engine's estimates for opportunistic bypass, in engine steps from now.

    ``predicted_free_at(head)``: steps until memory for the head's adapter is predicted to free
    (e.g. the fewest predicted remaining tokens among running requests holding it).
    ``predicted_finish_at(entry)``: steps until ``entry`` would finish if admitted now.
    A younger request may bypass when ``predicted_finish_at(it) < predicted_free_at(head)``.
    Base-model requests (``adapter_id is None``) count as resident.
    """

    is_adapter_resident: Callable[[str], bool]
    predicted_free_at: Callable[[RequestEntry], float]
    predicted_finish_at: Callable[[RequestEntry], float] = predicted_output_steps


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What one ``schedule_pass`` did; per-queue tuples are indexed by queue (0 = smallest)."""

    admitted_phase1: Tuple[RequestEntry, ...]
    admitted_phase2: Tuple[RequestEntry, ...]
    num_admitted: Tuple[int, ...]
    donated: Tuple[int, ...]
    """Tokens each queue donated in phase 1 (0 for queues that did not drain)."""
    num_bypasses: int
    turn_order: Tuple[int, ...]
    """The phase-1 order of queues: ascending, rotated after a pass cut short by STOP."""
    is_stopped: bool
    """The engine answered STOP."""
    is_lending_withheld: bool
    """A phase-1 QUEUE_MISFIT kept phase 2 from lending the donations."""

    @property
    def admitted(self) -> Tuple[RequestEntry, ...]:
        """Every admitted entry, in admission order."""
        return self.admitted_phase1 + self.admitted_phase2

    @property
    def donated_tokens(self) -> int:
        return sum(self.donated)


@dataclasses.dataclass
class _PassState:
    num_queues: dataclasses.InitVar[int]
    turn_order: Tuple[int, ...] = ()
    phase: int = 1
    pool: int = 0
    is_stopped: bool = False
    is_memory_blocked: bool = False
    num_bypasses: int = 0
    blocked: List[bool] = dataclasses.field(default_factory=list)
    num_admitted: List[int] = dataclasses.field(default_factory=list)
    donated: List[int] = dataclasses.field(default_factory=list)
    admitted: Dict[int, List[RequestEntry]] = dataclasses.field(default_factory=dict)

    def __post_init__(self, num_queues: int) -> None:
        self.blocked = [False] * num_queues
        self.num_admitted = [0] * num_queues
        self.donated = [0] * num_queues
        self.admitted = {1: [], 2: []}

    def result(self) -> PassResult:
        return PassResult(
            tuple(self.admitted[1]),
            tuple(self.admitted[2]),
            tuple(self.num_admitted),
            tuple(self.donated),
            self.num_bypasses,
            self.turn_order,
            self.is_stopped,
            self.is_memory_blocked and sum(self.donated) > 0,
        )


class MultiLevelQueue:
    """Waiting requests in per-queue FIFOs, plus the quota each queue has handed out.

    ``usage[q]`` is the sum of charges of running requests in queue ``q``; it may exceed
    ``quota[q]`` (borrowed donations, grown charges, a lone oversized request), which only
    blocks that queue's own admissions. Unknown request ids raise ``KeyError``.
    """

    def __init__(
        self,
        layout: QueueLayout,
        quotas: Sequence[int],
        *,
        bypass: bool = True,
        bypass_lookahead: int = 256,
    ) -> None:
        self.is_bypass_enabled = bypass
        self.bypass_lookahead = bypass_lookahead
        self.num_bypasses = 0
        self.num_squashes = 0
        self._entries: Dict[str, RequestEntry] = {}
        self._bypassed: Dict[str, RequestEntry] = {}  # running bypass requests, in admission order
        self._next_back = 0
        self._next_front = -1
        self._install(layout, quotas, [])

    # -- queries ----------------------------------------------------------------------------

    @property
    def layout(self) -> QueueLayout:
        return self._layout

    @property
    def num_queues(self) -> int:
        return self._layout.num_queues

    @property
    def quotas(self) -> Tuple[int, ...]:
        return tuple(self._quotas)

    @property
    def usage(self) -> Tuple[int, ...]:
        return tuple(self._usage)

    def remaining(self, queue: int) -> int:
        """``quota - usage`` of one queue (negative when over quota)."""
        return self._quotas[queue] - self._usage[queue]

    def num_waiting(self, queue: int) -> int:
        return len(self._waiting[queue])

    @property
    def num_running(self) -> int:
        return len(self._entries) - len(self)

    def get(self, request_id: str) -> RequestEntry:
        return self._entries[request_id]

    def head(self, queue: int) -> RequestEntry | None:
        """The oldest waiting request of ``queue`` (None when it has none)."""
        waiting = self._waiting[queue]
        return waiting[0] if waiting else None

    def running_bypasses(self) -> List[RequestEntry]:
        """Running requests admitted by bypass, in admission order (squash candidates)."""
        return list(self._bypassed.values())

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def integrity_problems(self) -> List[str]:
        """What breaks the bookkeeping (empty: nothing): each queue's usage is the sum of its
        running requests' charges; waiting requests are not running and each waits in its own
        queue once; running bypass requests are running."""
        problems = []
        usage = [0] * self.num_queues
        for entry in self._entries.values():
            if entry.is_running:
                usage[entry.queue] += entry.charge
        if usage != list(self._usage):
            problems.append(f"queue usage {list(self._usage)} != running charges {usage}")
        waiting = [e.request_id for w in self._waiting for e in w]
        if len(waiting) != len(set(waiting)):
            problems.append("a request waits twice")
        for q, queue in enumerate(self._waiting):
            for entry in queue:
                if (
                    entry.is_running
                    or entry.queue != q
                    or self._entries.get(entry.request_id) is not entry
                ):
                    problems.append(f"request {entry.request_id!r} misfiled in queue {q}")
        if any(not e.is_running for e in self._bypassed.values()):
            problems.append("a bypass request that is not running")
        return problems

    def __len__(self) -> int:
        """Number of waiting requests."""
        return sum(len(w) for w in self._waiting)

    def __iter__(self) -> Iterator[RequestEntry]:
        """Waiting requests: queue 0 first, each queue in FIFO order."""
        for waiting in self._waiting:
            yield from waiting

    # -- waiting-set changes -----------------------------------------------------------------

    def add(self, entry: RequestEntry) -> None:
        """Classify a new request by its WRS and append it to its queue."""
        if entry.request_id in self._entries:
            raise ValueError(f"request {entry.request_id!r} is already queued or running")
        entry.queue = self._layout.queue_of(entry.wrs)
        entry.order = self._next_back
        self._next_back += 1
        entry.is_running = entry.is_bypass = False
        self._entries[entry.request_id] = entry
        self._waiting[entry.queue].append(entry)

    def requeue_front(self, request_id: str) -> RequestEntry:
        """A running request was retracted: return its charge, put it at its queue's head."""
        entry = self._stop_running(request_id)
        entry.order = self._next_front
        self._next_front -= 1
        self._waiting[entry.queue].appendleft(entry)
        return entry

    def squash(self, request_id: str) -> int:
        """Send a running bypass request back to where its arrival order puts it (behind the
        head it bypassed) and return the charge it gave back."""
        entry = self._entries[request_id]
        if not (entry.is_running and entry.is_bypass):
            raise ValueError(f"request {request_id!r} is not a running bypass")
        self._stop_running(request_id)
        self._insert_in_order(entry)
        self.num_squashes += 1
        return entry.charge

    def remove(self, request_id: str) -> RequestEntry | None:
        """Abort: forget a waiting or running request (returning a running one's charge).
        Unknown ids return ``None``."""
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        if entry.is_running:
            self._usage[entry.queue] -= entry.charge
            self._bypassed.pop(request_id, None)
        else:
            self._waiting[entry.queue].remove(entry)
        del self._entries[request_id]
        return entry

    def set_layout(self, layout: QueueLayout, quotas: Sequence[int]) -> None:
        """Re-bin every request on a new layout: waiting ones keep their relative order
        (each queue stays sorted by ``order``), usage is recomputed from running charges."""
        waiting = sorted(self, key=lambda e: e.order)
        self._install(layout, quotas, waiting)

    def set_quotas(self, quotas: Sequence[int]) -> None:
        self._quotas = _checked_quotas(quotas, self.num_queues)

    # -- running-set changes -----------------------------------------------------------------

    def release(self, request_id: str) -> RequestEntry:
        """A running request finished: return its charge and forget it."""
        entry = self._entries[request_id]
        if not entry.is_running:
            raise ValueError(f"request {request_id!r} is not running")
        self._usage[entry.queue] -= entry.charge
        self._bypassed.pop(request_id, None)
        del self._entries[request_id]
        return entry

    def update_charge(self, request_id: str, output_len: int) -> int:
        """Raise the charged output to ``output_len`` if the request has outgrown it (charges
        never shrink); a running request's queue usage follows. Returns the new charge."""
        entry = self._entries[request_id]
        grown = max(output_len - entry.charged_output, 0)
        entry.charged_output += grown
        if entry.is_running:
            self._usage[entry.queue] += grown
        return entry.charge

    # -- batch formation ---------------------------------------------------------------------

    def schedule_pass(
        self, try_admit: TryAdmit, *, now: float = 0.0, hooks: BypassHooks | None = None
    ) -> PassResult:
        """Run Algorithm 1 once (see the module docstring); ``now`` stamps admissions."""
        steps = self.iter_pass(now=now, hooks=hooks)
        try:
            entry = next(steps)
            while True:
                entry = steps.send(try_admit(entry))
        except StopIteration as done:
            return done.value

    def iter_pass(
        self, *, now: float = 0.0, hooks: BypassHooks | None = None
    ) -> Generator[RequestEntry, AdmitResult, PassResult]:
        """Algorithm 1 as a coroutine: yields each candidate, receives its ``AdmitResult``.

        For engines whose admission loop pulls candidates (SGLang's prefill loop) instead of
        answering a callback; ``schedule_pass`` drives the same coroutine with a callback.
        """
        num_queues = self.num_queues
        order = tuple((self._first_turn + i) % num_queues for i in range(num_queues))
        state = _PassState(num_queues, order)
        self._first_turn = 0
        for queue in order:
            num_before = state.num_admitted[queue]
            yield from self._serve(queue, state, now, hooks)
            if state.is_stopped:
                had_turn = state.num_admitted[queue] > num_before
                self._first_turn = (queue + had_turn) % num_queues
                return state.result()
            if not self._waiting[queue]:
                state.donated[queue] = max(self.remaining(queue), 0)
        state.phase = 2
        state.pool = 0 if state.is_memory_blocked else sum(state.donated)
        for queue in range(self.num_queues):
            if state.pool <= 0 or state.is_stopped:
                break
            if not state.blocked[queue]:
                yield from self._serve(queue, state, now, hooks)
        return state.result()

    def _serve(
        self, queue: int, state: _PassState, now: float, hooks: BypassHooks | None
    ) -> Generator[RequestEntry, AdmitResult, None]:
        waiting = self._waiting[queue]
        while waiting and self._fits(waiting[0], state.pool):
            head = waiting[0]
            verdict = yield head
            if verdict is AdmitResult.ADMITTED:
                self._admit(head, state, now)
                continue
            if verdict is AdmitResult.STOP:
                state.is_stopped = True
                return
            state.blocked[queue] = True
            if verdict is AdmitResult.QUEUE_MISFIT:
                state.is_memory_blocked |= state.phase == 1
            elif verdict is AdmitResult.ADAPTER_MISFIT:
                yield from self._try_bypass(head, state, now, hooks)
            return

    def _try_bypass(
        self, head: RequestEntry, state: _PassState, now: float, hooks: BypassHooks | None
    ) -> Generator[RequestEntry, AdmitResult, None]:
        """Younger requests of the head's queue (within ``bypass_lookahead``) whose adapter is
        resident and which would finish before the head's memory frees go ahead, in FIFO order,
        each while it fits the quota; the head keeps its place."""
        if not self.is_bypass_enabled or hooks is None:
            return
        free_at = hooks.predicted_free_at(head)
        younger = list(itertools.islice(self._waiting[head.queue], 1, 1 + self.bypass_lookahead))
        for candidate in younger:
            if not self._can_bypass(candidate, free_at, state.pool, hooks):
                continue
            verdict = yield candidate
            if verdict is AdmitResult.ADMITTED:
                candidate.is_bypass = True
                self._admit(candidate, state, now)
                self._bypassed[candidate.request_id] = candidate
                self.num_bypasses += 1
                state.num_bypasses += 1
            elif verdict is AdmitResult.STOP:
                state.is_stopped = True
                return
            elif verdict is AdmitResult.QUEUE_MISFIT:
                return

    def _can_bypass(
        self, entry: RequestEntry, free_at: float, pool: int, hooks: BypassHooks
    ) -> bool:
        is_resident = entry.adapter_id is None or hooks.is_adapter_resident(entry.adapter_id)
        return (
            is_resident and self._fits(entry, pool) and hooks.predicted_finish_at(entry) < free_at
        )

    def _fits(self, entry: RequestEntry, pool: int) -> bool:
        usage = self._usage[entry.queue]
        return usage == 0 or entry.charge <= max(self.remaining(entry.queue), 0) + pool

    def _admit(self, entry: RequestEntry, state: _PassState, now: float) -> None:
        own = max(self.remaining(entry.queue), 0)
        state.pool -= min(max(entry.charge - own, 0), state.pool)
        self._waiting[entry.queue].remove(entry)
        self._usage[entry.queue] += entry.charge
        entry.is_running = True
        entry.admitted_s = now
        state.num_admitted[entry.queue] += 1
        state.admitted[state.phase].append(entry)

    # -- internals ---------------------------------------------------------------------------

    def _stop_running(self, request_id: str) -> RequestEntry:
        entry = self._entries[request_id]
        if not entry.is_running:
            raise ValueError(f"request {request_id!r} is not running")
        self._usage[entry.queue] -= entry.charge
        self._bypassed.pop(request_id, None)
        entry.is_running = entry.is_bypass = False
        entry.admitted_s = None
        return entry

    def _insert_in_order(self, entry: RequestEntry) -> None:
        waiting = self._waiting[entry.queue]
        index = next((i for i, e in enumerate(waiting) if e.order > entry.order), len(waiting))
        waiting.insert(index, entry)

    def _install(
        self, layout: QueueLayout, quotas: Sequence[int], waiting: List[RequestEntry]
    ) -> None:
        self._layout = layout
        self._quotas = _checked_quotas(quotas, layout.num_queues)
        self._first_turn = 0
        self._waiting: List[Deque[RequestEntry]] = [
            collections.deque() for _ in range(layout.num_queues)
        ]
        self._usage = [0] * layout.num_queues
        for entry in self._entries.values():
            entry.queue = layout.queue_of(entry.wrs)
            if entry.is_running:
                self._usage[entry.queue] += entry.charge
        for entry in waiting:
            self._waiting[entry.queue].append(entry)


def _checked_quotas(quotas: Sequence[int], num_queues: int) -> List[int]:
    if len(quotas) != num_queues:
        raise ValueError(f"{len(quotas)} quotas for {num_queues} queues")
    if any(q < 0 for q in quotas):
        raise ValueError("quotas must be >= 0")
    return [int(q) for q in quotas]
