"""What an adapter costs the scheduler: its rank (for WRS) and its memory in KV tokens.

Read from SGLang's LoRA manager (``configs``, ``loras``, ``max_lora_rank``) and KV pool. An
adapter's memory is charged to the quotas only where adapters live in the KV memory the quotas
divide (the adapter cache); with SGLang's own LoRA slots it is 0.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch


def weight_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors)


def adapter_weight_bytes(lora: Any) -> int:
    """Bytes of an SGLang ``LoRAAdapter``'s host weights (every layer)."""
    return weight_bytes(
        w for layer in getattr(lora, "layers", ()) for w in getattr(layer, "weights", {}).values()
    )


def lora_manager_of(scheduler: Any) -> Any:
    """The scheduler's LoRA manager (None without LoRA)."""
    try:
        return scheduler.tp_worker.model_runner.lora_manager
    except AttributeError:
        return None


class AdapterCosts:
    """Ranks and KV-token charges of the adapters one scheduler serves."""

    def __init__(self, lora_manager: Any, server_max_rank: Optional[int]) -> None:
        self.lora_manager = lora_manager
        ranks = self.loaded_ranks()
        self.max_rank = self._max_rank(server_max_rank, ranks)
        self.min_rank = min(ranks) if ranks else self.max_rank
        self.pool: Any = None  # the adapter cache's pool, once adapters live in KV memory
        self._tokens: Dict[str, int] = {}

    def charge_adapters_to_kv(self, pool: Any) -> None:
        """Adapters live in KV memory, in ``pool`` (the adapter cache's LoRA pool)."""
        self.pool = pool

    def loaded_ranks(self) -> List[int]:
        configs = getattr(self.lora_manager, "configs", {}) if self.lora_manager else {}
        return sorted(int(c.r) for c in configs.values())

    def rank(self, adapter: str) -> int:
        configs = getattr(self.lora_manager, "configs", {}) if self.lora_manager else {}
        config = configs.get(adapter)
        return int(config.r) if config is not None else self.max_rank

    def _max_rank(self, server_max_rank: Optional[int], ranks: List[int]) -> int:
        """The WRS rank normaliser: ``--max-lora-rank``, else what SGLang inferred from the
        adapters it loaded (its LoRA manager's ``max_lora_rank``), never below a loaded rank."""
        candidates = [server_max_rank, getattr(self.lora_manager, "max_lora_rank", None), *ranks]
        return max([int(c) for c in candidates if c] or [1])

    def adapter_tokens(self, adapter: Optional[str]) -> int:
        """Adapter memory in KV tokens (the KV slots the cache's layout gives it); 0 for the
        base model, for an adapter SGLang has not loaded, or where adapters do not live in KV
        memory."""
        if adapter is None or self.lora_manager is None or self.pool is None:
            return 0
        if adapter not in self._tokens:
            loaded = adapter in getattr(self.lora_manager, "loras", {})
            self._tokens[adapter] = (
                -(-self.pool.footprint_bytes(adapter) // self.pool.store.bytes_per_slot)
                if loaded
                else 0
            )
        return self._tokens[adapter]
