"""The host tier in SGLang (launcher process, ``--chameleon``): loaded adapters bounded in bytes.

SGLang keeps every loaded adapter's weights in host memory (``LoRAManager.loras`` in each
scheduler) until it is unloaded; its only bound is the count-based ``--max-loaded-loras`` LRU,
applied in ``TokenizerManager.load_lora_adapter``. Here, after every successful load
(:func:`bound_host_memory`, around that method), adapters are unloaded through SGLang's own
unload path until their weights fit ``--chameleon-host-cache-gb``, chosen by the device cache's
eviction score (frequency, recency, size), never a pinned adapter, one a request holds, or one
being loaded for a request. An unloaded adapter keeps its ``LoRARef`` in SGLang's
``lora_ref_cache``, so its next request reads it from disk again. ``--max-loaded-loras``, where
set, still applies, but adapters no request holds leave first, by the same score, and where
every loaded adapter is in use the load is refused (:func:`_room_by_count`: SGLang's LRU would
unload an adapter in use and hold every load until its requests finish); the byte budget
applies after it.

A load that fails is remembered (:class:`~chameleon_sglang.catalog.load_failures.LoadFailures`):
requests for that name are refused at once, naming the error, until its backoff ends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Set

from chameleon_sglang.cache.eviction import create_eviction_policy
from chameleon_sglang.catalog.adapter_config import (
    WEIGHT_FILES,
    AdapterRefused,
    read_adapter_spec,
    refusal_for,
)
from chameleon_sglang.catalog.host_tier import HostTier
from chameleon_sglang.catalog.load_failures import LoadFailures
from chameleon_sglang.catalog.name_locks import NameLocks
from chameleon_sglang.integration import capability
from chameleon_sglang.integration.hooks.replica_loads import (
    load_on_every_replica,
    several_replicas,
    unload_on_every_replica,
)
from chameleon_sglang.integration.metrics import MetricsPublisher, host_tier_metrics
from chameleon_sglang.integration.state import ChameleonState, state_for, state_of

logger = logging.getLogger(__name__)

GB = 1e9
DEFAULT_RAM_SHARE = 0.25
"""Share of the RAM available at start that the host tier may use by default."""


@functools.cache
def default_host_budget_gb() -> float:
    """A quarter of the RAM available when first asked (once per process)."""
    import psutil

    return round(psutil.virtual_memory().available * DEFAULT_RAM_SHARE / GB, 2)


def host_budget_gb(config: Any) -> float:
    """``--chameleon-host-cache-gb``, or the default share of available RAM."""
    return config.host_cache_gb if config.host_cache_gb is not None else default_host_budget_gb()


def catalog_state(manager: Any) -> Optional[ChameleonState]:
    """The tokenizer manager's Chameleon state with its host tier and failure memory, or None
    without ``--chameleon``."""
    state = state_of(manager)
    if state is None:
        if not getattr(manager.server_args, "chameleon", False):
            return None
        state = state_for(manager)
    if state.host_tier is None:
        config = state.config
        state.host_tier = HostTier(
            int(host_budget_gb(config) * GB),
            create_eviction_policy(
                config.eviction_policy, config.score_weights, config.frequency_window_s
            ),
            config.frequency_window_s,
        )
        state.load_failures = LoadFailures()
        state.loading = NameLocks()
        state.loads_in_turn = asyncio.Lock()
        state.host_tier_metrics = MetricsPublisher(manager, host_tier_metrics)
        _follow_registry(manager, state.host_tier)
        logger.info(
            "Chameleon host tier: loaded adapters bounded to %.4g GB of host memory (%s)",
            host_budget_gb(config),
            "--chameleon-host-cache-gb" if config.host_cache_gb is not None else "default",
        )
    return state


def adapter_bytes(path: Optional[str]) -> int:
    """Bytes of the weight file of the adapter at ``path`` (0 where it is not a local dir)."""
    if not path:
        return 0
    for name in WEIGHT_FILES:
        try:
            return os.stat(Path(path) / name).st_size
        except OSError:
            continue
    return 0


def host_bytes(manager: Any, path: Optional[str]) -> int:
    """Host memory an adapter takes: its weight file's bytes in every replica's scheduler."""
    replicas = int(getattr(manager.server_args, "dp_size", 1) or 1)
    return adapter_bytes(path) * max(replicas, 1)


async def bound_host_memory(
    original: Callable, manager: Any, obj: Any, *args: Any, **kwargs: Any
) -> Any:
    """Around ``TokenizerManager.load_lora_adapter``: after a successful load, the adapter joins
    the host tier and adapters leave it until it fits its budget (module docstring). With
    several replicas the load is :func:`~.replica_loads.load_on_every_replica`."""
    state = catalog_state(manager)
    if state is None:
        return await original(manager, obj, *args, **kwargs)
    async with state.loads_in_turn:  # SGLang loads one at a time too (its update lock)
        refusal = await _room_by_count(manager, state, obj.lora_name, obj.lora_path)
        if refusal is not None:
            return _failed_load(refusal)
        if several_replicas(manager):
            result = await load_on_every_replica(manager, obj)
        else:
            result = await original(manager, obj, *args, **kwargs)
    if not getattr(result, "success", False):
        return result
    tier = state.host_tier
    now = time.monotonic()
    tier.admit(obj.lora_name, host_bytes(manager, obj.lora_path), bool(obj.pinned), now)
    state.load_failures.clear(obj.lora_name)
    _follow_registry(manager, tier)
    held = _held(manager, state) | {obj.lora_name}
    victims = tier.victims(held.__contains__, now)
    if victims:
        await _unload(manager, state, victims, result)
    publish_host_tier(manager, state)
    return result


NO_ROOM = "every loaded adapter is in use"
"""In the refusal of a load that ``--max-loaded-loras`` has no room for (not a load failure:
nothing is remembered, the next request tries again)."""


async def _room_by_count(
    manager: Any, state: ChameleonState, name: str, path: Optional[str]
) -> Optional[str]:
    """Before a load that ``--max-loaded-loras`` would answer with SGLang's LRU: adapters no
    request holds leave first, by the host tier's score, where SGLang's LRU would pick one a
    request holds (else SGLang's LRU decides, after the load succeeded, as without
    ``--chameleon``; an adapter whose config fails the server's checks is left to SGLang's own
    refusal, so a bad load drops nothing). Where none is free, the load is refused
    (the reason is returned) rather than left to SGLang's LRU, which would unload an adapter that
    requests are using and wait, holding ``lora_update_lock``, until every one of them finished:
    under overload minutes in which no other adapter loads and no adapter unloads (found by the
    soak with faults). Loads wait in turn (``loads_in_turn``), so two never see room for one."""
    server_args = capability.resolved(manager.server_args)
    limit = server_args.max_loaded_loras
    registered = manager.lora_registry.get_all_adapters()
    if limit is None or name in registered or len(registered) < int(limit):
        return None
    held = _held(manager, state) | {name}
    lru = next((n for n, ref in registered.items() if not ref.pinned), None)
    if lru is None or lru not in held or not _loadable(path, server_args):
        return None  # SGLang's LRU drops an idle adapter (after a successful load only)
    tier = state.host_tier
    _follow_registry(manager, tier)
    needed = len(registered) + 1 - int(limit)
    victims = tier.victims_by_count(needed, held.__contains__, time.monotonic())
    if len(victims) < needed:
        return (
            f"LoRA adapter {name!r} not loaded: --max-loaded-loras {limit} reached and "
            f"{NO_ROOM} by a request (retry once requests finish)"
        )
    await _unload(manager, state, victims, None)
    return None


def _loadable(path: Optional[str], server_args: Any) -> bool:
    """Whether the adapter at ``path`` passes the checks a config can answer (PEFT LoRA, rank,
    modules): those SGLang would otherwise refuse only after room was made."""
    try:
        spec = read_adapter_spec(Path(path or ""))
    except (AdapterRefused, OSError, ValueError):
        return False
    modules = list(server_args.lora_target_modules or ["all"])
    return refusal_for(spec, int(server_args.max_lora_rank or 0), modules) is None


def _failed_load(reason: str) -> Any:
    from sglang.srt.managers.io_struct import LoadLoRAAdapterReqOutput

    return LoadLoRAAdapterReqOutput(success=False, error_message=reason)


async def _unload(manager: Any, state: ChameleonState, victims: list, result: Any) -> None:
    from sglang.srt.managers.io_struct import UnloadLoRAAdapterReqInput

    tier = state.host_tier
    async with manager.lora_update_lock:
        for name in victims:
            registered = manager.lora_registry.get_all_adapters()
            if name not in registered or name in _held(manager, state):
                continue
            out = await manager._unload_lora_adapter_locked(
                UnloadLoRAAdapterReqInput(lora_name=name)
            )
            if not out.success:
                logger.warning("Host tier: unloading %s failed: %s", name, out.error_message)
                continue
            tier.remove(name, is_eviction=True)
            loaded = getattr(result, "loaded_adapters", None)
            if isinstance(loaded, dict):
                loaded.pop(name, None)
            logger.info(
                "Host tier: unloaded %s (%d adapters, %.4g GB of %.4g GB)",
                name,
                len(tier),
                tier.used_bytes / GB,
                tier.budget_bytes / GB,
            )


async def forget_unloaded(
    original: Callable, manager: Any, obj: Any, *args: Any, **kwargs: Any
) -> Any:
    """Around ``TokenizerManager.unload_lora_adapter``: the adapter left the host tier. With
    several replicas the unload is :func:`~.replica_loads.unload_on_every_replica`."""
    state = catalog_state(manager)
    if state is not None and several_replicas(manager):
        result = await unload_on_every_replica(manager, obj)
    else:
        result = await original(manager, obj, *args, **kwargs)
    if state is not None and getattr(result, "success", False):
        state.host_tier.remove(obj.lora_name)
        state.load_failures.clear(obj.lora_name)
    return result


def _follow_registry(manager: Any, tier: HostTier) -> None:
    """Names the tier holds that SGLang no longer has registered (its LRU unloaded them) leave
    the tier; registered names it does not know (``--lora-paths``) join it."""
    registered: Dict[str, Any] = manager.lora_registry.get_all_adapters()
    for name in [n for n in list(tier.names()) if n not in registered]:
        tier.remove(name)
    now = time.monotonic()
    for name, ref in registered.items():
        if name not in tier:
            tier.admit(name, host_bytes(manager, ref.lora_path), bool(ref.pinned), now)


def _held(manager: Any, state: ChameleonState) -> Set[str]:
    """Names a request holds (SGLang's in-flight counter above zero) or is loading."""
    counters = manager.lora_registry._counters
    held = {
        name
        for name, ref in manager.lora_registry.get_all_adapters().items()
        if ref.lora_id in counters and counters[ref.lora_id].value() > 0
    }
    return held | {name for name in state.host_tier.names() if name in state.loading}


def publish_host_tier(manager: Any, state: ChameleonState) -> None:
    """The host tier's gauges, where SGLang runs with ``--enable-metrics`` (rate-limited)."""
    state.host_tier_metrics.maybe_publish(time.monotonic(), lambda: catalog_stats(manager) or {})


def catalog_stats(manager: Any) -> Optional[Dict[str, Any]]:
    """The host tier's statistics (``/chameleon/stats``), or None without ``--chameleon``."""
    state = catalog_state(manager)
    if state is None:
        return None
    return state.host_tier.stats(
        {
            "loading": len(state.loading),
            "failures_remembered": len(state.load_failures),
            "registered": manager.lora_registry.num_registered_loras,
        }
    )
