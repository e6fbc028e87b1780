"""Where the cache's bytes come from: a pool of memory slots shared with the KV cache."""

from __future__ import annotations

from typing import Dict, Optional, Protocol, Sequence, Set


class SlotStore(Protocol):
    """Memory the adapter cache borrows, in slots (e.g. free KV-cache token slots).

    Contract:
    - ``slots_for_bytes(n)`` is the number of slots an adapter of ``n`` bytes occupies (> 0 for
      ``n > 0``) and does not change over the store's life.
    - ``alloc(k, pieces)`` returns None when ``k > num_free_slots()``. ``pieces`` (optional,
      slot counts) is another way to hold the same adapter, in separate runs. A store that
      needs contiguous runs may also return None when free slots are too fragmented for
      either; such a store offers ``free_runs_after(handles)``: an object whose
      ``place(k, pieces)`` is not None exactly when ``alloc(k, pieces)`` would succeed if
      ``handles`` were freed too, and whose ``with_freed(handle)`` adds one more. The cache plans
      its evictions with it, so ``can_admit`` is exact for both kinds of store.
    - ``slots_held(handle)`` is the number of slots that allocation holds (``k``, or the
      pieces' sum where the store used them).
    - ``free(handle)`` returns exactly the slots of that allocation; each handle is freed once.
    """

    def num_free_slots(self) -> int:
        """Slots that no one (KV or cache) holds now."""
        ...

    def slots_for_bytes(self, num_bytes: int) -> int:
        """Slots needed to hold ``num_bytes``."""
        ...

    def alloc(self, num_slots: int, pieces: Sequence[int] = ()) -> Optional[object]:
        """Take ``num_slots`` slots (or ``pieces``); an opaque handle, or None when there is not
        enough room."""
        ...

    def slots_held(self, handle: object) -> int:
        """Slots the allocation ``handle`` holds."""
        ...

    def free(self, handle: object) -> None:
        """Give back the slots of ``handle``."""
        ...


class FakeSlotStore:
    """A strict in-memory ``SlotStore`` for tests: counts slots, checks every handle.

    Handles are increasing integers never reused, so a double free or a foreign handle raises
    ``ValueError``. Tests may also ``alloc`` directly to play the KV cache.
    """

    def __init__(self, total_slots: int, bytes_per_slot: int) -> None:
        if total_slots < 0 or bytes_per_slot <= 0:
            raise ValueError("total_slots must be >= 0 and bytes_per_slot > 0")
        self.total_slots = total_slots
        self.bytes_per_slot = bytes_per_slot
        self._allocations: Dict[int, int] = {}
        self._freed: Set[int] = set()
        self._next_handle = 1

    @property
    def num_allocated_slots(self) -> int:
        """Slots held by live allocations."""
        return sum(self._allocations.values())

    def allocations(self) -> Dict[int, int]:
        """Live handles and their slot counts (a copy)."""
        return dict(self._allocations)

    def num_free_slots(self) -> int:
        return self.total_slots - self.num_allocated_slots

    def slots_for_bytes(self, num_bytes: int) -> int:
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        return -(-num_bytes // self.bytes_per_slot)

    def slots_held(self, handle: object) -> int:
        if not isinstance(handle, int) or handle not in self._allocations:
            raise ValueError(f"unknown slot handle {handle!r}")
        return self._allocations[handle]

    def alloc(self, num_slots: int, pieces: Sequence[int] = ()) -> Optional[int]:
        """Never fragments: always ``num_slots`` in one piece (``pieces`` are not needed)."""
        if num_slots <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        if num_slots > self.num_free_slots():
            return None
        handle = self._next_handle
        self._next_handle += 1
        self._allocations[handle] = num_slots
        return handle

    def free(self, handle: object) -> None:
        if isinstance(handle, int) and handle in self._freed:
            raise ValueError(f"double free of slot handle {handle!r}")
        if not isinstance(handle, int) or handle not in self._allocations:
            raise ValueError(f"unknown slot handle {handle!r}")
        del self._allocations[handle]
        self._freed.add(handle)
