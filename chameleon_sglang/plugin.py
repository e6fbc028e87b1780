"""SGLang plugin entry point (``sglang.srt.plugins``): everything SGLang's hooks can reach.

SGLang calls :func:`register` once in every process (launcher, scheduler, detokenizer) before
it parses arguments or builds the scheduler. Every hook here is inert without ``--chameleon``,
except the CPU defaults, which only act on a machine where SGLang's CPU engine is selected.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

from chameleon_sglang.components import (
    ComponentStatus,
    cache_status,
    scheduler_status,
    status_line,
    status_report,
)
from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.dp import sglang_hooks as dp_hooks
from chameleon_sglang.request_checks import TOKENIZER_MANAGER_CLASS, refuse_token_ids_outside_vocab

logger = logging.getLogger(__name__)

SCHEDULER_CLASS = "sglang.srt.managers.scheduler.Scheduler"
MODEL_RUNNER_CLASS = "sglang.srt.model_executor.model_runner.ModelRunner"
KV_CONFIGURATOR_CLASS = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
LORA_MANAGER_CLASS = "sglang.srt.lora.lora_manager.LoRAManager"
LORA_POOL_CLASS = "sglang.srt.lora.mem_pool.LoRAMemoryPool"
BOOTSTRAP_MODULE = "sglang.srt.distributed.bootstrap"
CHAMELEON_LORA_BACKEND = "chameleon"
_registered = False


RESOLUTION_HOOKS: List[Tuple[str, str]] = [
    ("handle_cuda_graph_config", "cuda_graph_safety"),
    ("handle_cpu_backends", "cpu_backend_defaults"),
    ("handle_other_validations", "validate_chameleon_args"),
]
"""(SGLang resolution step, our function in this module), registered in this order."""


def method_hooks() -> List[Tuple[str, Callable[..., Any], str]]:
    """Every ``HookRegistry`` registration: ``(qualified target, hook, kind)``. The seams we rely
    on in SGLang; ``tests/patches/test_seams.py`` pins each target's signature at the pin."""
    from sglang.srt.plugins.hook_registry import HookType

    scheduler = [
        ("init_schedule_policy", install_scheduler, HookType.AFTER),
        ("_add_request_to_queue", refuse_request_beyond_memory, HookType.BEFORE),
        ("_add_request_to_queue", on_request_enqueued, HookType.AFTER),
        ("_release_aborted_request", on_request_aborted, HookType.AFTER),
        ("can_schedule_lora_req", on_can_schedule_lora_req, HookType.AROUND),
        ("get_init_info", add_chameleon_init_info, HookType.AFTER),
        ("get_internal_state", add_chameleon_internal_state, HookType.AFTER),
        ("_get_new_batch_prefill_raw", on_prefill_pass_end, HookType.AFTER),
        ("process_batch_result", on_batch_result, HookType.AFTER),
        ("update_running_batch", squash_before_decode, HookType.BEFORE),
        ("init_memory_pools", bind_pool_to_kv_buffers, HookType.AFTER),
        ("init_ipc_channels", dp_hooks.remember_ipc_name, HookType.AFTER),
        ("on_idle", dp_hooks.report_when_idle, HookType.AFTER),
        ("handle_generate_request", dp_hooks.count_received, HookType.BEFORE),
        ("handle_embedding_request", dp_hooks.count_received, HookType.BEFORE),
    ]
    controller = [
        (f"{dp_hooks.LOAD_BALANCE_METHOD_CLASS}.from_str", dp_hooks.load_balance_method_from_str,
         HookType.AROUND),
        (f"{dp_hooks.DP_CONTROLLER_CLASS}.init_dispatcher", dp_hooks.install_dispatch,
         HookType.AFTER),
        (f"{dp_hooks.DP_CONTROLLER_CLASS}.event_loop", dp_hooks.controller_event_loop,
         HookType.AROUND),
    ]
    return [(f"{SCHEDULER_CLASS}.{method}", hook, kind) for method, hook, kind in scheduler] + [
        (f"{MODEL_RUNNER_CLASS}.init_lora_manager", decide_adapter_cache, HookType.AROUND),
        (f"{KV_CONFIGURATOR_CLASS}._build_token_to_kv_pool_allocator",
         build_cache_aware_allocator, HookType.AROUND),
        (f"{LORA_MANAGER_CLASS}.init_memory_pool", init_lora_pool, HookType.AROUND),
        (f"{LORA_MANAGER_CLASS}.validate_new_adapter", refuse_uncacheable_adapter,
         HookType.AFTER),
        (f"{LORA_POOL_CLASS}.load_lora_weight_to_buffer", load_into_slot_with_host_link,
         HookType.AROUND),
        (f"{TOKENIZER_MANAGER_CLASS}._validate_one_request", refuse_token_ids_outside_vocab,
         HookType.BEFORE),
        ("sglang.srt.entrypoints.http_server.launch_server", add_http_routes, HookType.BEFORE),
        (f"{BOOTSTRAP_MODULE}._init_cpu_threads_env", bind_cpu_rank_threads, HookType.AROUND),
    ] + controller


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.plugins.hook_registry import HookRegistry

    for step, name in RESOLUTION_HOOKS:
        register_resolution_hook(step)(globals()[name])
    for target, hook, kind in method_hooks():
        HookRegistry.register(target, hook, kind)
    register_lora_backend()


# -- server arguments --------------------------------------------------------------------------
# SGLang's default LoRA backend; it launches Triton kernels and so needs a GPU.
GPU_ONLY_LORA_DEFAULT = "csgmv"


def cpu_backend_defaults(server_args: Any, previous: Callable[[Any], None]) -> None:
    """On ``--device cpu``, pick backends that run without SGLang's CPU kernels.

    - attention: ``torch_native`` when the user chose none and ``sgl_kernel``'s CPU ops are
      missing (SGLang would pick ``intel_amx``, which needs them);
    - LoRA: ``torch_native`` in place of the default ``csgmv`` (Triton, GPU only). An explicitly
      chosen ``triton``/``triton_v2`` is left alone and fails as SGLang makes it fail.
    """
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    from chameleon_sglang.platform import sgl_kernel_cpu_ops_available

    cfg = resolving_view(server_args)
    picks: Dict[str, str] = {}
    if cfg.device == "cpu":
        if cfg.attention_backend is None and not sgl_kernel_cpu_ops_available():
            picks["attention_backend"] = "torch_native"
        if cfg.lora_backend == GPU_ONLY_LORA_DEFAULT:
            picks["lora_backend"] = "torch_native"
        if picks:
            logger.info("CPU engine without SGLang's CPU kernels: using %s", picks)
        _default_cpu_threads_binding(cfg)
    if adapter_cache_unsupported_reason(cfg) is None:
        picks["lora_backend"] = CHAMELEON_LORA_BACKEND
        logger.info("Chameleon adapter cache: LoRA backend %r", CHAMELEON_LORA_BACKEND)
    if picks:
        declare_resolution(server_args, "chameleon_sglang.cpu_backend_defaults", **picks)
    previous(server_args)


def _default_cpu_threads_binding(cfg: Any) -> None:
    from sglang.srt.utils.common import get_cpu_ids_by_node

    from chameleon_sglang.platform import default_cpu_threads_binding

    ranks = 1
    for name in ("dp_size", "tp_size", "pp_size"):
        ranks *= int(getattr(cfg, name, 1) or 1)
    if ranks > 1:
        default_cpu_threads_binding(ranks, len(get_cpu_ids_by_node()))


def bind_cpu_rank_threads(original: Callable, *args: Any, local_omp_cpuid: Any = None,
                          **kwargs: Any) -> Any:
    """SGLang's CPU rank set-up: it binds each rank's OpenMP threads to the rank's cores only
    with ``sgl_kernel``'s CPU ops (AMX or arm64) and otherwise leaves every rank with a thread
    per core of the machine, so ``--dp-size``/``--tp-size`` ranks oversubscribe the cores
    (measured: 2 replicas on 2 cores ran 10x slower than one). Where SGLang cannot bind, this
    process is pinned to the rank's cores and torch's pool sized to them (logged)."""
    import sys

    bootstrap = sys.modules[BOOTSTRAP_MODULE]
    if getattr(bootstrap, "_is_cpu_amx_available", False) or \
            getattr(bootstrap, "_is_cpu_arm64", False) or not local_omp_cpuid \
            or _cpu_ranks() <= 1:  # one rank: nothing to oversubscribe, SGLang's threads stay
        return original(*args, local_omp_cpuid=local_omp_cpuid, **kwargs)
    from chameleon_sglang.platform import bind_rank_threads

    cores = bind_rank_threads(local_omp_cpuid)
    logger.info("CPU engine without SGLang's CPU kernels: this rank runs on cores %s with %d "
                "torch threads", cores, len(cores))
    return None


def _cpu_ranks() -> int:
    """Processes SGLang's CPU engine runs as ranks (replicas x TP x PP)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        p = get_parallel()
        return int(p.dp_size or 1) * int(p.tp_size or 1) * int(p.pp_size or 1)
    except Exception:  # noqa: BLE001 - no runtime context: treat as one rank
        return 1


def cuda_graph_safety(server_args: Any, previous: Callable[[Any], None]) -> None:
    """With the adapter cache on a CUDA device, the ``chameleon`` LoRA backend captures decode
    graphs through its device location table, which needs Triton; without Triton it runs the
    host path, which cannot be captured: CUDA graphs are turned off (with a log line) instead of
    failing at capture. Anything else is left to SGLang."""
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    cfg = resolving_view(server_args)
    if cfg.device in (None, "cuda") and adapter_cache_unsupported_reason(cfg) is None \
            and not cfg.disable_cuda_graph and _cuda_available():
        from chameleon_sglang.lora_pool import table_kernels_available

        if not table_kernels_available():
            logger.warning("Chameleon adapter cache: Triton is not installed, so the LoRA "
                           "kernels run on the host path, which CUDA graphs cannot capture: "
                           "CUDA graphs disabled")
            declare_resolution(server_args, "chameleon_sglang.cuda_graph_safety",
                               disable_cuda_graph=True)
    previous(server_args)


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - a broken torch install
        return False


def adapter_cache_unsupported_reason(cfg: Any) -> Optional[str]:
    """Why the flags rule the adapter cache out (None: they allow it; the loaded model still
    has its say in each model runner, :func:`decide_adapter_cache`)."""
    from chameleon_sglang.capability import flags_unsupported_reason

    return flags_unsupported_reason(cfg)


def register_lora_backend() -> None:
    """Add the ``chameleon`` LoRA backend to SGLang's registry (imported when first used)."""
    from sglang.srt.lora.backend.lora_registry import LORA_SUPPORTED_BACKENDS

    def create() -> Any:
        from chameleon_sglang.capability import runner_decision

        fallback = runner_decision().fallback_backend
        if fallback is not None:  # the model rules the cache out: SGLang's pool and kernels
            from sglang.srt.lora.backend.lora_registry import get_backend_from_name

            return get_backend_from_name(fallback)
        from chameleon_sglang.lora_backend import ChameleonLoRABackend

        return ChameleonLoRABackend

    LORA_SUPPORTED_BACKENDS.setdefault(CHAMELEON_LORA_BACKEND, create)


def validate_chameleon_args(server_args: Any, previous: Callable[[Any], None]) -> None:
    """Reject inconsistent ``--chameleon-*`` values before any process starts."""
    from sglang.srt.arg_groups.overrides import resolving_view

    previous(server_args)
    ChameleonConfig.from_server_args(resolving_view(server_args))
    dp_hooks.resolve_dp_method(server_args)


# -- scheduler process -------------------------------------------------------------------------
def _config(scheduler: Any) -> ChameleonConfig:
    return ChameleonConfig.from_server_args(scheduler.server_args)


def _scheduler_unsupported_reason(scheduler: Any) -> Optional[str]:
    """Why the Chameleon scheduler cannot run in this SGLang configuration, if it cannot."""
    if getattr(scheduler, "disaggregation_mode", None) is not None:
        if str(getattr(scheduler.disaggregation_mode, "value", "null")) != "null":
            return "not supported with prefill/decode disaggregation: SGLang's scheduling in use"
    if int(getattr(scheduler.server_args, "pp_size", 1) or 1) > 1:
        return "not supported with pipeline parallelism: SGLang's scheduling in use"
    if getattr(scheduler.server_args, "enable_dp_attention", False):
        return "not supported with DP attention: SGLang's scheduling in use"
    return None


def bind_pool_to_kv_buffers(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After the KV pools exist and before CUDA graphs are captured: the Chameleon LoRA pool
    reads and writes adapters in the KV buffers (its device table and base buffers must exist
    when the decode graphs are captured)."""
    from chameleon_sglang.sglang_cache import chameleon_pool_of

    pool = chameleon_pool_of(scheduler)
    if pool is not None:
        pool.bind_kv_buffers(scheduler.tp_worker.model_runner.token_to_kv_pool)
    return result


def install_scheduler(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``init_schedule_policy``: attach the Chameleon policy, turn priority preemption off."""
    from chameleon_sglang.sglang_scheduler import ATTR, SchedulerBridge

    from chameleon_sglang.clock import SchedulerClock, tensor_parallel_broadcast
    from chameleon_sglang.sglang_cache import chameleon_pool_of, install_cache

    config = _config(scheduler)
    reason = _scheduler_unsupported_reason(scheduler)
    clock = SchedulerClock(tensor_parallel_broadcast()) if config.enabled else None
    policy_on = config.enabled and config.scheduler != "off" and reason is None
    cache = None
    if chameleon_pool_of(scheduler) is not None:
        cache = install_cache(scheduler, clock, config.prefetch, owns_clock=not policy_on,
                              predictive=config.prefetch_policy == "predictive")
    if policy_on:
        scheduler.enable_priority_preemption = False
        bridge = SchedulerBridge(scheduler, config, clock)
        bridge.use_adapter_cache(cache)
        setattr(scheduler, ATTR, bridge)
    if config.enabled:
        dp_hooks.maybe_install_reporter(scheduler)
    scheduler.chameleon_statuses = _statuses(scheduler, config, reason)
    if config.enabled:
        logger.info(status_line(config, scheduler.chameleon_statuses))
    return result


def _statuses(scheduler: Any, config: ChameleonConfig,
              reason: Optional[str]) -> List[ComponentStatus]:
    from chameleon_sglang.sglang_scheduler import bridge_of

    from chameleon_sglang.sglang_cache import cache_bridge_of

    from chameleon_sglang.capability import runner_decision

    installed = None if bridge_of(scheduler) is not None else (reason or "not installed")
    cache_reason = None if cache_bridge_of(scheduler) is not None else (
        runner_decision().reason or adapter_cache_unsupported_reason(scheduler.server_args)
        or "not installed")
    return [scheduler_status(config, installed), cache_status(config, cache_reason)]


def refuse_request_beyond_memory(scheduler: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    """With the adapter cache, a request whose prompt and adapter together exceed the KV pool
    could never run: it finishes at once with an error (as SGLang treats over-long prompts)."""
    from chameleon_sglang.sglang_cache import cache_bridge_of

    cache = cache_bridge_of(scheduler)
    if cache is not None and not req.finished():
        error = cache.capacity_error(req)
        if error is not None:
            req.set_finish_with_abort(error)
    return None


def on_request_enqueued(result: Any, scheduler: Any, req: Any, is_retracted: bool = False,
                        *args: Any, **kwargs: Any) -> Any:
    from chameleon_sglang.sglang_scheduler import bridge_of

    from chameleon_sglang.sglang_cache import cache_bridge_of

    cache = cache_bridge_of(scheduler)
    if cache is not None:
        if is_retracted:
            cache.on_retracted(req)
        else:
            cache.on_arrival(req)
    bridge = bridge_of(scheduler)
    if bridge is not None:
        bridge.on_enqueue(req, is_retracted)
    if is_retracted:
        dp_hooks.report(scheduler)
    else:
        dp_hooks.report_enqueued(scheduler, req)
    return result


def on_request_aborted(result: Any, scheduler: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    from chameleon_sglang.sglang_scheduler import bridge_of

    from chameleon_sglang.sglang_cache import cache_bridge_of

    cache = cache_bridge_of(scheduler)
    if cache is not None:
        cache.on_waiting_abort(req)
    bridge = bridge_of(scheduler)
    if bridge is not None:
        bridge.on_waiting_abort(req)
    dp_hooks.report(scheduler)
    return result


def on_can_schedule_lora_req(original: Callable, scheduler: Any, req: Any, *args: Any,
                             **kwargs: Any) -> bool:
    """With the adapter cache, 'can this adapter be made resident' replaces SGLang's per-batch
    adapter limit (SGLang's LoRA drainer, when configured, still has its say first)."""
    from chameleon_sglang.sglang_cache import cache_bridge_of
    from chameleon_sglang.sglang_scheduler import bridge_of

    cache = cache_bridge_of(scheduler)
    if cache is None:
        allowed = original(scheduler, req, *args, **kwargs)
    else:
        drainer = getattr(scheduler, "lora_drainer", None)
        allowed = (drainer is None or drainer.can_schedule(req)) and cache.can_schedule(req)
    bridge = bridge_of(scheduler)
    if not allowed and bridge is not None:
        bridge.on_lora_veto(req)
    return allowed


def on_prefill_pass_end(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After a prefill pass (its KV allocated): settle adapter references, prefetch."""
    from chameleon_sglang.sglang_cache import cache_bridge_of

    cache = cache_bridge_of(scheduler)
    if cache is not None:
        cache.end_pass()
    dp_hooks.report(scheduler, batch=result)
    return result


def squash_before_decode(scheduler: Any, batch: Any = None, *args: Any, **kwargs: Any) -> None:
    """Before SGLang updates the running batch (its retraction point): squash planned bypasses."""
    from chameleon_sglang.sglang_scheduler import bridge_of

    bridge = bridge_of(scheduler)
    if bridge is not None:
        bridge.apply_squashes(batch)
    return None


def on_batch_result(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """After a batch's results: finished requests release their adapters."""
    from chameleon_sglang.sglang_cache import cache_bridge_of

    cache = cache_bridge_of(scheduler)
    if cache is not None:
        cache.settle_finished()
    dp_hooks.report(scheduler)
    return result


# -- model runner (scheduler process) ----------------------------------------------------------
def decide_adapter_cache(original: Callable, runner: Any, *args: Any, **kwargs: Any) -> Any:
    """``ModelRunner.init_lora_manager``: first decide, from the flags and the loaded model,
    whether the adapter cache can be the LoRA pool; where it cannot, the ``chameleon`` backend
    name resolves to SGLang's own backend, so SGLang's pool serves (logged once)."""
    from sglang.srt.runtime_context import get_lora

    from chameleon_sglang.capability import decide_for_runner

    decide_for_runner(runner, runner.server_args, get_lora().lora_backend)
    return original(runner, *args, **kwargs)


def build_cache_aware_allocator(original: Callable, configurator: Any, *args: Any,
                                **kwargs: Any) -> Any:
    """SGLang's KV allocator construction: where the adapter cache is this process's LoRA pool,
    the page-size-1 allocator is built as ``CacheAwareTokenAllocator`` (inert until the cache
    binds to it); anything else exactly as SGLang builds it."""
    from chameleon_sglang.capability import runner_decision

    allocator = original(configurator, *args, **kwargs)
    if not runner_decision().cache_serves:
        return allocator
    from chameleon_sglang.cache.kv_allocator import cache_aware_copy

    return cache_aware_copy(allocator)


def init_lora_pool(original: Callable, manager: Any, *args: Any, **kwargs: Any) -> Any:
    """``LoRAManager.init_memory_pool``: with the ``chameleon`` backend, the adapter cache
    becomes the LoRA pool; otherwise SGLang's pool (with the host-link model, if set)."""
    from sglang.srt.runtime_context import get_server_args

    config = ChameleonConfig.from_server_args(get_server_args())
    backend = manager.lora_backend
    if getattr(backend, "name", None) != CHAMELEON_LORA_BACKEND:
        result = original(manager, *args, **kwargs)
        manager.memory_pool.chameleon_host_link_gbps = config.host_link_gbps
        return result
    from chameleon_sglang.lora_pool import ChameleonLoRAPool

    manager.memory_pool = ChameleonLoRAPool(
        base_hf_config=manager.base_hf_config,
        max_loras_per_batch=manager.max_loras_per_batch,
        dtype=manager.dtype,
        max_lora_rank=manager.max_lora_rank,
        target_modules=manager.target_modules,
        base_model=manager.base_model,
        eviction_policy=manager.eviction_policy,
        lora_added_tokens_size=manager.lora_added_tokens_size,
        experts_shared_outer_loras=manager.experts_shared_outer_loras,
        strict_loading=manager.lora_strict_loading,
        enable_lora_overlap_loading=manager.enable_lora_overlap_loading,
        manager=manager,
        config=config,
    )
    manager.max_loras_per_batch = manager.memory_pool.max_loras_per_batch
    backend.attach(manager.memory_pool)
    return None


def refuse_uncacheable_adapter(result: Any, manager: Any, lora_config: Any, lora_ref: Any,
                               *args: Any, **kwargs: Any) -> Any:
    """With the adapter cache, refuse adapters with embedding or LM-head weights at load."""
    if getattr(manager.lora_backend, "name", None) == CHAMELEON_LORA_BACKEND:
        from chameleon_sglang.lora_pool import EMBEDDING_MODULES

        targets = set(getattr(lora_config, "target_modules", None) or ())
        embedded = sorted(targets & EMBEDDING_MODULES)
        if embedded or getattr(lora_config, "lora_added_tokens_size", 0):
            raise ValueError(
                f"Failed to load LoRA adapter {lora_ref.lora_name}: the Chameleon adapter cache "
                f"does not serve LoRA on {embedded or 'added tokens'} (run without --chameleon "
                f"or with --no-chameleon-cache for such adapters)")
    return result


def load_into_slot_with_host_link(original: Callable, pool: Any, uid: Any, *args: Any,
                                  **kwargs: Any) -> Any:
    """SGLang's slot fill, held to the host-link model when one is set."""
    import time

    started = time.perf_counter()
    result = original(pool, uid, *args, **kwargs)
    gbps = getattr(pool, "chameleon_host_link_gbps", 0.0)
    adapter = args[1] if len(args) > 1 else kwargs.get("lora_adapter")
    if gbps > 0 and uid is not None and adapter is not None:
        num_bytes = sum(w.numel() * w.element_size()
                        for layer in adapter.layers for w in layer.weights.values())
        remaining = num_bytes / (gbps * 1e9) - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
    return result


def add_chameleon_init_info(result: Dict[str, Any], scheduler: Any, *args: Any, **kwargs: Any):
    """Publish the component status in the scheduler's handshake (merged into /server_info)."""
    config = _config(scheduler)
    statuses = getattr(scheduler, "chameleon_statuses", None) or _statuses(
        scheduler, config, None
    )
    result["chameleon_status"] = status_report(config, statuses)
    return result


def add_chameleon_internal_state(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """Add live Chameleon statistics to the scheduler's internal state (``/server_info``)."""
    from chameleon_sglang.sglang_scheduler import bridge_of

    from chameleon_sglang.sglang_cache import cache_bridge_of

    bridge = bridge_of(scheduler)
    cache = cache_bridge_of(scheduler)
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        from chameleon_sglang.dp.replica_reporter import replica_reporter_of

        reporter = replica_reporter_of(scheduler)
        state["chameleon"] = {
            "scheduler": bridge.stats() if bridge is not None else None,
            "adapter_cache": cache.stats() if cache is not None else None,
            "dp": reporter.stats() if reporter is not None else None,
        }
        from chameleon_sglang import integrity

        if integrity.enabled():
            state["chameleon"]["integrity"] = integrity.check_integrity(scheduler)
    return result


# -- HTTP server (launcher process) ------------------------------------------------------------
STATS_PATH = "/chameleon/stats"


def add_http_routes(*args: Any, **kwargs: Any) -> None:
    """Before the HTTP server starts: add ``GET /chameleon/stats``."""
    from sglang.srt.entrypoints import http_server

    app = http_server.app
    if any(getattr(route, "path", None) == STATS_PATH for route in app.routes):
        return

    async def chameleon_stats() -> Dict[str, Any]:
        """Chameleon's live statistics per scheduler (data-parallel rank)."""
        manager = http_server._global_state.tokenizer_manager
        states = await manager.get_internal_state()
        config = ChameleonConfig.from_server_args(manager.server_args)
        ranks = [state.get("chameleon", {}) for state in states]
        return {"enabled": config.enabled, "ranks": sorted(ranks, key=_dp_rank_of)}

    app.add_api_route(STATS_PATH, chameleon_stats, methods=["GET"])


def _dp_rank_of(rank: Dict[str, Any]) -> int:
    """Sort key of one scheduler's statistics: its data-parallel rank where it reports one
    (replies arrive in any order), else 0 (the order SGLang gave is kept: the sort is stable)."""
    dp = rank.get("dp") if isinstance(rank, dict) else None
    return int(dp.get("dp_rank", 0)) if isinstance(dp, dict) else 0
