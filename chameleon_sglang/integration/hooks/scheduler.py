"""Hooks on SGLang's ``Scheduler``: install the Chameleon components, feed them SGLang's events.

Every handler finds the scheduler's :class:`~chameleon_sglang.integration.state.ChameleonState`
and calls the bridge that serves the event; a scheduler without Chameleon state is left to
SGLang (the handler returns at once). The data-parallel reports ride on the same events in
:mod:`chameleon_sglang.integration.hooks.dp`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

from chameleon_sglang.clock import SchedulerClock
from chameleon_sglang.integration import capability, integrity
from chameleon_sglang.integration.cache_bridge import chameleon_pool_of, install_cache
from chameleon_sglang.integration.metrics import CacheMetrics, MetricsPublisher, SchedulerMetrics
from chameleon_sglang.integration.scheduler_bridge import SchedulerBridge
from chameleon_sglang.integration.state import ChameleonState, state_for, state_of
from chameleon_sglang.integration.tp_broadcast import tensor_parallel_broadcast
from chameleon_sglang.status import (
    ComponentStatus,
    cache_status,
    scheduler_status,
    status_line,
    status_report,
)

logger = logging.getLogger(__name__)


# -- installation ------------------------------------------------------------------------------
def bind_pool_to_kv_buffers(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``init_memory_pools``, before CUDA graphs are captured: the Chameleon LoRA pool
    reads and writes adapters in the KV buffers (its device table and base buffers must exist
    when the decode graphs are captured)."""
    pool = chameleon_pool_of(scheduler)
    if pool is not None:
        pool.bind_kv_buffers(scheduler.tp_worker.model_runner.token_to_kv_pool)
    return result


def install_scheduler(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``init_schedule_policy``: install the adapter cache and the Chameleon policy where
    they can serve (priority preemption off under the policy); log which components are on."""
    state = state_for(scheduler)
    config = state.config
    reason = _scheduler_unsupported_reason(scheduler)
    clock = SchedulerClock(tensor_parallel_broadcast()) if config.enabled else None
    policy_on = config.enabled and config.scheduler != "off" and reason is None
    if chameleon_pool_of(scheduler) is not None:
        state.cache = install_cache(
            scheduler,
            clock,
            config.prefetch,
            owns_clock=not policy_on,
            predictive=config.prefetch_policy == "predictive",
        )
        state.cache_metrics = MetricsPublisher(scheduler, CacheMetrics)
    if policy_on:
        scheduler.enable_priority_preemption = False
        state.bridge = SchedulerBridge(scheduler, config, clock)
        if state.cache is not None:
            state.bridge.use_adapter_cache(state.cache)
        state.scheduler_metrics = MetricsPublisher(scheduler, SchedulerMetrics)
    state.statuses = _statuses(scheduler, state, reason)
    if config.enabled:
        logger.info(status_line(config, state.statuses))
    return result


def _scheduler_unsupported_reason(scheduler: Any) -> Optional[str]:
    """Why the Chameleon scheduler cannot run in this SGLang configuration, if it cannot."""
    reason = capability.parallelism_unsupported_reason(scheduler.server_args)
    return None if reason is None else f"{reason}: SGLang's scheduling in use"


def _statuses(
    scheduler: Any, state: ChameleonState, reason: Optional[str]
) -> List[ComponentStatus]:
    installed = None if state.bridge is not None else (reason or "not installed")
    cache_reason = (
        None
        if state.cache is not None
        else (
            capability.runner_decision().reason
            or capability.flags_unsupported_reason(capability.resolved(scheduler.server_args))
            or "not installed"
        )
    )
    return [scheduler_status(state.config, installed), cache_status(state.config, cache_reason)]


# -- requests ----------------------------------------------------------------------------------
def refuse_request_beyond_memory(scheduler: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    """Before ``_add_request_to_queue``: with the adapter cache, a request whose prompt and
    adapter together exceed the KV pool could never run; it finishes at once with an error (as
    SGLang treats over-long prompts)."""
    state = state_of(scheduler)
    if state is not None and state.cache is not None and not req.finished():
        error = state.cache.capacity_error(req)
        if error is not None:
            req.set_finish_with_abort(error)
    return None


def on_request_enqueued(
    result: Any, scheduler: Any, req: Any, is_retracted: bool = False, *args: Any, **kwargs: Any
) -> Any:
    """After ``_add_request_to_queue``: an arrival (or a retraction) for cache and policy."""
    state = state_of(scheduler)
    if state is None:
        return result
    if state.cache is not None:
        if is_retracted:
            state.cache.on_retracted(req)
        else:
            state.cache.on_arrival(req)
    if state.bridge is not None:
        state.bridge.on_enqueue(req, is_retracted)
    return result


def on_request_aborted(result: Any, scheduler: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``_release_aborted_request``: a waiting request left."""
    state = state_of(scheduler)
    if state is not None:
        for component in (state.cache, state.bridge):
            if component is not None:
                component.on_waiting_abort(req)
    return result


def on_can_schedule_lora_req(
    original: Callable, scheduler: Any, req: Any, *args: Any, **kwargs: Any
) -> bool:
    """With the adapter cache, 'can this adapter be made resident' replaces SGLang's per-batch
    adapter limit (SGLang's LoRA drainer, when configured, still has its say first)."""
    state = state_of(scheduler)
    if state is None or state.cache is None:
        allowed = original(scheduler, req, *args, **kwargs)
    else:
        drainer = getattr(scheduler, "lora_drainer", None)
        allowed = (drainer is None or drainer.can_schedule(req)) and state.cache.can_schedule(req)
    if not allowed and state is not None and state.bridge is not None:
        state.bridge.on_lora_veto(req)
    return allowed


# -- passes and batches ------------------------------------------------------------------------
def on_prefill_pass_end(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After a prefill pass (its KV allocated): settle adapter references, prefetch."""
    state = state_of(scheduler)
    if state is not None and state.cache is not None:
        state.cache.end_pass()
        state.cache_metrics.maybe_publish(state.cache.clock.last, state.cache.stats)
    return result


# -- reporting ---------------------------------------------------------------------------------
def add_chameleon_init_info(
    result: Dict[str, Any], scheduler: Any, *args: Any, **kwargs: Any
) -> Dict[str, Any]:
    """After ``get_init_info``: the component status in the scheduler's handshake (merged into
    ``/server_info``)."""
    state = state_for(scheduler)
    statuses = state.statuses or _statuses(scheduler, state, None)
    result["chameleon_status"] = status_report(state.config, statuses)
    return result


def add_chameleon_internal_state(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``get_internal_state``: live Chameleon statistics (``/server_info``,
    ``/chameleon/stats``), and the invariant checker's findings where it is on."""
    internal = getattr(result, "internal_state", None)
    state = state_of(scheduler)
    if not isinstance(internal, dict) or state is None:
        return result
    internal["chameleon"] = {
        "scheduler": state.bridge.stats() if state.bridge is not None else None,
        "adapter_cache": state.cache.stats() if state.cache is not None else None,
        "dp": state.reporter.stats() if state.reporter is not None else None,
        "adapter_reads": state.reads.stats() if state.reads is not None else None,
    }
    if integrity.enabled():
        internal["chameleon"]["integrity"] = integrity.check_integrity(scheduler)
    return result
