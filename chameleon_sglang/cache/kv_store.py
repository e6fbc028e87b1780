"""The adapter cache's memory: runs of free token slots of SGLang's KV cache.

:class:`KVSlotStore` implements the cache's ``SlotStore`` over SGLang's page-size-1 KV allocator
(``TokenToKVPoolAllocator``). An adapter takes one run of consecutive slot indices, cut from the
top of the highest free run, while SGLang allocates KV from the bottom of its sorted free list;
so adapters and KV meet only when memory is nearly full. Freed runs go back to the allocator.

The store never counts memory the cache holds as free: ``num_free_slots`` is what the allocator
could hand out now. ``alloc`` refuses a run that fragmentation makes impossible even though
enough slots are free in total; the cache never asks for one: it plans its evictions with
:meth:`KVSlotStore.free_runs_after` (the free runs there would be if some adapters were freed)
and evicts only when the plan makes a run.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

_run_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True, eq=False)
class KVRun:
    """Slots ``[start, start + length)``; identity-compared, each freed once."""

    start: int
    length: int
    run_id: int = dataclasses.field(default_factory=lambda: next(_run_ids))

    @property
    def stop(self) -> int:
        return self.start + self.length


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


def highest_run(free: torch.Tensor, length: int) -> Optional[int]:
    """Start of the top ``length`` slots of the highest run of consecutive indices in the sorted
    tensor ``free`` that is at least ``length`` long; None when no run is long enough."""
    if length <= 0 or free.numel() < length:
        return None
    starts, ends = free_runs(free)
    long_enough = torch.nonzero(ends - starts + 1 >= length).flatten()
    if long_enough.numel() == 0:
        return None
    top = int(free[ends[long_enough[-1]]]) + 1
    return top - length


class KVSlotStore:
    """``SlotStore`` over a page-size-1 SGLang KV allocator (see the module docstring)."""

    def __init__(self, allocator: Any, bytes_per_slot: int,
                 on_free: Optional[Callable[[KVRun], None]] = None) -> None:
        if getattr(allocator, "page_size", 1) != 1:
            raise ValueError("the KV slot store needs a page-size-1 KV allocator")
        if bytes_per_slot <= 0:
            raise ValueError(f"bytes_per_slot must be > 0, got {bytes_per_slot}")
        self.allocator = allocator
        self.bytes_per_slot = int(bytes_per_slot)
        self.on_free = on_free
        self.num_refused_for_fragmentation = 0
        self._live: set[int] = set()

    def num_free_slots(self) -> int:
        return free_slot_count(self.allocator)

    def slots_for_bytes(self, num_bytes: int) -> int:
        if num_bytes < 0:
            raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
        return -(-num_bytes // self.bytes_per_slot)

    def alloc(self, num_slots: int) -> Optional[KVRun]:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        if num_slots > self.num_free_slots():
            return None
        free = sorted_free_slots(self.allocator)
        start = highest_run(free, num_slots)
        if start is None:
            self.num_refused_for_fragmentation += 1
            return None
        keep = (free < start) | (free >= start + num_slots)
        self.allocator.free_pages = free[keep]
        run = KVRun(start, num_slots)
        self._live.add(run.run_id)
        return run

    def free(self, handle: object) -> None:
        if not isinstance(handle, KVRun) or handle.run_id not in self._live:
            raise ValueError(f"unknown or already freed KV run {handle!r}")
        self._live.discard(handle.run_id)
        if self.on_free is not None:
            self.on_free(handle)
        # Straight to the allocator's lists (not through ``free``, which a free group may
        # defer): the slots must be allocatable at once. An allocator that sorts its frees
        # merges ``release_pages`` when it runs short; one that does not only reads
        # ``free_pages``.
        allocator = self.allocator
        slots = torch.arange(handle.start, handle.stop, dtype=torch.int64,
                             device=allocator.free_pages.device)
        if allocator.need_sort:
            allocator.release_pages = torch.cat((allocator.release_pages, slots))
        else:
            allocator.free_pages = torch.cat((allocator.free_pages, slots))

    def free_runs_after(self, handles: Sequence[object]) -> "FreeRuns":
        """The free runs there would be if the live runs ``handles`` were freed too (nothing
        is freed)."""
        intervals: List[Tuple[int, int]] = []
        free = sorted_free_slots(self.allocator)
        if free.numel():
            starts, ends = free_runs(free)
            intervals = list(zip(free[starts].tolist(), (free[ends] + 1).tolist()))
        for handle in handles:
            if not isinstance(handle, KVRun) or handle.run_id not in self._live:
                raise ValueError(f"unknown or already freed KV run {handle!r}")
            intervals.append((handle.start, handle.stop))
        return FreeRuns(intervals)

    def joined_run_lengths(self, handles: Sequence[object]) -> List[int]:
        """For each live run in ``handles``: the length of the free run it would be part of if
        it alone were freed now (itself plus the free slots right below and above it). Lets the
        cache pick, among idle adapters, one whose eviction ends a fragmentation refusal."""
        below: Dict[int, int] = {}  # last free slot of a run -> its length
        above: Dict[int, int] = {}  # first free slot of a run -> its length
        free = sorted_free_slots(self.allocator)
        if free.numel():
            starts, ends = free_runs(free)
            lengths = (ends - starts + 1).tolist()
            below = dict(zip(free[ends].tolist(), lengths))
            above = dict(zip(free[starts].tolist(), lengths))
        result = []
        for handle in handles:
            if not isinstance(handle, KVRun) or handle.run_id not in self._live:
                raise ValueError(f"unknown or already freed KV run {handle!r}")
            result.append(below.get(handle.start - 1, 0) + handle.length
                          + above.get(handle.stop, 0))
        return result

    @property
    def num_live_runs(self) -> int:
        return len(self._live)


class FreeRuns:
    """Disjoint free intervals ``[start, stop)``, adjacent ones merged into runs."""

    def __init__(self, intervals: Sequence[Tuple[int, int]]) -> None:
        merged: List[List[int]] = []
        for start, stop in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        self.runs: List[Tuple[int, int]] = [(a, b) for a, b in merged]
        self._by_stop = {b: b - a for a, b in self.runs}
        self._by_start = {a: b - a for a, b in self.runs}

    @property
    def longest(self) -> int:
        return max((b - a for a, b in self.runs), default=0)

    def joined(self, handle: KVRun) -> int:
        """The run ``handle`` (not in these runs) would be part of if it were freed too."""
        return (self._by_stop.get(handle.start, 0) + handle.length
                + self._by_start.get(handle.stop, 0))
