"""The adapter cache inside SGLang's scheduler: admission, references, prefetch, pressure.

Under ``--chameleon`` (cache on) :class:`CacheBridge` replaces SGLang's per-batch adapter limit:

- ``can_schedule_lora_req`` (AROUND hook) asks the cache instead of counting slots: a request is
  schedulable when its adapter is resident or can be made resident now (loading it into free KV
  memory, evicting idle adapters). The adapter is then referenced for the request, so KV
  allocation for this very batch cannot evict it. A refused adapter is not asked about again
  until the cache changed or more KV memory is free or evictable;
- after each prefill pass (AFTER ``_get_new_batch_prefill_raw``) references of requests that were
  not admitted are dropped again, and missing adapters of queued requests are prefetched into
  free memory (never evicting a queued request's adapter); with the predictive policy, then
  adapters an arrival-gap histogram says are due (:mod:`chameleon_sglang.cache.
  arrival_histogram`), into free memory only (evicting nothing);
- references end when a request finishes (checked after each batch result) or is retracted;
- the KV allocator counts idle adapters as available and evicts them before an allocation would
  fail (:mod:`chameleon_sglang.integration.kv_allocator`), so SGLang admits, retracts and fails
  exactly as if their memory were free.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from chameleon_sglang.cache.arrival_histogram import ArrivalHistogram
from chameleon_sglang.clock import SchedulerClock
from chameleon_sglang.integration.kv_allocator import make_cache_aware
from chameleon_sglang.memory.kv_store import free_slot_count

logger = logging.getLogger(__name__)

# Queued requests looked at for prefetch after each pass, and adapters loaded at most per pass
# (a load is a synchronous copy on CPU; a few per pass bound the delay it adds).
PREFETCH_LOOKAHEAD = 32
PREFETCH_PER_PASS = 2
# Predictive prefetch: an adapter is loaded this long before the head of its predicted window
PREDICTIVE_LEAD_S = 1.0


class CacheBridge:
    """Connects one SGLang scheduler to the adapter cache in its LoRA pool."""

    def __init__(
        self,
        scheduler: Any,
        pool: Any,
        clock: SchedulerClock,
        prefetch: bool,
        owns_clock: bool,
        predictive: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.pool = pool
        self.clock = clock
        # Without the Chameleon scheduler (which reads the clock at the start of each pass),
        # the cache reads it once after each pass; every rank does so at the same point.
        self.owns_clock = owns_clock
        self.prefetch = prefetch
        self.arrivals: Optional[ArrivalHistogram] = ArrivalHistogram() if predictive else None
        self.num_predictive_loads = 0
        self.cache = pool.cache
        self._holds: Dict[str, Tuple[Any, str]] = {}  # rid -> (Req, adapter) admitted, running
        self._pins: Dict[str, Tuple[Any, str]] = {}  # rid -> (Req, adapter) this pass only
        self._looked_up: Set[str] = set()  # rids whose hit/miss was counted
        self.num_refused = 0
        # adapter -> (cache version, room) at its last refusal: not asked again until either
        # changes for the better (no refusal loop while nothing it needs has changed)
        self._refusals: Dict[str, Tuple[int, int]] = {}
        self.num_refusals_repeated = 0
        self.num_prefix_evictions_for_runs = 0
        self.num_refused_for_pass_budget = 0
        self._adder: Any = None  # SGLang's PrefillAdder of the pass under way
        make_cache_aware(scheduler.token_to_kv_pool_allocator, self)

    # -- the allocator's questions (BorrowedSlots) -----------------------------------------
    def reclaimable_slots(self) -> int:
        return self.cache.reclaimable_slots()

    def free_slots_for(self, num_slots: int) -> None:
        self.cache.shrink_to_free(num_slots, self.clock.last, self._queued_adapters())

    def held_slots(self) -> List[int]:
        return [
            slot
            for name in self.cache.resident_ids()
            for slot in self.cache.lookup(name).handle.slots()
        ]

    # -- admission ------------------------------------------------------------------------
    def begin_pass(self, adder: Any) -> None:
        """A prefill pass starts; ``adder`` is SGLang's budget for it."""
        self._adder = adder

    def _fits_pass_budget(self, adapter: str) -> bool:
        """SGLang's pass budget counts idle adapters' slots as available, and the prompts of the
        requests it admits are allocated only at the pass's end. Two things during a pass take
        slots out of "available": loading an adapter (its slots) and acquiring a resident idle
        one (its slots are no longer reclaimable). Either must fit what the budget has left,
        total and current, or requests admitted earlier in the pass would find their promised
        slots gone. Acquiring an adapter already in use changes nothing."""
        if self._adder is None:
            return True
        entry = self.cache.lookup(adapter)
        if entry is not None:
            if not entry.is_idle:
                return True
            need = entry.num_slots
        else:
            need = self.pool.footprint_slots(adapter)
        left = min(
            int(self._adder.rem_total_tokens),
            int(getattr(self._adder, "cur_rem_tokens", self._adder.rem_total_tokens)),
        )
        return need <= left

    def can_schedule(self, req: Any) -> bool:
        """May ``req`` join the batch as far as its adapter goes? References it if so."""
        adapter = req.lora_id
        if adapter is None or req.rid in self._holds or req.rid in self._pins:
            return True
        now = self.clock.last
        first = req.rid not in self._looked_up
        queued: Iterable[str] = ()
        if self.cache.is_resident(adapter) and not self._fits_pass_budget(adapter):
            self.num_refused_for_pass_budget += 1  # idle: acquiring it would take its slots
            return False
        if not self.cache.is_resident(adapter):
            refused = self._refusals.get(adapter)
            if (
                refused is not None
                and refused[0] == self.cache.version
                and self._room() <= refused[1]
            ):
                self.num_refusals_repeated += 1
                return False
            if not self._fits_pass_budget(adapter):
                self.num_refused_for_pass_budget += 1
                return False
            queued = self._queued_adapters()
            self._evict_prefix_cache_for(adapter)
        # Enough memory in total but no run of it: SGLang's prefix cache may be what splits it
        # (with nothing running, nothing else can). Its tokens give way, then one retry.
        placed = self.pool.make_resident(adapter, now, queued, count_lookup=first) or (
            self._evict_prefix_cache()
            and self.pool.make_resident(adapter, now, queued, count_lookup=False)
        )
        if not placed:
            self.num_refused += 1
            self._refusals[adapter] = (self.cache.version, self._room())
            return False
        self._refusals.pop(adapter, None)
        self._looked_up.add(req.rid)
        self.cache.acquire(adapter, now)
        self._pins[req.rid] = (req, adapter)
        return True

    def end_pass(self) -> None:
        """After a prefill pass: keep references of admitted requests, drop the others',
        then prefetch adapters of queued requests."""
        self._adder = None
        if self.owns_clock:
            self.clock.now()
        if self._pins:
            waiting = {id(req) for req in self.scheduler.waiting_queue}
            now = self.clock.last
            for rid, (req, adapter) in self._pins.items():
                if id(req) in waiting:
                    self.cache.release(adapter, now)
                else:
                    self._holds[rid] = (req, adapter)
                    self._looked_up.discard(rid)
            self._pins.clear()
        if self.prefetch:
            self._prefetch()

    def settle_finished(self) -> None:
        """Release the adapters of requests that finished (or were aborted while running)."""
        holds = self._holds
        if not holds:
            return
        done = [rid for rid, (req, _) in holds.items() if req.finished()]
        if done:
            now = self.clock.last
            for rid in done:
                _, adapter = holds.pop(rid)
                self.cache.release(adapter, now)

    def on_retracted(self, req: Any) -> None:
        """A running request went back to the waiting queue: it no longer holds its adapter."""
        held = self._holds.pop(req.rid, None)
        if held is not None:
            self.cache.release(held[1], self.clock.last)

    def on_waiting_abort(self, req: Any) -> None:
        self._looked_up.discard(req.rid)

    def capacity_error(self, req: Any) -> Optional[str]:
        """Why ``req`` can never run (its prompt and its adapter exceed the KV pool), or None."""
        adapter = req.lora_id
        if adapter is None or adapter not in self.pool.manager.loras:
            return None
        adapter_slots = self.pool.footprint_bytes(adapter) // self.pool.store.bytes_per_slot
        total = int(self.scheduler.max_total_num_tokens)
        need = len(req.origin_input_ids) + 1 + adapter_slots
        if need <= total:
            return None
        ref = self.pool.manager.lora_refs.get(adapter)
        name = getattr(ref, "lora_name", adapter)
        return (
            f"The prompt ({len(req.origin_input_ids)} tokens) and adapter {name!r} "
            f"({adapter_slots} KV slots in the adapter cache) need {need} KV token slots; "
            f"the KV cache has {total}. Use a shorter prompt or a larger KV cache."
        )

    # -- internals -----------------------------------------------------------------------
    def _evict_prefix_cache_for(self, adapter: str) -> None:
        """A missing adapter of a request being scheduled takes memory from SGLang's prefix
        (radix) cache before idle adapters are evicted: an evicted prefix costs a prefill later,
        an evicted adapter a reload now and again at its next request."""
        if adapter not in self.pool.manager.loras:
            return
        need = self.pool.footprint_bytes(adapter) // self.pool.store.bytes_per_slot
        deficit = need - free_slot_count(self.scheduler.token_to_kv_pool_allocator)
        tree = self.scheduler.tree_cache
        if deficit > 0 and tree is not None and tree.evictable_size() > 0:
            from sglang.srt.mem_cache.base_prefix_cache import EvictParams

            tree.evict(EvictParams(num_tokens=deficit))

    def _evict_prefix_cache(self) -> bool:
        """Evict SGLang's whole evictable prefix cache; False when it held nothing."""
        tree = self.scheduler.tree_cache
        if tree is None or tree.evictable_size() <= 0:
            return False
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        tree.evict(EvictParams(num_tokens=int(tree.evictable_size())))
        self.num_prefix_evictions_for_runs += 1
        return True

    def _room(self) -> int:
        """KV slots free now or held by SGLang's evictable prefix cache."""
        tree = self.scheduler.tree_cache
        evictable = int(tree.evictable_size()) if tree is not None else 0
        return free_slot_count(self.scheduler.token_to_kv_pool_allocator) + evictable

    def _queued_adapters(self) -> Set[str]:
        return {req.lora_id for req in self.scheduler.waiting_queue if req.lora_id is not None}

    @property
    def prefetch_policy(self) -> str:
        """``off``, ``queue`` or ``predictive``."""
        if not self.prefetch:
            return "off"
        return "predictive" if self.arrivals is not None else "queue"

    def on_arrival(self, req: Any) -> None:
        """A new request was queued: one arrival of its adapter for the predictive policy."""
        if self.arrivals is not None and req.lora_id is not None:
            self.arrivals.observe(req.lora_id, self.clock.last)

    def _prefetch(self) -> None:
        loads = self._prefetch_queued()
        if self.arrivals is not None and loads < PREFETCH_PER_PASS:
            self._prefetch_predicted(PREFETCH_PER_PASS - loads)

    def _prefetch_queued(self) -> int:
        queue = self.scheduler.waiting_queue
        if not queue:
            return 0
        head = [req.lora_id for req in queue[:PREFETCH_LOOKAHEAD]]
        missing = self.cache.prefetch_candidates(head)
        if not missing:
            return 0
        queued = self._queued_adapters()
        now = self.clock.last
        loads = 0
        for adapter in missing[:PREFETCH_PER_PASS]:
            loads += self.pool.make_resident(adapter, now, queued, prefetch=True)
        return loads

    def _prefetch_predicted(self, budget: int) -> None:
        """Adapters predicted due, into free memory only: every resident adapter is passed as
        queued, so the prefetch (which may evict only unqueued idle ones) evicts nothing."""
        assert self.arrivals is not None
        now = self.clock.last
        resident = self.cache.resident_ids()
        keep = frozenset(resident)
        for adapter in self.arrivals.due(now, PREDICTIVE_LEAD_S, skip=resident):
            if budget <= 0:
                return
            if adapter not in self.pool.manager.loras:
                self.arrivals.forget(adapter)
                continue
            if self.pool.make_resident(adapter, now, keep, prefetch=True):
                self.num_predictive_loads += 1
                budget -= 1

    def stats(self) -> Dict[str, Any]:
        self.settle_finished()
        stats = self.pool.stats()
        backend = getattr(self.pool.manager, "lora_backend", None)
        if backend is not None and hasattr(backend, "batch_stats"):
            stats.update(backend.batch_stats())
        allocator = self.scheduler.token_to_kv_pool_allocator
        total = int(self.scheduler.max_total_num_tokens)
        free = free_slot_count(allocator)
        held = int(stats.get("resident_slots", 0))
        per_slot = self.pool.store.bytes_per_slot
        stats.update(
            num_refused_requests=self.num_refused,
            num_refusals_repeated=self.num_refusals_repeated,
            num_prefix_evictions_for_runs=self.num_prefix_evictions_for_runs,
            num_refused_for_pass_budget=self.num_refused_for_pass_budget,
            prefetch_policy=self.prefetch_policy,
            num_predictive_loads=self.num_predictive_loads,
            num_holding_requests=len(self._holds),
            kv_free_slots=free,
            kv_total_slots=total,
            memory={
                "kv_bytes": (total - free - held) * per_slot,
                "adapter_cache_bytes": held * per_slot,
                "free_bytes": free * per_slot,
            },
        )
        return stats


def chameleon_pool_of(scheduler: Any) -> Any:
    """The scheduler's LoRA pool if it is the Chameleon adapter cache, else None."""
    from chameleon_sglang.integration.lora_pool import ChameleonLoRAPool

    try:
        pool = scheduler.tp_worker.model_runner.lora_manager.memory_pool
    except AttributeError:
        return None
    return pool if isinstance(pool, ChameleonLoRAPool) else None


def install_cache(
    scheduler: Any,
    clock: SchedulerClock,
    prefetch: bool,
    owns_clock: bool,
    predictive: bool = False,
) -> CacheBridge:
    """Bind the Chameleon LoRA pool to the scheduler's KV cache; the bridge that serves it."""
    pool = chameleon_pool_of(scheduler)
    if pool is None:
        raise RuntimeError("--chameleon's adapter cache needs the chameleon LoRA pool")
    model_runner = scheduler.tp_worker.model_runner
    pool.bind_kv_cache(scheduler.token_to_kv_pool_allocator, model_runner.token_to_kv_pool)
    return CacheBridge(scheduler, pool, clock, prefetch, owns_clock, predictive)
