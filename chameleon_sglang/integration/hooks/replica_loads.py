"""Adapter loads and unloads at run time with ``--dp-size > 1`` (launcher process, ``--chameleon``).

SGLang's ``TokenizerManager.load_lora_adapter`` and ``unload_lora_adapter`` assert one replica
("data-parallel replicas are not supported for dynamic lora loading"), yet what they drive already
reaches every replica: the tokenizer's fan-out communicator waits for one answer per DP rank, the
DP controller sends control messages to every replica, and each replica's scheduler loads into its
own LoRA manager (in the background: ``hooks/adapter_loads.py``). With ``--chameleon`` and several
replicas, these two functions stand in for SGLang's: the same steps without the assertion, so an
adapter (from ``/load_lora_adapter`` or from an adapter directory) is registered once it is in
every replica's host memory, and affinity dispatch sends its requests to any replica.

:func:`load_on_every_replica` repeats the body of SGLang's ``load_lora_adapter`` after its
assertion (SGLang's own helpers for merging the replicas' answers and for its count-based LRU);
``tests/integration/test_seams.py`` fails when SGLang's body changes at a new pin.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def several_replicas(manager: Any) -> bool:
    """Whether the server runs more than one data-parallel replica."""
    return int(getattr(manager.server_args, "dp_size", 1) or 1) > 1


async def load_on_every_replica(manager: Any, obj: Any) -> Any:
    """``TokenizerManager.load_lora_adapter`` for several replicas: loaded on every replica or
    on none (a failed replica's answer wins), then registered; ``--max-loaded-loras`` applied as
    SGLang applies it. Returns SGLang's ``LoadLoRAAdapterReqOutput``."""
    from sglang.srt.lora.lora_registry import LoRARef
    from sglang.srt.managers.io_struct import LoadLoRAAdapterReqOutput
    from sglang.srt.managers.tokenizer_control_mixin import (
        _lora_load_needs_cleanup,
        _merge_lora_update_results,
    )
    from sglang.srt.runtime_context import get_lora

    manager.auto_create_handle_loop()
    if not get_lora().enable_lora:
        return LoadLoRAAdapterReqOutput(success=False, error_message="LoRA is not enabled.")
    logger.info("Loading LoRA adapter %s from %s on every replica", obj.lora_name, obj.lora_path)
    async with manager.lora_update_lock:
        if obj.lora_name in manager.pending_lora_unloads:
            return LoadLoRAAdapterReqOutput(
                success=False,
                error_message=f"LoRA adapter '{obj.lora_name}' has an incomplete unload. "
                "Retry the unload before loading it again.",
            )
        ref = LoRARef(lora_name=obj.lora_name, lora_path=obj.lora_path, pinned=obj.pinned)
        obj.lora_id = ref.lora_id
        answers = await manager.update_lora_adapter_communicator(obj)
        result = _merge_lora_update_results(answers)
        if result.success:
            await manager.lora_registry.register(ref)
            manager.lora_ref_cache[obj.lora_name] = ref
        elif obj.lora_name not in manager.lora_registry.get_all_adapters() and (
            _lora_load_needs_cleanup(answers, obj.lora_name)
        ):
            manager.pending_lora_unloads[obj.lora_name] = ref.lora_id
        try:
            await _apply_max_loaded_loras(manager, result)
        except ValueError as exc:
            return LoadLoRAAdapterReqOutput(success=False, error_message=str(exc))
        return result


async def _apply_max_loaded_loras(manager: Any, result: Any) -> None:
    """SGLang's count-based LRU (``--max-loaded-loras``), with ``lora_update_lock`` held."""
    from sglang.srt.managers.io_struct import UnloadLoRAAdapterReqInput
    from sglang.srt.runtime_context import get_lora

    limit = get_lora().max_loaded_loras
    while limit is not None and manager.lora_registry.num_registered_loras > limit:
        name = await manager.lora_registry.lru_lora_name(exclude_pinned=True)
        if name is None:
            raise ValueError("Didn't find any LoRA adapters when trying to evict LRU LoRA adapter.")
        out = await manager._unload_lora_adapter_locked(UnloadLoRAAdapterReqInput(lora_name=name))
        if not out.success:
            raise ValueError(
                f"Error while unloading LRU LoRA adapter '{name}': {out.error_message}"
            )
        result.loaded_adapters.pop(name, None)


async def unload_on_every_replica(manager: Any, obj: Any) -> Any:
    """``TokenizerManager.unload_lora_adapter`` for several replicas: SGLang's own locked unload
    (it waits for the adapter's requests, then unloads it on every replica)."""
    from sglang.srt.managers.io_struct import UnloadLoRAAdapterReqOutput
    from sglang.srt.runtime_context import get_lora

    manager.auto_create_handle_loop()
    if not get_lora().enable_lora:
        return UnloadLoRAAdapterReqOutput(success=False, error_message="LoRA is not enabled.")
    if obj.lora_name is None:
        return UnloadLoRAAdapterReqOutput(success=False, error_message="lora_name is missing")
    logger.info("Unloading LoRA adapter %s on every replica", obj.lora_name)
    async with manager.lora_update_lock:
        try:
            return await manager._unload_lora_adapter_locked(obj)
        except ValueError as exc:
            return UnloadLoRAAdapterReqOutput(success=False, error_message=str(exc))
