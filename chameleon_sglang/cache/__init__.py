"""Chameleon's adapter cache (paper §4.2).

The core (``AdapterCache``, entries, eviction policies, the ``SlotStore`` interface) is free of
SGLang and torch. ``kv_layout`` (pure arithmetic), ``kv_store`` (a ``SlotStore`` over SGLang's KV
allocator, torch) and ``kv_allocator`` (SGLang's allocator made cache-aware) put it in KV memory;
import them explicitly.
"""

from chameleon_sglang.cache.adapter_cache import AdapterCache, CacheFullError
from chameleon_sglang.cache.entry import CacheEntry
from chameleon_sglang.cache.eviction import (
    EVICTION_POLICY_NAMES,
    EvictionPolicy,
    create_eviction_policy,
)
from chameleon_sglang.cache.store import FakeSlotStore, SlotStore

__all__ = [
    "AdapterCache",
    "CacheEntry",
    "CacheFullError",
    "EVICTION_POLICY_NAMES",
    "EvictionPolicy",
    "FakeSlotStore",
    "SlotStore",
    "create_eviction_policy",
]
