"""Small integer ids of resident adapters: the "buffer ids" SGLang's LoRA manager and backend
index ``lora_ranks``/``scalings`` and weights by.

Id 0 is the base model, always. An adapter takes a free id when it becomes resident (the most
recently freed first, else the lowest never used) and gives it back when it leaves. When ids run out
their number doubles, up to ``limit`` where one is set (a GPU device location table, sized once:
captured graphs read it in place). ``id_of`` and ``uid_of`` are the maps SGLang reads
(``uid_to_buffer_id``, ``buffer_id_to_uid``).
"""

from __future__ import annotations

from typing import Dict, List, Optional

BASE_ID = 0
INITIAL_CAPACITY = 64


class AdapterIds:
    """Ids ``1 .. capacity - 1`` for resident adapters; ``capacity`` grows (module docstring)."""

    def __init__(self, capacity: int = INITIAL_CAPACITY) -> None:
        if capacity < 2:
            raise ValueError(
                f"capacity must leave room for an adapter besides the base, got {capacity}"
            )
        self.capacity = capacity
        self.limit: Optional[int] = None
        self.id_of: Dict[Optional[str], int] = {None: BASE_ID}
        self.uid_of: List[Optional[str]] = [None]
        self._free: List[int] = list(range(capacity - 1, BASE_ID, -1))

    def can_take(self) -> bool:
        """An id is free, or the capacity may still grow."""
        return bool(self._free) or self.limit is None or self.capacity < self.limit

    def take(self, uid: str) -> int:
        """A free id, now ``uid``'s (growing the capacity if none is free)."""
        if not self._free:
            old = self.capacity
            new = 2 * old if self.limit is None else min(2 * old, self.limit)
            if new <= old:
                raise RuntimeError(f"no adapter id free: all {old - 1} are held")
            self.capacity = new
            self._free = list(range(new - 1, old - 1, -1))
        adapter_id = self._free.pop()
        while len(self.uid_of) <= adapter_id:
            self.uid_of.append(None)
        self.id_of[uid] = adapter_id
        self.uid_of[adapter_id] = uid
        return adapter_id

    def release(self, uid: str) -> int:
        """``uid`` is no longer resident: its id is free again (and returned)."""
        adapter_id = self.id_of.pop(uid)
        self.uid_of[adapter_id] = None
        self._free.append(adapter_id)
        return adapter_id
