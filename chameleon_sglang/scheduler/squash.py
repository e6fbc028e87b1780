"""Squash-and-requeue (paper §4.3): which running bypass requests give way to a refused head.

A bypass lets a younger request with a resident adapter run ahead of a queue head whose adapter
could not be placed, on the bet that it finishes before the head's memory frees. When the head
is refused again and the memory those bypass requests hold is what keeps it out, the youngest of
them (as few as needed) are squashed: taken out of the running batch and requeued behind the
head (:meth:`~chameleon_sglang.scheduler.MultiLevelQueue.squash`).

Pure functions over the policy's queue and plain numbers; the engine integration measures the
numbers (KV tokens needed and free, KV tokens each request holds) and takes the requests out.
"""

from __future__ import annotations

from typing import Container, Iterable, List, Tuple

from chameleon_sglang.scheduler.entry import RequestEntry
from chameleon_sglang.scheduler.multi_level_queue import MultiLevelQueue


def squash_order(
    queue: MultiLevelQueue, head_id: str, exclude: Container[str] = ()
) -> List[RequestEntry]:
    """The running bypass requests that may give way to ``head_id``, youngest first: those of
    its own queue admitted after it arrived (not in ``exclude``). Empty unless ``head_id`` is
    the head of its queue."""
    if head_id not in queue:
        return []
    head = queue.get(head_id)
    if queue.head(head.queue) is not head:
        return []
    younger = [
        e
        for e in queue.running_bypasses()
        if e.queue == head.queue and e.order > head.order and e.request_id not in exclude
    ]
    return sorted(younger, key=lambda e: e.order, reverse=True)


def choose_victims(need: int, free: int, held: Iterable[Tuple[str, int]]) -> List[str]:
    """Request ids to squash, taken in ``held`` order (``(request id, tokens it holds)``), as
    few as bring ``free`` up to ``need``; empty when even all of them would not (the bypass
    then keeps running: the head's memory has not freed yet either)."""
    chosen: List[str] = []
    for request_id, tokens in held:
        if free >= need:
            break
        chosen.append(request_id)
        free += tokens
    return chosen if chosen and free >= need else []


def admission_need(
    prompt_tokens: int, max_new_tokens: int, clip_new_tokens: int, missing_adapter_tokens: int
) -> int:
    """KV tokens an engine that reserves ``prompt + min(max_new, clip)`` needs to admit a
    request, plus its adapter's tokens when the adapter is not resident (0 when it is)."""
    return prompt_tokens + min(max_new_tokens, clip_new_tokens) + missing_adapter_tokens
