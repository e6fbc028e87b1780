"""Chameleon's adapter cache (paper §4.2), free of SGLang and torch.

``AdapterCache`` (check-then-act admission, references, tiered eviction), its entries, the
eviction policies and the ``SlotStore`` interface it draws memory through; ``kv_layout`` (how an
adapter's matrices pack into KV token slots, pure arithmetic) and ``arrival_histogram`` (the
predictive prefetch's model) are imported explicitly. The store over SGLang's KV memory is
:mod:`chameleon_sglang.memory.kv_store`.
"""

from chameleon_sglang.cache.adapter_cache import AdapterCache, CacheFullError
from chameleon_sglang.cache.entry import CacheEntry
from chameleon_sglang.cache.eviction import (
    EVICTION_POLICY_NAMES,
    EvictionPolicy,
    create_eviction_policy,
)
from chameleon_sglang.cache.store import SlotStore

__all__ = [
    "AdapterCache",
    "CacheEntry",
    "CacheFullError",
    "EVICTION_POLICY_NAMES",
    "EvictionPolicy",
    "SlotStore",
    "create_eviction_policy",
]
