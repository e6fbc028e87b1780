"""Chameleon's adapter cache core (paper §4.2), free of SGLang and torch."""

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
