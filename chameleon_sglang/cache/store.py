"""Where the cache's bytes come from: a pool of memory slots shared with the KV cache."""

from __future__ import annotations

from typing import Optional, Protocol, Sequence


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
