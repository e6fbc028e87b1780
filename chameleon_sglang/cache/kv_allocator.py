"""SGLang's page-size-1 KV allocator, made aware of the adapter cache that borrows its slots.

Cached adapters hold KV token slots. For SGLang's budgets, its decode check and its idle leak
check, slots held by *idle* cached adapters count as available (like a radix cache's evictable
tokens), and an allocation that would otherwise fail first evicts idle adapters. Slots of adapters
in use by running requests count as used. :func:`make_cache_aware` switches an existing
allocator instance to this behaviour; nothing else about it changes.
"""

from __future__ import annotations

from typing import Any, Protocol

from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from chameleon_sglang.cache.kv_store import free_slot_count


class BorrowedSlots(Protocol):
    """What the allocator asks of the adapter cache."""

    def reclaimable_slots(self) -> int:
        """Slots held by idle cached adapters."""
        ...

    def free_slots_for(self, num_slots: int) -> None:
        """Evict idle adapters until the allocator has ``num_slots`` free (best effort)."""
        ...


class CacheAwareTokenAllocator(TokenToKVPoolAllocator):
    """``TokenToKVPoolAllocator`` whose idle-adapter slots are available on demand."""

    chameleon_slots: BorrowedSlots

    def available_size(self) -> int:
        return free_slot_count(self) + self.chameleon_slots.reclaimable_slots()

    def alloc(self, need_size: int) -> Any:
        if need_size > free_slot_count(self):
            self.chameleon_slots.free_slots_for(need_size)
        if need_size > len(self.free_pages) and len(self.release_pages):
            self.merge_and_sort_free()
        return super().alloc(need_size)


def make_cache_aware(allocator: Any, slots: BorrowedSlots) -> None:
    """Switch ``allocator`` (exactly a ``TokenToKVPoolAllocator``) to the cache-aware class."""
    if type(allocator) is not TokenToKVPoolAllocator:
        raise TypeError(f"the adapter cache supports SGLang's page-size-1 TokenToKVPoolAllocator,"
                        f" not {type(allocator).__name__}")
    allocator.chameleon_slots = slots
    allocator.__class__ = CacheAwareTokenAllocator
