"""Chameleon's scheduler inside SGLang's ``Scheduler``: request tracking, pass driving and batch
surgery (the policy itself is :mod:`chameleon_sglang.scheduler`, free of SGLang).

SGLang forms a prefill batch by walking ``waiting_queue`` and asking ``PrefillAdder.add_one_req``
whether each request fits; the first request that does not fit ends the pass (head-of-line
blocking). Under ``--chameleon`` (scheduler mode ``dynamic`` or ``static``):

- every request entering the waiting queue is sized and classified (:meth:`SchedulerBridge.
  on_enqueue`; retracted requests go back to the head of their queue);
- the prefill loop walks the candidates Algorithm 1 yields (:meth:`SchedulerBridge.candidates`,
  patch 0006) instead of the waiting queue, and a request that does not fit only stops its own
  queue (:meth:`SchedulerBridge.after_rejection`, patch 0006);
- charges return when requests finish (their ``finished()`` flag, checked at the start of every
  pass) or abort;
- with the adapter cache, bypass requests whose memory keeps a refused head out are squashed
  (the rule: :mod:`chameleon_sglang.scheduler.squash`) at SGLang's next retraction point
  (:meth:`SchedulerBridge.apply_squashes`).

SGLang keeps ``waiting_queue`` as the source of truth for membership; the policy is an index over
it. Time: the policy reads :class:`chameleon_sglang.clock.SchedulerClock` once per pass (rank 0's
clock, broadcast to every tensor-parallel rank); arrivals and finishes are stamped with the time
of the pass that sees them, so every rank feeds the policy identical inputs.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Generator, Iterator, List, Optional, Tuple

from chameleon_sglang.clock import SchedulerClock
from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.integration.adapter_costs import AdapterCosts, lora_manager_of
from chameleon_sglang.scheduler import (
    AdmitResult,
    BypassHooks,
    ChameleonPolicy,
    PassResult,
    RequestEntry,
    SizeLimits,
)
from chameleon_sglang.scheduler.bypass import CacheBypassView, SlotBypassView
from chameleon_sglang.scheduler.squash import admission_need, choose_victims, squash_order

logger = logging.getLogger(__name__)

# Passes between full comparisons of the policy's waiting set with SGLang's waiting queue (a
# safety net; arrivals, admissions and aborts are tracked as events, so a pass costs
# O(running + candidates), not O(waiting)).
FULL_SYNC_PASSES = 256
# Passes between checks of running requests against their predicted output (charges only grow
# when a request outgrows its prediction; a few passes of lag only delay that).
PROGRESS_PASSES = 8


class SchedulerBridge:
    """Connects one SGLang ``Scheduler`` to a :class:`ChameleonPolicy` (module docstring)."""

    def __init__(self, scheduler: Any, config: ChameleonConfig, clock: SchedulerClock) -> None:
        self.scheduler = scheduler
        self.config = config
        self.clock = clock
        self.costs = AdapterCosts(
            lora_manager_of(scheduler), getattr(scheduler.server_args, "max_lora_rank", None)
        )
        context_len = int(scheduler.model_config.context_len)
        self.limits = SizeLimits(
            max_input=context_len,
            max_output=context_len,
            max_rank=self.costs.max_rank,
            min_rank=self.costs.min_rank,
        )
        self.policy = ChameleonPolicy(config, self.limits, int(scheduler.max_total_num_tokens))
        self.cache: Any = None  # the CacheBridge, where the adapter cache is the LoRA pool
        self._now = 0.0
        # rid -> (Req, its policy entry) for requests admitted and not yet finished
        self._running: Dict[str, Tuple[Any, RequestEntry]] = {}
        self._waiting: Dict[str, Any] = {}  # rid -> Req in SGLang's waiting queue
        self._pass: Optional[_PassState] = None
        # rid -> (departures, free KV tokens) when SGLang refused it for memory
        self._memory_blocked: Dict[str, Tuple[int, int]] = {}
        self._num_departures = 0
        self.num_passes = 0
        self.num_queue_misfits = 0
        self.num_adapter_misfits = 0
        self.num_retractions = 0
        self.last_pass: Optional[PassResult] = None
        # Squash-and-requeue (with the adapter cache): bypass requests chosen at a pass, taken
        # out of the running batch at SGLang's next retraction point.
        self._squash_pending: Dict[str, Tuple[Any, str]] = {}  # rid -> (Req, head's rid)
        self._squashing: set = set()

    def use_adapter_cache(self, cache: Any) -> None:
        """Adapters live in the adapter cache (a ``CacheBridge``), in KV memory: their memory is
        charged to quotas, and bypass asks the cache which adapters are resident."""
        self.cache = cache
        self.costs.charge_adapters_to_kv(cache.pool)

    # -- events from SGLang ------------------------------------------------------------------
    def on_enqueue(self, req: Any, is_retracted: bool) -> None:
        """``_add_request_to_queue`` ran; classify the request if SGLang queued it."""
        queue = self.scheduler.waiting_queue
        if not queue or queue[-1] is not req:
            return  # rejected (aborted, queue limit) or routed elsewhere (disaggregation)
        if is_retracted and req.rid in self._running:
            self._num_departures += 1
            del self._running[req.rid]
            if req.rid in self._squashing:
                self._squashing.discard(req.rid)
                self.policy.squash(req.rid)  # back behind the head it bypassed
            else:
                self.num_retractions += 1
                self.policy.on_retracted(req.rid)
        elif req.rid not in self.policy.queue:
            self._add(req)
        self._waiting[req.rid] = req

    def on_waiting_abort(self, req: Any) -> None:
        """SGLang dropped an aborted request (``_release_aborted_request``)."""
        if self._waiting.pop(req.rid, None) is not None:
            self.policy.on_abort(req.rid)
            self._memory_blocked.pop(req.rid, None)

    def on_lora_veto(self, req: Any) -> None:
        """SGLang refused ``req`` because its adapter cannot join the batch."""
        if self._pass is not None and self._pass.current is req:
            self._pass.adapter_vetoed = True

    # -- prefill pass ------------------------------------------------------------------------
    def begin_pass(self) -> float:
        """Settle what changed since the last pass; the pass's time (one clock read)."""
        self._now = self.clock.now()
        self._settle_running(check_progress=self.num_passes % PROGRESS_PASSES == 0)
        if self.num_passes % FULL_SYNC_PASSES == 0:
            self._sync_waiting()
        self.num_passes += 1
        return self._now

    def candidates(self, adder: Any, running_batch: Any) -> Generator[Any, None, None]:
        """Algorithm 1's candidates for SGLang's prefill loop; learns each one's fate from the
        adder when the loop asks for the next. If the loop stops early, the pass is settled
        when the generator is closed (the last candidate counts if it was admitted)."""
        state = self._pass = _PassState(adder)
        steps = self.policy.iter_pass(self._now, self._bypass_hooks(running_batch, adder))
        try:
            entry = next(steps)
            while True:
                req = self._waiting.get(entry.request_id)
                if req is None or self._still_memory_blocked(req):
                    # Gone from SGLang's queue, or refused for memory with nothing freed since
                    # (SGLang's own loop would not retry it either: its batch stays "full").
                    self.num_queue_misfits += req is not None
                    entry = steps.send(AdmitResult.QUEUE_MISFIT)
                    continue
                state.begin(req)
                yield req
                entry = steps.send(self._settle(state))
        except StopIteration as done:
            self.last_pass = done.value
        except GeneratorExit:
            self.last_pass = self._settle_early_end(steps, state)
        finally:
            self._pass = None

    def after_rejection(
        self, adder: Any, running_batch: Any, req: Any, memory_short: bool, budget_spent: bool
    ) -> bool:
        """SGLang's adder refused ``req``: keep walking other candidates? Yes when only this
        request did not fit the memory (``memory_short``) and the pass budget is not spent;
        its queue stops, the others go on. SGLang marked the batch full just before asking."""
        state = self._pass
        if state is None or state.current is not req or state.was_admitted() or not memory_short:
            return False
        if self._squashes_enabled():
            self._plan_squashes_for(req, adder)
        if budget_spent:
            return False
        running_batch.batch_is_full = False
        state.memory_rejected = True
        self._memory_blocked[req.rid] = (self._num_departures, self._free_tokens())
        return True

    # -- squash-and-requeue (batch surgery) --------------------------------------------------
    def _squashes_enabled(self) -> bool:
        return self.cache is not None and self.config.bypass

    def _plan_squashes_for(self, head: Any, adder: Any) -> None:
        """``head`` was just refused: plan the squash of the younger bypass requests of its
        queue whose memory keeps it out (:mod:`chameleon_sglang.scheduler.squash`)."""
        order = squash_order(self.policy.queue, head.rid, exclude=self._squash_pending)
        live = {
            e.request_id: self._running[e.request_id][0]
            for e in order
            if e.request_id in self._running and not self._running[e.request_id][0].finished()
        }
        held = ((rid, len(req.origin_input_ids) + len(req.output_ids)) for rid, req in live.items())
        for rid in choose_victims(self._admission_need(head), int(adder.rem_total_tokens), held):
            self._squash_pending[rid] = (live[rid], head.rid)

    def _admission_need(self, req: Any) -> int:
        from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

        adapter = req.lora_id
        missing = (
            0
            if adapter is None or self.cache.pool.is_resident(adapter)
            else self.costs.adapter_tokens(adapter)
        )
        return admission_need(
            len(req.origin_input_ids),
            req.sampling_params.max_new_tokens,
            CLIP_MAX_NEW_TOKENS,
            missing,
        )

    def apply_squashes(self, batch: Any) -> None:
        """At SGLang's retraction point (before ``update_running_batch``): take the planned
        bypass requests out of the running batch, free their KV and requeue them. A plan whose
        head is no longer waiting (admitted or gone meanwhile) is dropped."""
        pending, self._squash_pending = self._squash_pending, {}
        if not pending or batch is None or batch.is_empty():
            return
        squash = [
            i
            for i, req in enumerate(batch.reqs)
            if req.rid in pending and not req.finished() and pending[req.rid][1] in self._waiting
        ]
        if not squash:
            return
        keep = [i for i in range(len(batch.reqs)) if i not in set(squash)]
        reqs = [batch.reqs[i] for i in squash]
        for i in squash:
            batch.release_req(i, len(keep))
        batch.filter_batch(keep_indices=keep)
        batch.batch_is_full = False
        for req in reqs:
            self._squashing.add(req.rid)
            self.scheduler._add_request_to_queue(req, is_retracted=True)
        logger.info("Chameleon: squashed %d bypass request(s) back to their queues", len(reqs))

    # -- reporting -----------------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Live statistics; settles finished requests first so usage is current."""
        self._settle_running()
        self._sync_waiting()
        return self.snapshot()

    def snapshot(self) -> Dict[str, Any]:
        """The policy's statistics and this bridge's counters, as they stand."""
        stats = self.policy.stats()
        stats.update(
            num_passes=self.num_passes,
            num_queue_misfits=self.num_queue_misfits,
            num_adapter_misfits=self.num_adapter_misfits,
            num_retractions=self.num_retractions,
            clock_s=self.clock.last,
            last_pass_admitted=self.last_pass.num_admitted if self.last_pass else 0,
            num_tracked_running=len(self._running),
        )
        return stats

    def integrity_problems(self) -> List[str]:
        """The policy's bookkeeping problems (see ``chameleon_sglang.integration.integrity``)."""
        self._settle_running()
        queue = self.policy.queue
        problems = queue.integrity_problems()
        for rid in sorted(self._running):
            if rid not in queue or not queue.get(rid).is_running:
                problems.append(f"request {rid!r} tracked as running but not running")
        return problems

    # -- tracking ------------------------------------------------------------------------------
    def _add(self, req: Any) -> RequestEntry:
        adapter = req.lora_id
        return self.policy.on_arrival(
            req.rid,
            adapter_id=adapter,
            input_len=len(req.origin_input_ids),
            max_new_tokens=int(req.sampling_params.max_new_tokens or 1),
            now=self._now,
            rank=self.costs.rank(adapter) if adapter is not None else None,
            adapter_tokens=self.costs.adapter_tokens(adapter),
        )

    def _settle_running(self, check_progress: bool = True) -> None:
        """Finished requests (SGLang marks aborted running requests finished too) return their
        charge and teach the predictor; with ``check_progress``, requests that outgrew their
        prediction are re-charged. O(running)."""
        running = self._running
        for rid in [rid for rid, (req, _) in running.items() if req.finished()]:
            req, _ = running.pop(rid)
            self.policy.on_finish(rid, len(req.output_ids), self._now)
            self._num_departures += 1
        if check_progress:
            for rid, (req, entry) in running.items():
                if len(req.output_ids) > entry.charged_output:
                    self.policy.on_progress(rid, len(req.output_ids))

    def _sync_waiting(self) -> None:
        """Make the policy's waiting set equal SGLang's waiting queue. O(waiting)."""
        queued = {req.rid: req for req in self.scheduler.waiting_queue}
        for rid in [rid for rid in self._waiting if rid not in queued]:
            self.on_waiting_abort(self._waiting[rid])
        for rid, req in queued.items():
            if rid not in self._waiting:
                if rid not in self.policy.queue:
                    self._add(req)
                self._waiting[rid] = req

    def _running_steps(self, running_batch: Any) -> Iterator[Tuple[Optional[str], float]]:
        """(adapter, predicted decode steps left) of each tracked request of the batch."""
        for req in running_batch.reqs:
            tracked = self._running.get(req.rid)
            if tracked is not None:
                yield req.lora_id, float(max(tracked[1].charged_output - len(req.output_ids), 0))

    def _bypass_hooks(self, running_batch: Any, adder: Any) -> BypassHooks:
        """The bypass estimates of :mod:`chameleon_sglang.scheduler.bypass` for this pass."""

        def running() -> Iterator[Tuple[Optional[str], float]]:
            return self._running_steps(running_batch)

        if self.cache is not None:
            return CacheBypassView(running, self.cache.pool.is_resident).hooks()
        return SlotBypassView(running, lambda: (r.lora_id for r in adder.can_run_list)).hooks()

    def _still_memory_blocked(self, req: Any) -> bool:
        """Refused for memory earlier, and since then no running request has left and no KV
        memory has been freed: asking SGLang again would get the same answer."""
        memo = self._memory_blocked.get(req.rid)
        return memo is not None and memo == (self._num_departures, self._free_tokens())

    def _free_tokens(self) -> int:
        """KV tokens available to a new request: free slots plus evictable prefix cache."""
        allocator = self.scheduler.token_to_kv_pool_allocator
        return int(allocator.available_size()) + int(self.scheduler.tree_cache.evictable_size())

    def _mark_running(self, req: Any) -> None:
        self._waiting.pop(req.rid, None)
        self._memory_blocked.pop(req.rid, None)
        self._running[req.rid] = (req, self.policy.queue.get(req.rid))

    def _settle(self, state: _PassState) -> AdmitResult:
        verdict = state.verdict()
        if verdict is AdmitResult.ADMITTED:
            self._mark_running(state.current)
        elif verdict is AdmitResult.QUEUE_MISFIT:
            self.num_queue_misfits += 1
        else:
            self.num_adapter_misfits += 1
        if verdict is AdmitResult.ADAPTER_MISFIT and self._squashes_enabled():
            self._plan_squashes_for(state.current, state.adder)
        return verdict

    def _settle_early_end(self, steps: Generator, state: _PassState) -> Optional[PassResult]:
        """SGLang's loop ended (batch full, budget spent): record the last candidate if it got
        in, then end the pass for every queue that did not have its turn."""
        try:
            if state.current is not None and state.was_admitted():
                self._mark_running(state.current)
                steps.send(AdmitResult.ADMITTED)
            while True:
                steps.send(AdmitResult.STOP)
        except StopIteration as done:
            return done.value


class _PassState:
    """The candidate SGLang's loop is looking at, and what happened to it."""

    def __init__(self, adder: Any) -> None:
        self.adder = adder
        self.current: Any = None
        self.adapter_vetoed = False
        self.memory_rejected = False

    def begin(self, req: Any) -> None:
        self.current = req
        self.adapter_vetoed = False
        self.memory_rejected = False

    def was_admitted(self) -> bool:
        req = self.current
        if req is None:
            return False
        if self.adder.new_chunked_req is req:
            return True
        return bool(self.adder.can_run_list) and self.adder.can_run_list[-1] is req

    def verdict(self) -> AdmitResult:
        if self.was_admitted():
            return AdmitResult.ADMITTED
        if self.adapter_vetoed:
            return AdmitResult.ADAPTER_MISFIT
        return AdmitResult.QUEUE_MISFIT
