"""SGLang's page-size-1 KV allocator, made aware of the adapter cache that borrows its slots.

Cached adapters hold KV token slots. For SGLang's budgets, its decode check and its idle leak
check, slots held by *idle* cached adapters count as available (like a radix cache's evictable
tokens), and an allocation that would otherwise fail first evicts idle adapters. Slots of adapters
in use by running requests count as used.

Order of giving way: SGLang's evictable prefix (radix) cache first, idle adapters second, as for an
adapter load
(:meth:`chameleon_sglang.integration.cache_bridge.CacheBridge._evict_prefix_cache_for`): an evicted
prefix costs a prefill if it is ever asked for again, an evicted adapter a reload at its next
request. SGLang evicts its tree before an allocation only for the shortfall against
``available_size()``, which counts idle adapters as free, so without
:meth:`CacheAwareTokenAllocator.evict_to_free_tokens` every allocation would take adapters' slots
while the tree kept growing with finished requests' tokens.

The allocator is built as :class:`CacheAwareTokenAllocator` from the start where the adapter
cache serves (:func:`cache_aware_copy`, called from the hook on SGLang's allocator construction);
until :func:`make_cache_aware` binds the cache to it, it behaves exactly as SGLang's own.
"""

from __future__ import annotations

from typing import Any, List, Optional, Protocol

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from chameleon_sglang.memory.kv_store import free_slot_count


class BorrowedSlots(Protocol):
    """What the allocator asks of the adapter cache."""

    def reclaimable_slots(self) -> int:
        """Slots held by idle cached adapters."""
        ...

    def free_slots_for(self, num_slots: int) -> None:
        """Evict idle adapters until the allocator has ``num_slots`` free (best effort)."""
        ...

    def held_slots(self) -> List[int]:
        """Every slot index cached adapters hold (idle or in use)."""
        ...


class CacheAwareTokenAllocator(TokenToKVPoolAllocator):
    """``TokenToKVPoolAllocator`` whose idle-adapter slots are available on demand (once bound)."""

    chameleon_slots: Optional[BorrowedSlots] = None

    def available_size(self) -> int:
        if self.chameleon_slots is None:
            return super().available_size()
        return free_slot_count(self) + self.chameleon_slots.reclaimable_slots()

    def evict_to_free_tokens(self, tree_cache: Any, num_tokens: int) -> Optional[bool]:
        """SGLang's eviction before an allocation (and its decode check), bound: the prefix
        cache gives way for the shortfall against *free* slots, so idle adapters are evicted
        (by :meth:`alloc`) only for what the prefix cache could not free."""
        if self.chameleon_slots is None:
            return super().evict_to_free_tokens(tree_cache, num_tokens)
        if tree_cache is None or not tree_cache.supports_prefix_sharing():
            return None
        shortfall = num_tokens - free_slot_count(self)
        if shortfall > 0 and tree_cache.evictable_size() > 0:
            from sglang.srt.mem_cache.base_prefix_cache import EvictParams

            tree_cache.evict_for_alloc(EvictParams(num_tokens=shortfall))
        return None

    def clear(self) -> None:
        """SGLang's reset of the whole pool (``/flush_cache``, when no request runs) frees every
        slot; once bound, the slots cached adapters hold stay out of the free list (their
        weights live there; handing them out as KV would overwrite them, and freeing them
        again on eviction would count them twice)."""
        super().clear()
        if self.chameleon_slots is None:
            return
        held = self.chameleon_slots.held_slots()
        if held:
            held_t = torch.tensor(held, dtype=self.free_pages.dtype, device=self.free_pages.device)
            self.free_pages = self.free_pages[~torch.isin(self.free_pages, held_t)]

    def alloc(self, need_size: int) -> Any:
        if self.chameleon_slots is not None:
            if need_size > free_slot_count(self):
                self.chameleon_slots.free_slots_for(need_size)
            if need_size > len(self.free_pages) and len(self.release_pages):
                self.merge_and_sort_free()
        return super().alloc(need_size)


def cache_aware_copy(allocator: Any) -> Any:
    """A fresh, unused ``CacheAwareTokenAllocator`` with ``allocator``'s parameters when
    ``allocator`` is exactly SGLang's page-size-1 ``TokenToKVPoolAllocator``; else ``allocator``
    itself (the binding then refuses it, naming its type)."""
    if type(allocator) is not TokenToKVPoolAllocator:
        return allocator
    return CacheAwareTokenAllocator(
        allocator.size, allocator.dtype, allocator.device, allocator._kvcache, allocator.need_sort
    )


def make_cache_aware(allocator: Any, slots: BorrowedSlots) -> None:
    """Bind the adapter cache's ``slots`` to ``allocator`` (built as the cache-aware class)."""
    if not isinstance(allocator, CacheAwareTokenAllocator):
        raise TypeError(
            f"the adapter cache needs the page-size-1 KV allocator built as "
            f"CacheAwareTokenAllocator, not {type(allocator).__name__}"
        )
    if allocator.chameleon_slots is not None:
        raise TypeError("this KV allocator already lends its slots to an adapter cache")
    allocator.chameleon_slots = slots
