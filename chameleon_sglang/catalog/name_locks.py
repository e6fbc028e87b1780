"""One asyncio lock per adapter name, held while the name is being loaded (no SGLang)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Dict, List, Sequence, Tuple


class NameLocks:
    """One asyncio lock per adapter name, held while the name is being loaded; a lock lives only
    while someone holds or waits for it (a burst of distinct names leaves nothing behind)."""

    def __init__(self) -> None:
        self._locks: Dict[str, Tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, names: Sequence[str]) -> AsyncIterator[None]:
        """Hold the locks of ``names`` (taken in sorted order: no deadlock between requests)."""
        ordered = sorted(set(names))
        for name in ordered:
            lock, users = self._locks.get(name, (asyncio.Lock(), 0))
            self._locks[name] = (lock, users + 1)
        taken: List[asyncio.Lock] = []
        try:
            for name in ordered:
                await self._locks[name][0].acquire()
                taken.append(self._locks[name][0])
            yield
        finally:
            for lock in taken:
                lock.release()
            for name in ordered:
                lock, users = self._locks[name]
                if users == 1:
                    del self._locks[name]
                else:
                    self._locks[name] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)

    def __contains__(self, name: str) -> bool:
        """True while someone holds or waits for ``name``'s lock."""
        return name in self._locks
