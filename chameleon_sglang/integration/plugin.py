"""SGLang plugin entry point (``sglang.srt.plugins``): the table of every SGLang seam we use.

SGLang calls :func:`register` once in every process (launcher, scheduler, detokenizer, DP
controller) before it parses arguments or builds the scheduler. Each row of :data:`HOOKS` names
an SGLang target, the handler that serves it and how it wraps the target; the handlers live in
``hooks/`` by concern. ``tests/integration/test_seams.py`` pins every target's signature at our
SGLang pin. Without ``--chameleon`` every handler leaves SGLang's behaviour as it is, except
two fixes that apply to every server: the CPU backend defaults (only where SGLang's CPU engine
runs without its CPU kernels) and the refusal of token ids outside the vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

from chameleon_sglang.integration.hooks import (
    adapter_loads,
    args,
    catalog,
    cpu,
    dp,
    host_tier,
    http,
    loads,
    lora,
    requests,
    scheduler,
)
from chameleon_sglang.integration.hooks.dp import DP_CONTROLLER_CLASS, LOAD_BALANCE_METHOD_CLASS
from chameleon_sglang.integration.hooks.forward import call_after, call_before

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
MODEL_RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
KV_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
LORA_MANAGER = "sglang.srt.lora.lora_manager.LoRAManager"
LORA_POOL = "sglang.srt.lora.mem_pool.LoRAMemoryPool"
TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
IDLE_SLEEPER = "sglang.srt.managers.scheduler_components.idle_sleeper.IdleSleeper"
METRICS_REPORTER = (
    "sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter"
)
SAMPLING_PARAMS_VERIFY = "sglang.srt.sampling.sampling_params.SamplingParams.verify"

RESOLUTION_HOOKS: List[Tuple[str, Callable[[Any, Callable[[Any], None]], None]]] = [
    ("handle_missing_default_values", catalog.catalog_defaults),
    ("handle_cuda_graph_config", args.cuda_graph_safety),
    ("handle_cpu_backends", args.cpu_backend_defaults),
    ("handle_other_validations", args.validate_chameleon_args),
]
"""(SGLang resolution step, our handler), registered in this order."""

AFTER, BEFORE, AROUND = "AFTER", "BEFORE", "AROUND"

# A replica's report to the DP controller, sent when it changed: after events; with a prefill
# batch just formed (its requests are in no queue SGLang keeps until it runs); forced when idle.
_report = call_after("reporter", "report")
_report_with_batch = call_after("reporter", "report", result_as="batch")
_report_exactly = call_after("reporter", "report", force=True)
# a request read from the controller is acknowledged, whatever becomes of it
_acknowledge = call_before("reporter", "on_received", "recv_req")

HOOKS: List[Tuple[str, Callable[..., Any], str]] = [
    # scheduler: install the components, feed them SGLang's events (AFTER hooks run in
    # registration order: the DP reports below see what these changed)
    (f"{SCHEDULER}.init_memory_pools", scheduler.bind_pool_to_kv_buffers, AFTER),
    (f"{SCHEDULER}.init_schedule_policy", scheduler.install_scheduler, AFTER),
    (f"{SCHEDULER}._add_request_to_queue", scheduler.refuse_request_beyond_memory, BEFORE),
    (f"{SCHEDULER}._add_request_to_queue", scheduler.on_request_enqueued, AFTER),
    (f"{SCHEDULER}._release_aborted_request", scheduler.on_request_aborted, AFTER),
    (f"{SCHEDULER}.can_schedule_lora_req", scheduler.on_can_schedule_lora_req, AROUND),
    (f"{SCHEDULER}._get_new_batch_prefill_raw", scheduler.on_prefill_pass_end, AFTER),
    # at SGLang's retraction point, planned squashes; after a batch, finished requests' adapters
    (f"{SCHEDULER}.update_running_batch", call_before("bridge", "apply_squashes", "batch"), BEFORE),
    (f"{SCHEDULER}.process_batch_result", call_after("cache", "settle_finished"), AFTER),
    (f"{SCHEDULER}.get_init_info", scheduler.add_chameleon_init_info, AFTER),
    (f"{SCHEDULER}.get_internal_state", scheduler.add_chameleon_internal_state, AFTER),
    (f"{METRICS_REPORTER}._update_lora_metrics", loads.report_cached_adapters, AFTER),
    # data parallelism: replica reports (scheduler processes), dispatch (controller process)
    (f"{SCHEDULER}.init_ipc_channels", dp.remember_ipc_name, AFTER),
    (f"{SCHEDULER}.init_schedule_policy", dp.install_reporter, AFTER),
    (f"{SCHEDULER}._add_request_to_queue", dp.report_enqueued, AFTER),
    (f"{SCHEDULER}._release_aborted_request", _report, AFTER),
    (f"{SCHEDULER}._get_new_batch_prefill_raw", _report_with_batch, AFTER),
    (f"{SCHEDULER}.process_batch_result", _report, AFTER),
    (f"{SCHEDULER}.on_idle", _report_exactly, AFTER),
    (f"{SCHEDULER}.handle_generate_request", _acknowledge, BEFORE),
    (f"{SCHEDULER}.handle_embedding_request", _acknowledge, BEFORE),
    (f"{LOAD_BALANCE_METHOD_CLASS}.from_str", dp.load_balance_method_from_str, AROUND),
    (f"{DP_CONTROLLER_CLASS}.init_dispatcher", dp.install_dispatch, AFTER),
    (f"{DP_CONTROLLER_CLASS}.event_loop", dp.controller_event_loop, AROUND),
    # LoRA and KV memory (model runner of each scheduler process)
    (f"{MODEL_RUNNER}.init_lora_manager", lora.decide_adapter_cache, AROUND),
    (
        f"{KV_CONFIGURATOR}._build_token_to_kv_pool_allocator",
        lora.build_cache_aware_allocator,
        AROUND,
    ),
    (f"{LORA_MANAGER}.init_memory_pool", lora.init_lora_pool, AROUND),
    (f"{LORA_MANAGER}.validate_new_adapter", lora.refuse_uncacheable_adapter, AFTER),
    (f"{LORA_MANAGER}.load_lora_adapter", lora.refuse_foreign_adapter, AFTER),
    (f"{LORA_MANAGER}.unload_lora_adapter", lora.return_freed_memory, AFTER),
    # adapter loads: the disk read on a worker, installed and answered in a later pass
    (f"{SCHEDULER}.load_lora_adapter", adapter_loads.defer_adapter_load, AROUND),
    (f"{SCHEDULER}.process_input_requests", adapter_loads.finish_adapter_loads, AFTER),
    (f"{LORA_MANAGER}.load_lora_weights", adapter_loads.install_prepared_adapter, AROUND),
    (f"{IDLE_SLEEPER}.maybe_sleep", adapter_loads.poll_while_reads_pending, AROUND),
    (f"{LORA_POOL}.load_lora_weight_to_buffer", lora.load_into_slot_with_host_link, AROUND),
    # requests and HTTP (launcher process)
    (f"{TOKENIZER_MANAGER}._resolve_lora_path", catalog.resolve_unregistered_adapters, AROUND),
    (f"{TOKENIZER_MANAGER}.load_lora_adapter", host_tier.bound_host_memory, AROUND),
    (f"{TOKENIZER_MANAGER}.unload_lora_adapter", host_tier.forget_unloaded, AROUND),
    (f"{TOKENIZER_MANAGER}._validate_one_request", requests.refuse_unservable_prompts, BEFORE),
    (SAMPLING_PARAMS_VERIFY, requests.refuse_sampling_values_sglang_overflows, BEFORE),
    ("sglang.srt.entrypoints.http_server.launch_server", http.serve_http, AROUND),
    # CPU ranks
    (f"{cpu.BOOTSTRAP_MODULE}._init_cpu_threads_env", cpu.bind_cpu_rank_threads, AROUND),
]
"""Every ``HookRegistry`` registration: (qualified SGLang target, handler, hook kind)."""

_registered = False


def register() -> None:
    """Register every row of :data:`RESOLUTION_HOOKS` and :data:`HOOKS` with SGLang, and the
    ``chameleon`` LoRA backend (once per process)."""
    global _registered
    if _registered:
        return
    _registered = True

    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for step, handler in RESOLUTION_HOOKS:
        register_resolution_hook(step)(handler)
    for target, handler, kind in HOOKS:
        HookRegistry.register(target, handler, HookType[kind])
    lora.register_lora_backend()
