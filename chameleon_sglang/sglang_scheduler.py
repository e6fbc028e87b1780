"""Chameleon's scheduler inside SGLang's ``Scheduler`` (the seams of patch 0006 and the plugin).

SGLang forms a prefill batch by walking ``waiting_queue`` and asking ``PrefillAdder.add_one_req``
whether each request fits; the first request that does not fit ends the pass (head-of-line
blocking). Under ``--chameleon`` (scheduler mode ``dynamic`` or ``static``):

- every request entering the waiting queue is sized and classified (:meth:`SchedulerBridge.
  on_enqueue`, an AFTER hook on ``Scheduler._add_request_to_queue``; retracted requests go back to
  the head of their queue);
- the prefill loop walks the candidates Algorithm 1 yields (:func:`prefill_candidates`, patch
  0006) instead of the waiting queue, and a request that does not fit only stops its own queue
  (:func:`prefill_pass_continues`, patch 0006);
- charges return when requests finish (their ``finished()`` flag, checked at the start of every
  pass) or abort (an AFTER hook on ``Scheduler._release_aborted_request``);
- priority preemption is off.

SGLang keeps ``waiting_queue`` as the source of truth for membership; the policy is an index over
it. Without ``--chameleon`` the two patched calls return SGLang's own iterable and verdict, so the
loop is unchanged.

Time: the policy reads :class:`chameleon_sglang.clock.SchedulerClock` once per pass (rank 0's
clock, broadcast to every tensor-parallel rank); arrivals and finishes are stamped with the time
of the pass that sees them, so every rank feeds the policy identical inputs.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Generator, Iterable, List, Optional, Tuple

from chameleon_sglang.clock import SchedulerClock, tensor_parallel_broadcast
from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.scheduler import (
    AdmitResult,
    BypassHooks,
    ChameleonPolicy,
    PassResult,
    RequestEntry,
    SizeLimits,
)

logger = logging.getLogger(__name__)

ATTR = "chameleon_scheduler"
# Passes between full comparisons of the policy's waiting set with SGLang's waiting queue (a
# safety net; arrivals, admissions and aborts are tracked as events, so a pass costs
# O(running + candidates), not O(waiting)).
FULL_SYNC_PASSES = 256
# Passes between checks of running requests against their predicted output (charges only grow
# when a request outgrows its prediction; a few passes of lag only delay that).
PROGRESS_PASSES = 8


def bridge_of(scheduler: Any) -> Optional["SchedulerBridge"]:
    return getattr(scheduler, ATTR, None)


# -- the two calls patch 0006 inserts into Scheduler._get_new_batch_prefill_raw --------------
def prefill_candidates(scheduler: Any, adder: Any, running_batch: Any) -> Iterable[Any]:
    """The requests the prefill loop should consider, in order (SGLang's queue when inactive)."""
    from chameleon_sglang.sglang_cache import cache_bridge_of

    cache = cache_bridge_of(scheduler)
    if cache is not None:
        cache.begin_pass(adder)
    bridge = bridge_of(scheduler)
    if bridge is None:
        return scheduler.waiting_queue
    return bridge.candidates(adder, running_batch)


def prefill_pass_continues(
    scheduler: Any, adder: Any, running_batch: Any, req: Any, res: Any
) -> bool:
    """After ``add_one_req`` answered ``res`` (not CONTINUE): keep walking other candidates?

    SGLang's answer is always no. Chameleon's: yes when only this request did not fit the
    memory budget and capacity remains for smaller ones; its queue stops, the others go on.
    """
    bridge = bridge_of(scheduler)
    if bridge is None:
        return False
    return bridge.after_rejection(adder, running_batch, req, res)


class SchedulerBridge:
    """Connects one SGLang ``Scheduler`` to a :class:`ChameleonPolicy`."""

    def __init__(
        self, scheduler: Any, config: ChameleonConfig, clock: Optional[SchedulerClock] = None
    ) -> None:
        self.scheduler = scheduler
        self.config = config
        self.lora_manager = _lora_manager(scheduler)
        context_len = int(scheduler.model_config.context_len)
        ranks = self._loaded_ranks()
        max_rank = self._max_rank(ranks)
        self.limits = SizeLimits(
            max_input=context_len,
            max_output=context_len,
            max_rank=max_rank,
            min_rank=min(ranks) if ranks else max_rank,
        )
        self.policy = ChameleonPolicy(config, self.limits, int(scheduler.max_total_num_tokens))
        self.kv_bytes_per_token = _kv_bytes_per_token(scheduler)
        self._now = 0.0
        self._adapter_tokens: Dict[str, int] = {}
        # True once the adapter cache keeps adapters in KV memory; SGLang's LoRA slots do not.
        self.adapters_in_kv_memory = False
        self.cache: Any = None
        # rid -> (Req, its policy entry) for requests admitted and not yet finished
        self._running: Dict[str, Tuple[Any, RequestEntry]] = {}
        self._waiting: Dict[str, Any] = {}  # rid -> Req in SGLang's waiting queue
        self.clock = clock if clock is not None else SchedulerClock(tensor_parallel_broadcast())
        self.metrics: Any = None
        self._metrics_checked = False
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
        self.adapters_in_kv_memory = cache is not None

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
    def candidates(self, adder: Any, running_batch: Any) -> Generator[Any, None, None]:
        """Algorithm 1's candidates for SGLang's prefill loop; learns each one's fate from the
        adder when the loop asks for the next. If the loop stops early, the pass is settled
        when the generator is closed (the last candidate counts if it was admitted)."""
        self._now = self.clock.now()
        self._settle_running(check_progress=self.num_passes % PROGRESS_PASSES == 0)
        if self.num_passes % FULL_SYNC_PASSES == 0:
            self._sync_waiting()
        if not self._metrics_checked:  # the metrics reporter is built after the policy
            self._metrics_checked = True
            self.metrics = _metrics_if_enabled(self.scheduler)
        if self.metrics is not None and self.metrics.is_due(self._now):
            self.metrics.publish(self._now, self._snapshot())
        self.num_passes += 1
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

    def after_rejection(self, adder: Any, running_batch: Any, req: Any, res: Any) -> bool:
        from sglang.srt.managers.schedule_policy import AddReqResult

        state = self._pass
        if state is None or state.current is not req or state.was_admitted():
            return False
        if res != AddReqResult.NO_TOKEN:
            return False
        if self._squashes_enabled():
            self._plan_squashes_for(req, adder)
        if adder.budget_state() == AddReqResult.NO_TOKEN:
            return False
        # Only this request did not fit; SGLang marked the batch full just before asking.
        running_batch.batch_is_full = False
        state.memory_rejected = True
        self._memory_blocked[req.rid] = (self._num_departures, self._free_tokens())
        return True

    # -- squash-and-requeue ------------------------------------------------------------------
    def _plan_squashes_for(self, head: Any, adder: Any) -> None:
        """The paper's squash, with the adapter cache. ``head`` was just refused (its adapter
        could not be placed, or its KV did not fit). If memory held by younger bypass requests
        of its queue is what keeps it out - it would fit with them gone - those requests
        (youngest first, as few as needed) are planned for squash: taken out of the running
        batch at SGLang's next retraction point and requeued behind the head."""
        queue = self.policy.queue
        if head.rid not in queue:
            return
        entry = queue.get(head.rid)
        if queue.head(entry.queue) is not entry:
            return
        younger = sorted((e for e in queue.running_bypasses()
                          if e.queue == entry.queue and e.order > entry.order
                          and e.request_id not in self._squash_pending),
                         key=lambda e: e.order, reverse=True)
        if not younger:
            return
        need = self._admission_need(head)
        have = int(adder.rem_total_tokens)
        chosen: List[Any] = []
        for bypass in younger:
            if have >= need:
                break
            tracked = self._running.get(bypass.request_id)
            if tracked is None or tracked[0].finished():
                continue
            chosen.append(tracked[0])
            have += _kv_tokens_held(tracked[0])
        if chosen and have >= need:
            for req in chosen:
                self._squash_pending[req.rid] = (req, head.rid)

    def _squashes_enabled(self) -> bool:
        return self.cache is not None and self.config.bypass

    def _admission_need(self, req: Any) -> int:
        """KV tokens SGLang's adder needs to admit ``req`` (prompt plus clipped output), plus
        its adapter's slots when the adapter is not resident."""
        from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

        need = len(req.origin_input_ids) + min(req.sampling_params.max_new_tokens,
                                               CLIP_MAX_NEW_TOKENS)
        adapter = req.lora_id
        if adapter is not None and not self.cache.pool.is_resident(adapter):
            need += self._adapter_token_cost(adapter)
        return need

    def apply_squashes(self, batch: Any) -> None:
        """At SGLang's retraction point (before ``update_running_batch``): take the planned
        bypass requests out of the running batch, free their KV and requeue them. A plan whose
        head is no longer waiting (admitted or gone meanwhile) is dropped."""
        pending, self._squash_pending = self._squash_pending, {}
        if not pending or batch is None or batch.is_empty():
            return
        squash = [i for i, req in enumerate(batch.reqs)
                  if req.rid in pending and not req.finished()
                  and pending[req.rid][1] in self._waiting]
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
        return self._snapshot()

    def integrity_problems(self) -> List[str]:
        """The policy's bookkeeping problems (see ``chameleon_sglang.integrity``)."""
        self._settle_running()
        queue = self.policy.queue
        problems = queue.integrity_problems()
        for rid in sorted(self._running):
            if rid not in queue or not queue.get(rid).is_running:
                problems.append(f"request {rid!r} tracked as running but not running")
        return problems

    def _snapshot(self) -> Dict[str, Any]:
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

    # -- internals -----------------------------------------------------------------------------
    def _add(self, req: Any) -> RequestEntry:
        adapter = req.lora_id
        return self.policy.on_arrival(
            req.rid,
            adapter_id=adapter,
            input_len=len(req.origin_input_ids),
            max_new_tokens=int(req.sampling_params.max_new_tokens or 1),
            now=self._now,
            rank=self._rank(adapter) if adapter is not None else None,
            adapter_tokens=self._adapter_token_cost(adapter),
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

    def _bypass_hooks(self, running_batch: Any, adder: Any) -> BypassHooks:
        """Stock LoRA pool: an adapter is 'resident' when it already runs in the batch; the head's
        adapter gets a slot once some running adapter's requests have all finished. With the
        adapter cache: resident means cached; memory for the head frees when the first running
        request finishes. Computed only if a pass meets an adapter misfit."""
        if self.cache is not None:
            view = _CachedAdapters(running_batch, self._running, self.cache.pool)
            return BypassHooks(is_adapter_resident=view.is_resident,
                               predicted_free_at=view.frees_in)
        view = _RunningAdapters(running_batch, self._running, adder)
        return BypassHooks(
            is_adapter_resident=view.is_resident,
            predicted_free_at=view.frees_in,
            predicted_finish_at=view.holds_slot_until,
        )

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

    def _settle(self, state: "_PassState") -> AdmitResult:
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

    def _settle_early_end(self, steps: Generator, state: "_PassState") -> Optional[PassResult]:
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

    def _rank(self, adapter: str) -> int:
        configs = getattr(self.lora_manager, "configs", {}) if self.lora_manager else {}
        config = configs.get(adapter)
        return int(config.r) if config is not None else self.limits.max_rank

    def _max_rank(self, ranks: List[int]) -> int:
        """The WRS rank normaliser: ``--max-lora-rank``, else what SGLang inferred from the
        adapters it loaded (its LoRA manager's ``max_lora_rank``), never below a loaded rank."""
        candidates = [getattr(self.scheduler.server_args, "max_lora_rank", None),
                      getattr(self.lora_manager, "max_lora_rank", None), *ranks]
        return max([int(c) for c in candidates if c] or [1])

    def _loaded_ranks(self) -> List[int]:
        configs = getattr(self.lora_manager, "configs", {}) if self.lora_manager else {}
        return sorted(int(c.r) for c in configs.values())

    def _adapter_token_cost(self, adapter: Optional[str]) -> int:
        """Adapter memory in KV tokens (its bytes over the KV bytes of one token, rounded up),
        charged only where adapters live in the KV memory the quotas divide. With SGLang's own
        LoRA pool they live in separate slots, so a charge would only shrink the quotas."""
        if adapter is None or self.lora_manager is None or not self.adapters_in_kv_memory:
            return 0
        if adapter not in self._adapter_tokens:
            if self.cache is not None and adapter in getattr(self.lora_manager, "loras", {}):
                pool = self.cache.pool
                self._adapter_tokens[adapter] = -(-pool.footprint_bytes(adapter)
                                                  // pool.store.bytes_per_slot)
            else:
                lora = getattr(self.lora_manager, "loras", {}).get(adapter)
                num_bytes = _adapter_bytes(lora) if lora is not None else 0
                self._adapter_tokens[adapter] = -(-num_bytes // max(self.kv_bytes_per_token, 1))
        return self._adapter_tokens[adapter]


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


class _RunningAdapters:
    """Adapters of the running batch and when the first of them frees its slot (in decode
    steps, from the predicted outputs), built on first use."""

    def __init__(
        self, running_batch: Any, running: Dict[str, Tuple[Any, RequestEntry]], adder: Any
    ) -> None:
        self._batch = running_batch
        self._running = running
        self._adder = adder
        self._remaining: Optional[Dict[Optional[str], float]] = None

    def _steps_left(self) -> Dict[Optional[str], float]:
        if self._remaining is None:
            remaining: Dict[Optional[str], float] = {}
            for req in self._batch.reqs:
                tracked = self._running.get(req.rid)
                if tracked is not None:
                    left = float(max(tracked[1].charged_output - len(req.output_ids), 0))
                    remaining[req.lora_id] = max(remaining.get(req.lora_id, 0.0), left)
            self._remaining = remaining
        return self._remaining

    def is_resident(self, adapter: Optional[str]) -> bool:
        """In the running batch, or admitted earlier in this pass."""
        return adapter in self._steps_left() or any(
            req.lora_id == adapter for req in self._adder.can_run_list
        )

    def frees_in(self, entry: RequestEntry) -> float:
        """Steps until the first running adapter's slot frees: what a blocked head waits for."""
        steps = self._steps_left()
        return min(steps.values()) if steps else 0.0

    def holds_slot_until(self, entry: RequestEntry) -> float:
        """When admitting ``entry`` would stop holding a slot the head could get: ``-inf`` when
        it cannot delay the head (its adapter is not the first to free, or already runs at least
        as long, or was admitted earlier in this pass); else its predicted output."""
        steps = self._steps_left()
        own = steps.get(entry.adapter_id)
        if own is None or own > min(steps.values()) or entry.predicted_output <= own:
            return float("-inf")
        return float(entry.predicted_output)


class _CachedAdapters:
    """Bypass estimates with the adapter cache: cached adapters are resident; memory for a
    blocked head frees when the first running request finishes (in predicted decode steps)."""

    def __init__(self, running_batch: Any, running: Dict[str, Tuple[Any, RequestEntry]],
                 pool: Any) -> None:
        self._batch = running_batch
        self._running = running
        self._pool = pool

    def is_resident(self, adapter: Optional[str]) -> bool:
        return self._pool.is_resident(adapter)

    def frees_in(self, entry: RequestEntry) -> float:
        left = [max(tracked[1].charged_output - len(req.output_ids), 0)
                for req in self._batch.reqs
                if (tracked := self._running.get(req.rid)) is not None]
        return float(min(left)) if left else 0.0


def _metrics_if_enabled(scheduler: Any) -> Any:
    """Prometheus gauges when SGLang runs with ``--enable-metrics`` (on the rank that exports)."""
    from chameleon_sglang.metrics import SchedulerMetrics, metrics_labels

    labels = metrics_labels(scheduler)
    return None if labels is None else SchedulerMetrics(labels)


def _lora_manager(scheduler: Any) -> Any:
    try:
        return scheduler.tp_worker.model_runner.lora_manager
    except AttributeError:
        return None


def _adapter_bytes(lora: Any) -> int:
    total = 0
    for layer in getattr(lora, "layers", []):
        for tensor in getattr(layer, "weights", {}).values():
            total += tensor.numel() * tensor.element_size()
    return total


def _kv_bytes_per_token(scheduler: Any) -> int:
    """K and V bytes one token occupies across all layers of this rank."""
    try:
        pool = scheduler.tp_worker.model_runner.token_to_kv_pool
        k_bytes, v_bytes = pool.get_kv_size_bytes()
        return max(int((k_bytes + v_bytes) // (pool.size + pool.page_size)), 1)
    except (AttributeError, TypeError, ValueError):
        return 1


def _kv_tokens_held(req: Any) -> int:
    """KV tokens a running request holds: its prompt and the output so far."""
    return len(req.origin_input_ids) + len(req.output_ids)
