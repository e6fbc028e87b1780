"""Hooks on SGLang's LoRA machinery and KV allocator (model-runner side of each scheduler).

- ``ModelRunner.init_lora_manager``: decide, from the flags and the loaded model, whether the
  adapter cache can be the LoRA pool (:mod:`chameleon_sglang.integration.capability`);
- SGLang's KV allocator construction: the cache-aware allocator where the cache serves;
- ``LoRAManager.init_memory_pool``: :class:`~chameleon_sglang.integration.lora_pool.
  ChameleonLoRAPool` in place of SGLang's slot pool;
- ``LoRAManager.validate_new_adapter``: refuse what the cache does not store;
- ``LoRAManager.load_lora_adapter``: refuse an adapter of another base model (shapes);
- ``LoRAMemoryPool.load_lora_weight_to_buffer``: SGLang's slot fill, held to the host-link model;
- the ``chameleon`` entry of SGLang's LoRA backend registry.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.integration import capability
from chameleon_sglang.integration.adapter_costs import adapter_weight_bytes
from chameleon_sglang.integration.kv_allocator import cache_aware_copy
from chameleon_sglang.memory.host_link import HostLink

_stock_pool_link = HostLink()
"""The host-link model of SGLang's own pool in this process (set when the pool is built)."""


def use_stock_pool_link(link: HostLink) -> None:
    """Hold SGLang's slot fills in this process to ``link``."""
    global _stock_pool_link
    _stock_pool_link = link


def register_lora_backend() -> None:
    """Add the ``chameleon`` LoRA backend to SGLang's registry (built when first used): the
    adapter cache's kernels, or SGLang's own backend where the model rules the cache out."""
    from sglang.srt.lora.backend.lora_registry import LORA_SUPPORTED_BACKENDS

    def create() -> Any:
        fallback = capability.runner_decision().fallback_backend
        if fallback is not None:  # the model rules the cache out: SGLang's pool and kernels
            from sglang.srt.lora.backend.lora_registry import get_backend_from_name

            return get_backend_from_name(fallback)
        from chameleon_sglang.integration.lora_backend import ChameleonLoRABackend

        return ChameleonLoRABackend

    LORA_SUPPORTED_BACKENDS.setdefault(capability.CHAMELEON_LORA_BACKEND, create)


def decide_adapter_cache(original: Callable, runner: Any, *args: Any, **kwargs: Any) -> Any:
    """``ModelRunner.init_lora_manager``: first decide, from the flags and the loaded model,
    whether the adapter cache can be the LoRA pool; where it cannot, the ``chameleon`` backend
    name resolves to SGLang's own backend, so SGLang's pool serves (logged once)."""
    from sglang.srt.runtime_context import get_lora

    capability.decide_for_runner(
        runner, capability.resolved(runner.server_args), get_lora().lora_backend
    )
    return original(runner, *args, **kwargs)


def build_cache_aware_allocator(
    original: Callable, configurator: Any, *args: Any, **kwargs: Any
) -> Any:
    """SGLang's KV allocator construction: where the adapter cache is this process's LoRA pool,
    the page-size-1 allocator is built as ``CacheAwareTokenAllocator`` (inert until the cache
    binds to it); anything else exactly as SGLang builds it."""
    allocator = original(configurator, *args, **kwargs)
    if not capability.runner_decision().cache_serves:
        return allocator
    return cache_aware_copy(allocator)


def init_lora_pool(original: Callable, manager: Any, *args: Any, **kwargs: Any) -> Any:
    """``LoRAManager.init_memory_pool``: with the ``chameleon`` backend, the adapter cache
    becomes the LoRA pool; otherwise SGLang's pool (with the host-link model, if set)."""
    from sglang.srt.runtime_context import get_server_args

    config = ChameleonConfig.from_server_args(get_server_args())
    backend = manager.lora_backend
    if getattr(backend, "name", None) != capability.CHAMELEON_LORA_BACKEND:
        use_stock_pool_link(HostLink(config.host_link_gbps))
        return original(manager, *args, **kwargs)
    from chameleon_sglang.integration.lora_pool import ChameleonLoRAPool

    manager.memory_pool = ChameleonLoRAPool.for_manager(manager, config)
    manager.max_loras_per_batch = manager.memory_pool.max_loras_per_batch
    backend.attach(manager.memory_pool)
    return None


def refuse_uncacheable_adapter(
    result: Any, manager: Any, lora_config: Any, lora_ref: Any, *args: Any, **kwargs: Any
) -> Any:
    """With the adapter cache, refuse adapters with embedding or LM-head weights at load."""
    if _serves_cache(manager):
        targets = set(getattr(lora_config, "target_modules", None) or ())
        embedded = sorted(targets & capability.EMBEDDING_MODULES)
        if embedded or getattr(lora_config, "lora_added_tokens_size", 0):
            raise ValueError(
                f"Failed to load LoRA adapter {lora_ref.lora_name}: the Chameleon adapter cache "
                f"does not serve LoRA on {embedded or 'added tokens'} (run without --chameleon "
                f"or with --no-chameleon-cache for such adapters)"
            )
    return result


def refuse_foreign_adapter(result: Any, manager: Any, lora_ref: Any, *args: Any, **kwargs: Any):
    """After ``LoRAManager.load_lora_adapter``, with the adapter cache: an adapter whose matrices
    do not fit the model's LoRA layers (one trained for another base model) is unloaded again
    and the load fails, naming the mismatch (the cache's kernels read what the shapes say)."""
    if not getattr(result, "success", False) or not _serves_cache(manager):
        return result
    problem = manager.memory_pool.shape_problem(lora_ref.lora_id)
    if problem is None:
        return result
    manager.unload_lora_adapter(lora_ref)
    return manager.create_lora_update_result(
        success=False,
        error_message=f"LoRA adapter {lora_ref.lora_name} does not fit this model: {problem}",
    )


def return_freed_memory(result: Any, manager: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``LoRAManager.unload_lora_adapter``, with ``--chameleon``: the adapter's host
    tensors are freed; glibc is asked to hand the freed heap back to the system (``malloc_trim``),
    so host RSS follows the host tier's budget instead of the peak (the worker threads' arenas
    keep freed memory otherwise). A no-op where the C library has no ``malloc_trim``."""
    from sglang.srt.runtime_context import get_server_args

    if getattr(get_server_args(), "chameleon", False):
        release_freed_heap()
    return result


def release_freed_heap() -> None:
    """``malloc_trim(0)`` where glibc provides it."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _serves_cache(manager: Any) -> bool:
    return getattr(manager.lora_backend, "name", None) == capability.CHAMELEON_LORA_BACKEND


def load_into_slot_with_host_link(
    original: Callable, pool: Any, uid: Any, *args: Any, **kwargs: Any
) -> Any:
    """SGLang's slot fill, held to the host-link model when one is set."""
    started = time.perf_counter()
    result = original(pool, uid, *args, **kwargs)
    adapter = args[1] if len(args) > 1 else kwargs.get("lora_adapter")
    if uid is not None and adapter is not None:
        _stock_pool_link.hold(adapter_weight_bytes(adapter), started)
    return result
