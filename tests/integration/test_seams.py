"""Seam guard: every SGLang function, method and resolution step we hook or override exists at
the pin with the parameters we were written against. A new SGLang release that moves or changes
one fails here, in one place, naming it (rather than deep inside a server).

Targets come from the plugin's own tables (``HOOKS``, ``RESOLUTION_HOOKS``), so a new hook
cannot be added without being pinned; the rest are classes we subclass or drive directly (the
LoRA backend and pool base classes, the KV allocator whose free lists the slot store reads).
Where our code re-implements an SGLang body (the DP controller's event loop; the adapter load and
unload for several replicas), the body itself is pinned: a change to it fails here until ours is
checked against it.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

from chameleon_sglang.integration import plugin

PINNED = {
    "sglang.srt.entrypoints.http_server.launch_server": "server_args init_tokenizer_manager_func run_scheduler_process_func run_detokenizer_process_func execute_warmup_func launch_callback",
    "sglang.srt.lora.lora_manager.LoRAManager.init_memory_pool": "self",
    "sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter._update_lora_metrics": "self",
    "sglang.srt.model_executor.model_runner.ModelRunner.init_lora_manager": "self",
    "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool_allocator": "self sizes token_to_kv_pool is_dsv4_model req_to_token_pool token_to_kv_pool_allocator",
    "sglang.srt.model_executor.model_runner.ModelRunner.configure_kv_cache_dtype": "self",
    "sglang.srt.lora.mem_pool.LoRAMemoryPool._has_moe_module": "base_model",
    "sglang.srt.mem_cache.kv_cache_builder.uses_ssm_state": "model_config",
    "sglang.srt.lora.backend.lora_registry.get_backend_from_name": "name",
    "sglang.srt.lora.lora_manager.LoRAManager.validate_new_adapter": "self lora_config lora_ref",
    "sglang.srt.lora.lora_manager.LoRAManager.load_lora_adapter": "self lora_ref",
    "sglang.srt.lora.lora_manager.LoRAManager.unload_lora_adapter": "self lora_ref",
    "sglang.srt.lora.lora_manager.LoRAManager.create_lora_update_result": "self success error_message",
    "sglang.srt.lora.mem_pool.LoRAMemoryPool.load_lora_weight_to_buffer": "self uid buffer_id lora_adapter lora_modules lora_embed_tokens_module lora_lm_head_module",
    "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue": "self req is_retracted",
    "sglang.srt.managers.scheduler.Scheduler.load_lora_adapter": "self recv_req",
    "sglang.srt.managers.scheduler.Scheduler.process_input_requests": "self recv_reqs",
    "sglang.srt.managers.scheduler.Scheduler.send_control_output": "self output recv_req",
    "sglang.srt.lora.lora_manager.LoRAManager.load_lora_weights": "self lora_ref",
    "sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw": "self prefill_delayer_single_pass running_batch",
    "sglang.srt.managers.scheduler.Scheduler._release_aborted_request": "self req",
    "sglang.srt.managers.scheduler.Scheduler.can_schedule_lora_req": "self req running_loras",
    "sglang.srt.managers.scheduler.Scheduler.get_init_info": "self",
    "sglang.srt.managers.scheduler.Scheduler.get_internal_state": "self recv_req",
    "sglang.srt.managers.scheduler.Scheduler.init_memory_pools": "self",
    "sglang.srt.managers.scheduler.Scheduler.init_schedule_policy": "self",
    "sglang.srt.managers.scheduler.Scheduler.process_batch_result": "self batch result",
    "sglang.srt.managers.scheduler.Scheduler.update_running_batch": "self batch",
    "sglang.srt.managers.scheduler.Scheduler.init_ipc_channels": "self port_args",
    "sglang.srt.managers.scheduler.Scheduler.on_idle": "self",
    "sglang.srt.managers.scheduler_components.idle_sleeper.IdleSleeper.maybe_sleep": "self",
    "sglang.srt.managers.scheduler.Scheduler.handle_generate_request": "self recv_req mm_input_error",
    "sglang.srt.managers.scheduler.Scheduler.handle_embedding_request": "self recv_req mm_input_error",
    "sglang.srt.managers.utils.is_health_check_generate_req": "recv_req",
    "sglang.srt.distributed.bootstrap._init_cpu_threads_env": "local_omp_cpuid dist_init_method",
    "sglang.srt.managers.data_parallel_controller.LoadBalanceMethod.from_str": "method",
    "sglang.srt.managers.data_parallel_controller.DataParallelController.init_dispatcher": "self",
    "sglang.srt.managers.data_parallel_controller.DataParallelController.event_loop": "self",
    "sglang.srt.managers.data_parallel_controller.DataParallelController.maybe_external_dp_rank_routing": "self req",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request": "self obj input_ids",
    "sglang.srt.sampling.sampling_params.SamplingParams.verify": "self vocab_size",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._resolve_lora_path": "self obj",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.load_lora_adapter": "self obj _",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.unload_lora_adapter": "self obj _",
    "sglang.srt.lora.backend.base_backend.BaseLoRABackend.__init__": "self max_loras_per_batch device",
    "sglang.srt.lora.backend.base_backend.BaseLoRABackend.prepare_lora_batch": "self forward_batch weight_indices lora_ranks scalings use_decode_cuda_graph use_prefill_cuda_graph",
    "sglang.srt.lora.backend.base_backend.BaseLoRABackend.init_decode_cuda_graph_batch_info": "self max_bs_in_cuda_graph num_tokens_per_req",
    "sglang.srt.lora.backend.base_backend.BaseLoRABackend.forward_with_base": "self layer x base_fn lora_a lora_b output_offset offsets all_reduce kind pruned_batch_info",
    "sglang.srt.lora.backend.base_backend.BaseLoRABackend.run_lora_a_sgemm": "self x weights *args **kwargs",
    "sglang.srt.lora.backend.base_backend.BaseLoRABackend.run_lora_b_sgemm": "self x weights *args **kwargs",
    "sglang.srt.lora.backend.base_backend.BaseLoRABackend.run_qkv_lora": "self x qkv_lora_a qkv_lora_b *args **kwargs",
    "sglang.srt.lora.backend.base_backend.BaseLoRABackend.run_gate_up_lora": "self x gate_up_lora_a gate_up_lora_b *args **kwargs",
    "sglang.srt.lora.mem_pool.LoRAMemoryPool.__init__": "self base_hf_config max_loras_per_batch dtype max_lora_rank target_modules base_model eviction_policy lora_added_tokens_size experts_shared_outer_loras strict_loading enable_lora_overlap_loading",
    "sglang.srt.lora.mem_pool.LoRAMemoryPool.prepare_lora_batch": "self cur_uids lora_adapters lora_modules lora_refs lora_embed_tokens_module lora_lm_head_module",
    "sglang.srt.lora.mem_pool.LoRAMemoryPool.get_buffer_id": "self lora_uid",
    "sglang.srt.lora.mem_pool.LoRAMemoryPool.get_tensor": "self target_module layer_id lora_type",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.__init__": "self size dtype device kvcache need_sort",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.alloc": "self need_size",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free": "self free_index",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.available_size": "self",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.merge_and_sort_free": "self",
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.evict_to_free_tokens": "self tree_cache num_tokens",
    "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.evict_for_alloc": "self params allocation_reclaim_satisfied",
}


def resolve(target: str) -> Any:
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def parameters(fn: Any) -> str:
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return " ".join(
        prefix.get(p.kind, "") + name for name, p in inspect.signature(fn).parameters.items()
    )


def test_every_hook_target_is_pinned():
    targets = {target for target, _, _ in plugin.HOOKS}
    assert targets <= set(PINNED), sorted(targets - set(PINNED))


@pytest.mark.parametrize("target", sorted(PINNED))
def test_seam_exists_with_the_pinned_parameters(target):
    fn = resolve(target)
    assert callable(fn), target
    assert parameters(fn) == PINNED[target], f"{target} changed its parameters"


@pytest.mark.parametrize("step, handler", plugin.RESOLUTION_HOOKS)
def test_resolution_steps_exist(step, handler):
    from sglang.srt.arg_groups import resolution_hooks

    assert step in resolution_hooks._OVERRIDABLE_HOOKS
    assert callable(handler)


def test_every_hook_kind_is_one_sglang_knows():
    from sglang.srt.plugins.hook_registry import HookType

    assert {kind for _, _, kind in plugin.HOOKS} <= set(HookType.__members__)


DP_EVENT_LOOP_BODY = """
    def event_loop(self):
        while True:
            while True:
                self.soft_watchdog.feed()
                try:
                    recv_req = sock_recv(self.recv_from_tokenizer, flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    break
                self._request_dispatcher(recv_req)
"""


def test_the_dp_event_loop_we_replace_is_still_sglangs_at_the_pin():
    """``run_poll_event_loop`` (with ``--chameleon``) does what this body does - feed the
    watchdog, drain the tokenizer socket without blocking, hand each request to
    ``_request_dispatcher`` - but blocks in ``zmq.Poller`` between bursts. If SGLang's body
    changes, ours must be checked against it."""
    from sglang.srt.managers.data_parallel_controller import DataParallelController

    source = inspect.getsource(DataParallelController.event_loop)
    assert source.strip() == DP_EVENT_LOOP_BODY.strip()


def test_the_adapter_cache_pool_is_built_with_every_argument_of_sglangs_pool():
    """``ChameleonLoRAPool.for_manager`` passes each ``LoRAMemoryPool`` argument from the
    manager attribute SGLang's ``init_memory_pool`` passes it from."""
    from sglang.srt.lora.lora_manager import LoRAManager
    from sglang.srt.lora.mem_pool import LoRAMemoryPool

    from chameleon_sglang.integration.lora_pool import POOL_ARGUMENTS

    expected = set(inspect.signature(LoRAMemoryPool.__init__).parameters) - {"self"}
    assert {name for name, _ in POOL_ARGUMENTS} == expected
    source = inspect.getsource(LoRAManager.init_memory_pool)
    for name, attribute in POOL_ARGUMENTS:
        assert f"{name}=self.{attribute}," in source, name


@pytest.mark.parametrize(
    "target, attribute",
    [
        # turned off under the Chameleon policy (non-preemptive): set in init_schedule_policy
        (
            "sglang.srt.managers.scheduler.Scheduler.init_schedule_policy",
            "enable_priority_preemption",
        ),
        # reset when only one request did not fit, or after a squash freed memory
        ("sglang.srt.managers.scheduler.Scheduler.update_running_batch", "batch_is_full"),
        # replaced by adapter-affinity dispatch after init_dispatcher
        (
            "sglang.srt.managers.data_parallel_controller.DataParallelController.__init__",
            "dispatching",
        ),
        (
            "sglang.srt.managers.data_parallel_controller.DataParallelController.__init__",
            "refresh_load_budget_on_dispatch",
        ),
    ],
)
def test_the_sglang_state_we_write_is_still_there(target, attribute):
    """Every attribute of an SGLang object our code writes is still set where we expect SGLang
    to set (and so read) it."""
    assert f".{attribute}" in inspect.getsource(resolve(target)), (target, attribute)


def test_sglang_reloads_unregistered_names_from_its_ref_cache():
    """The adapter catalog hands SGLang an adapter to load by putting a ``LoRARef`` in
    ``TokenizerManager.lora_ref_cache``, which ``_resolve_lora_path`` loads from when a requested
    name is not registered."""
    from sglang.srt.lora.lora_registry import LoRARef
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    assert LoRARef.__struct_fields__ == ("lora_id", "lora_name", "lora_path", "pinned")
    source = inspect.getsource(TokenizerManager._resolve_lora_path)
    assert "self.lora_ref_cache[lora_path]" in source and "self.load_lora_adapter(" in source


def test_adapter_loads_can_be_answered_later_and_installed_from_a_prepared_adapter():
    """Background adapter reads rely on: SGLang's dispatcher calling ``self.load_lora_adapter``
    (our wrapper) and sending nothing for a None answer; every pass calling
    ``process_input_requests``; SGLang's load reading weights only through
    ``load_lora_weights``, which builds the ``LoRAAdapter`` as ``build_host_adapter`` does."""
    from sglang.srt.lora.lora_manager import LoRAManager
    from sglang.srt.managers.scheduler import Scheduler

    assert "(LoadLoRAAdapterReqInput, self.load_lora_adapter)" in inspect.getsource(
        Scheduler.init_request_dispatcher
    )
    dispatch = inspect.getsource(Scheduler.process_input_requests)
    assert "if output is not None:" in dispatch and "self.send_control_output(output" in dispatch
    assert "self.process_input_requests(recv_reqs)" in inspect.getsource(Scheduler.ingest_requests)
    assert "self.load_lora_weights(lora_ref)" in inspect.getsource(LoRAManager._load_lora_adapter)
    build = inspect.getsource(LoRAManager.load_lora_weights)
    for part in (
        "self.configs[lora_ref.lora_id]",
        "self.load_config",
        "base_model=self.base_model",
        "lora_adapter.initialize_weights()",
        "self.loras[lora_ref.lora_id] = lora_adapter",
    ):
        assert part in build, part


def test_the_host_tier_unloads_through_sglangs_locked_unload_and_reads_its_counters():
    """The host tier unloads with ``lora_update_lock`` held through ``_unload_lora_adapter_locked``
    (which leaves the name in ``lora_ref_cache``: the next request reloads it), and reads a
    name's in-flight requests from the registry's counters."""
    from sglang.srt.lora.lora_registry import LoRARef, LoRARegistry
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    unload = inspect.getsource(TokenizerManager._unload_lora_adapter_locked)
    assert "self.lora_update_lock.locked()" in unload and "lora_ref_cache" not in unload
    registry = LoRARegistry([LoRARef(lora_name="a", lora_path="/a")])
    ref = registry.get_all_adapters()["a"]
    assert registry._counters[ref.lora_id].value() == 0


def test_the_kv_allocator_keeps_the_free_lists_the_slot_store_reads():
    import torch
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

    allocator = TokenToKVPoolAllocator(8, torch.float32, "cpu", None, True)
    for attr in ("free_pages", "release_pages", "need_sort", "page_size"):
        assert hasattr(allocator, attr), attr
    assert isinstance(allocator.free_pages, torch.Tensor) and allocator.page_size == 1


def test_sglang_evicts_before_allocating_through_the_allocator():
    """SGLang's pre-allocation eviction goes through the allocator's ``evict_to_free_tokens``
    (which the cache-aware allocator overrides to put the prefix cache before idle adapters)."""
    from sglang.srt.mem_cache import common

    assert "evict_to_free_tokens" in inspect.getsource(common.evict_from_tree_cache)


SGLANG_LORA_UPDATE_SHA256 = {
    # the body load_on_every_replica repeats (without its one-replica assertion)
    "load_lora_adapter": "8faca4c1fb9f594d6a52baa07f4d6168375572f22ddc74cb0b2ed950b4368964",
    # the checks unload_on_every_replica repeats before SGLang's own locked unload
    "unload_lora_adapter": "cba3bb5ac0029e44fcd64dbe25fb08556500a52221cff518cdfd06547df98ab4",
}


@pytest.mark.parametrize("method", sorted(SGLANG_LORA_UPDATE_SHA256))
def test_the_adapter_updates_we_repeat_for_several_replicas_are_still_sglangs(method):
    """``hooks/replica_loads.py`` repeats SGLang's load and unload without their one-replica
    assertion. If SGLang's bodies change, ours must be checked against them (then update the
    digest)."""
    import hashlib

    from sglang.srt.managers.tokenizer_control_mixin import TokenizerControlMixin

    source = inspect.getsource(getattr(TokenizerControlMixin, method))
    assert "dp_size == 1" in source
    assert hashlib.sha256(source.encode()).hexdigest() == SGLANG_LORA_UPDATE_SHA256[method]


def test_adapter_updates_reach_every_replica():
    """What makes a load under ``--dp-size > 1`` reach every replica: the tokenizer's fan-out
    communicators wait for one answer per DP rank, and the DP controller sends any message it
    does not dispatch (control messages) to every replica."""
    from sglang.srt.managers.data_parallel_controller import DataParallelController
    from sglang.srt.managers.tokenizer_control_mixin import TokenizerControlMixin

    assert "get_parallel().num_dp_ranks" in inspect.getsource(
        TokenizerControlMixin.init_communicators
    )
    dispatcher = inspect.getsource(DataParallelController.init_dispatcher)
    assert "add_fallback_fn(self.send_control_message)" in dispatcher
    send = inspect.getsource(DataParallelController.send_control_message)
    assert "self._active_workers[:: self.control_message_step]" in send


def test_the_load_snapshot_reads_the_lora_figures_we_rewrite():
    """``/v1/loads``' LoRA section is the reporter's ``lora_pool_slots_*`` figures, written by
    ``_update_lora_metrics`` (after which ``hooks/loads.py`` rewrites them)."""
    from sglang.srt.managers.scheduler_components.load_inquirer import SchedulerLoadInquirer
    from sglang.srt.managers.scheduler_components.metrics_reporter import SchedulerMetricsReporter

    update = inspect.getsource(SchedulerMetricsReporter._update_lora_metrics)
    for name in ("lora_pool_slots_used", "lora_pool_slots_total", "lora_pool_utilization"):
        assert f"self.stats.{name} = " in update, name
    loads = inspect.getsource(SchedulerLoadInquirer.get_loads)
    assert "slots_total=stats.lora_pool_slots_total" in loads
