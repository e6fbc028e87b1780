"""Invariant checks of the Chameleon bookkeeping inside one SGLang scheduler (debug aid).

:func:`check_integrity` returns every broken invariant as a sentence (empty: all hold):

- scheduler: each queue's quota usage is the sum of its running requests' charges; waiting
  requests wait once, in their own queue; requests the bridge tracks as running run;
- adapter cache: every resident adapter's reference count equals the requests holding it;
  nothing holds an adapter that is not resident; the pool's residents are the cache's;
- memory: cached adapters' runs are disjoint, inside the KV pool, never on the allocator's free
  lists (which hold no slot twice); free + cached <= total; when the scheduler is idle (nothing
  running or waiting), free + cached + SGLang's prefix cache == total (nothing leaked).

With ``CHAMELEON_CHECK_INTEGRITY=1`` in the server's environment the result is published under
``integrity`` in ``/chameleon/stats`` (and ``/server_info``); the test suite's servers run so and
assert it empty after their scenarios. Reads only; costs a pass over the free list.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, List

from chameleon_sglang.integration.state import state_of

ENV_FLAG = "CHAMELEON_CHECK_INTEGRITY"


def enabled() -> bool:
    return os.environ.get(ENV_FLAG, "") not in ("", "0")


def check_integrity(scheduler: Any) -> List[str]:
    """Every broken invariant of ``scheduler``'s Chameleon state (module docstring)."""
    problems: List[str] = []
    state = state_of(scheduler)
    if state is None:
        return problems
    if state.bridge is not None:
        problems += state.bridge.integrity_problems()
    cache = state.cache
    if cache is not None:
        problems += reference_problems(cache)
        problems += memory_problems(cache, idle=_is_idle(scheduler))
    return problems


def reference_problems(cache_bridge: Any) -> List[str]:
    cache_bridge.settle_finished()
    cache, pool = cache_bridge.cache, cache_bridge.pool
    holders = Counter(
        adapter for _, adapter in [*cache_bridge._holds.values(), *cache_bridge._pins.values()]
    )
    problems = []
    resident = set(cache.resident_ids())
    for uid in sorted(resident):
        refcount = cache.lookup(uid).refcount
        if refcount != holders.get(uid, 0):
            problems.append(
                f"adapter {uid}: refcount {refcount}, held by {holders.get(uid, 0)} requests"
            )
    for uid in sorted(set(holders) - resident):
        problems.append(f"adapter {uid} held by {holders[uid]} requests but not resident")
    if set(pool.resident) != resident:
        problems.append(
            f"pool residents {sorted(pool.resident)} != cache residents {sorted(resident)}"
        )
    return problems


def memory_problems(cache_bridge: Any, idle: bool) -> List[str]:
    import torch

    scheduler, cache = cache_bridge.scheduler, cache_bridge.cache
    allocator = scheduler.token_to_kv_pool_allocator
    total = int(scheduler.max_total_num_tokens)
    free_list = torch.cat((allocator.free_pages, allocator.release_pages)).tolist()
    free = set(free_list)
    problems = []
    if len(free) != len(free_list):
        problems.append(f"{len(free_list) - len(free)} slots twice on the free lists")
    held: set = set()
    for uid in cache.resident_ids():
        allocation = cache.lookup(uid).handle
        slots = set(allocation.slots())
        if len(slots) != allocation.num_slots:
            problems.append(f"adapter {uid}: its runs overlap each other")
        if slots and (min(slots) < 1 or max(slots) > total):
            problems.append(f"adapter {uid}: runs {allocation.runs} outside the KV pool")
        if slots & held:
            problems.append(f"adapter {uid}: run overlaps another adapter's")
        if slots & free:
            problems.append(
                f"adapter {uid}: {len(slots & free)} of its slots are on the free lists"
            )
        held |= slots
    if cache.num_slots_held != len(held):
        problems.append(f"cache counts {cache.num_slots_held} slots held, runs hold {len(held)}")
    if len(free) + len(held) > total:
        problems.append(f"free {len(free)} + cached {len(held)} > total {total}")
    tree = scheduler.tree_cache
    if idle and tree is not None:
        prefix = int(tree.evictable_size()) + int(getattr(tree, "protected_size", lambda: 0)())
        if len(free) + len(held) + prefix != total:
            problems.append(
                f"idle: free {len(free)} + cached {len(held)} + prefix cache "
                f"{prefix} != total {total} (leaked KV slots)"
            )
    return problems


def _is_idle(scheduler: Any) -> bool:
    running = getattr(scheduler, "running_batch", None)
    busy = running is not None and not running.is_empty()
    return (
        not busy and not scheduler.waiting_queue and getattr(scheduler, "last_batch", None) is None
    )
