"""The adapter cache's memory: runs of free token slots of SGLang's KV cache.

:class:`KVSlotStore` implements the cache's ``SlotStore`` over SGLang's page-size-1 KV allocator
(``TokenToKVPoolAllocator``). An adapter takes one run of consecutive slot indices, cut from the
top of the highest free run, while SGLang allocates KV from the bottom of its sorted free list;
so adapters and KV meet only when memory is nearly full. Where no free run is long enough, an
adapter with a split layout takes its *pieces* instead: each a run of its own, placed best-fit
(largest piece first, into the shortest free run that holds it, the highest of equals). Freed
runs go back to the allocator.

The store never counts memory the cache holds as free: ``num_free_slots`` is what the allocator
could hand out now. ``alloc`` refuses what fragmentation makes impossible even though enough
slots are free in total; the cache never asks for it: it plans its evictions with
:meth:`KVSlotStore.free_runs_after` (the free runs there would be if some adapters were freed,
and :meth:`FreeRuns.place`, the very placement ``alloc`` makes) and evicts only when the plan
places the adapter.

``CHAMELEON_SPLIT_ADAPTERS=1`` in the environment makes every store place an adapter with a split
layout in its pieces even where one run would do: a test setting, which exercises the split path
on memory that is not fragmented.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

_allocation_ids = itertools.count(1)
SPLIT_ENV = "CHAMELEON_SPLIT_ADAPTERS"


@dataclasses.dataclass(frozen=True)
class KVRun:
    """Slots ``[start, start + length)``."""

    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclasses.dataclass(frozen=True, eq=False)
class KVAllocation:
    """An adapter's slots: one run (``split`` False), or one run per piece of its split layout,
    in the pieces' order. Identity-compared, each freed once."""

    runs: Tuple[KVRun, ...]
    split: bool = False
    allocation_id: int = dataclasses.field(default_factory=lambda: next(_allocation_ids))

    @property
    def num_slots(self) -> int:
        return sum(run.length for run in self.runs)

    def slots(self) -> List[int]:
        """Every slot index held, in run order."""
        return [s for run in self.runs for s in range(run.start, run.stop)]


def free_slot_count(allocator: Any) -> int:
    """Slots the allocator holds free (free list plus frees not yet merged)."""
    return len(allocator.free_pages) + len(allocator.release_pages)


def sorted_free_slots(allocator: Any) -> torch.Tensor:
    """Merge the allocator's pending frees into its free list, sort it, and return it.

    Sorting keeps SGLang allocating KV from the lowest free indices, away from cached adapters.
    """
    merged = torch.cat((allocator.free_pages, allocator.release_pages))
    merged, _ = torch.sort(merged)
    allocator.free_pages = merged
    allocator.release_pages = merged.new_empty((0,))
    return merged


def free_runs(free: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions in the sorted, non-empty tensor ``free`` of the first and the last element of
    every run of consecutive indices."""
    breaks = torch.nonzero(free[1:] - free[:-1] != 1).flatten()
    ends = torch.cat((breaks, free.new_tensor([free.numel() - 1])))
    starts = torch.cat((free.new_zeros(1), breaks + 1))
    return starts, ends


class KVSlotStore:
    """``SlotStore`` over a page-size-1 SGLang KV allocator (see the module docstring)."""

    def __init__(
        self,
        allocator: Any,
        bytes_per_slot: int,
        on_free: Optional[Callable[[KVAllocation], None]] = None,
        split_always: Optional[bool] = None,
    ) -> None:
        if getattr(allocator, "page_size", 1) != 1:
            raise ValueError("the KV slot store needs a page-size-1 KV allocator")
        if bytes_per_slot <= 0:
            raise ValueError(f"bytes_per_slot must be > 0, got {bytes_per_slot}")
        self.allocator = allocator
        self.bytes_per_slot = int(bytes_per_slot)
        self.on_free = on_free
        self.split_always = (
            os.environ.get(SPLIT_ENV, "") not in ("", "0") if split_always is None else split_always
        )
        self.num_refused_for_fragmentation = 0
        self.num_split_allocations = 0
        self._live: set[int] = set()

    def num_free_slots(self) -> int:
        return free_slot_count(self.allocator)

    def slots_for_bytes(self, num_bytes: int) -> int:
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        return -(-num_bytes // self.bytes_per_slot)

    def slots_held(self, handle: object) -> int:
        return self._check(handle).num_slots

    def alloc(self, num_slots: int, pieces: Sequence[int] = ()) -> Optional[KVAllocation]:
        """One run of ``num_slots``, else (``pieces`` given) a run per piece; None when
        fragmentation (or the count) allows neither."""
        if num_slots <= 0 or any(p <= 0 for p in pieces):
            raise ValueError(f"num_slots and pieces must be > 0, got {num_slots}, {pieces}")
        if min(num_slots, sum(pieces) or num_slots) > self.num_free_slots():
            return None
        free = sorted_free_slots(self.allocator)
        runs = _free_runs_of(free, self.split_always)
        placed = runs.place(num_slots, pieces)
        if placed is None:
            self.num_refused_for_fragmentation += 1
            return None
        keep = torch.ones_like(free, dtype=torch.bool)
        for run in placed:
            keep &= (free < run.start) | (free >= run.stop)
        self.allocator.free_pages = free[keep]
        handle = KVAllocation(
            tuple(placed), split=len(placed) != 1 or placed[0].length != num_slots
        )
        self.num_split_allocations += handle.split
        self._live.add(handle.allocation_id)
        return handle

    def free(self, handle: object) -> None:
        allocation = self._check(handle)
        self._live.discard(allocation.allocation_id)
        if self.on_free is not None:
            self.on_free(allocation)
        # Straight to the allocator's lists (not through ``free``, which a free group may
        # defer): the slots must be allocatable at once. An allocator that sorts its frees
        # merges ``release_pages`` when it runs short; one that does not only reads
        # ``free_pages``.
        allocator = self.allocator
        slots = torch.tensor(
            allocation.slots(), dtype=torch.int64, device=allocator.free_pages.device
        )
        if allocator.need_sort:
            allocator.release_pages = torch.cat((allocator.release_pages, slots))
        else:
            allocator.free_pages = torch.cat((allocator.free_pages, slots))

    def free_runs_after(self, handles: Sequence[object]) -> FreeRuns:
        """The free runs there would be if the live allocations ``handles`` were freed too
        (nothing is freed)."""
        runs = _free_runs_of(sorted_free_slots(self.allocator), self.split_always)
        extra = [(run.start, run.stop) for h in handles for run in self._check(h).runs]
        return FreeRuns(runs.runs + extra, self.split_always) if extra else runs

    @property
    def num_live_runs(self) -> int:
        return len(self._live)

    def _check(self, handle: object) -> KVAllocation:
        if not isinstance(handle, KVAllocation) or handle.allocation_id not in self._live:
            raise ValueError(f"unknown or already freed KV allocation {handle!r}")
        return handle


def _free_runs_of(free: torch.Tensor, pieces_first: bool = False) -> FreeRuns:
    if not free.numel():
        return FreeRuns([], pieces_first)
    starts, ends = free_runs(free)
    return FreeRuns(list(zip(free[starts].tolist(), (free[ends] + 1).tolist())), pieces_first)


class FreeRuns:
    """Disjoint free intervals ``[start, stop)``, adjacent ones merged into runs; kept sorted by
    position and by length, so that :meth:`with_freed` and :meth:`place` cost list copies and
    bisections, not a Python pass over every run. ``pieces_first``: place an adapter that has
    pieces in them even where one run would do (the test setting of the module docstring)."""

    def __init__(self, intervals: Sequence[Tuple[int, int]], pieces_first: bool = False) -> None:
        self.pieces_first = pieces_first
        merged: List[List[int]] = []
        for start, stop in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        self.runs: List[Tuple[int, int]] = [(a, b) for a, b in merged]
        self._by_length: List[Tuple[int, int]] = sorted((b - a, a) for a, b in self.runs)

    @property
    def longest(self) -> int:
        return self._by_length[-1][0] if self._by_length else 0

    def with_freed(self, handle: KVAllocation) -> FreeRuns:
        """These runs with ``handle``'s runs (disjoint from them) freed too."""
        result = FreeRuns.__new__(FreeRuns)
        result.runs, result._by_length = list(self.runs), list(self._by_length)
        result.pieces_first = self.pieces_first
        for run in handle.runs:
            result._add(run.start, run.stop)
        return result

    def _add(self, start: int, stop: int) -> None:
        runs, by_length = self.runs, self._by_length
        i = bisect.bisect_left(runs, (start, stop))
        if i < len(runs) and runs[i][0] == stop:  # joins the run above
            above = runs.pop(i)
            by_length.remove((above[1] - above[0], above[0]))
            stop = above[1]
        if i > 0 and runs[i - 1][1] == start:  # joins the run below
            below = runs.pop(i - 1)
            by_length.remove((below[1] - below[0], below[0]))
            start, i = below[0], i - 1
        runs.insert(i, (start, stop))
        bisect.insort(by_length, (stop - start, start))

    def place(self, num_slots: int, pieces: Sequence[int] = ()) -> Optional[List[KVRun]]:
        """Where :meth:`KVSlotStore.alloc` puts an adapter in these runs (nothing changes):
        the top ``num_slots`` of the highest run that long; else, with ``pieces``, one run per
        piece in their order (best-fit, largest piece first, each at the top of the shortest
        remaining run that holds it, the highest of equals); None when neither fits."""
        if self.longest >= num_slots and not (self.pieces_first and pieces):
            start, stop = next(r for r in reversed(self.runs) if r[1] - r[0] >= num_slots)
            return [KVRun(stop - num_slots, num_slots)]
        if not pieces or self.longest < max(pieces):
            return None
        available = list(self._by_length)
        placed: Dict[int, KVRun] = {}
        for i in sorted(range(len(pieces)), key=lambda i: (-pieces[i], i)):
            need = pieces[i]
            j = bisect.bisect_left(available, (need, -1))
            if j == len(available):
                return None
            length = available[j][0]
            length, run_start = available.pop(bisect.bisect_left(available, (length + 1, -1)) - 1)
            placed[i] = KVRun(run_start + length - need, need)
            if length > need:
                bisect.insort(available, (length - need, run_start))
        return [placed[i] for i in range(len(pieces))]
