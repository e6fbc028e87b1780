"""Rank 0's value on every tensor-parallel rank: what keeps the scheduler clock identical."""

from __future__ import annotations

from typing import Any, Callable, Optional


def tensor_parallel_broadcast() -> Optional[Callable[[float], float]]:
    """A rank-0 broadcast over SGLang's TP CPU group, or None with a single rank."""
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.utils.common import broadcast_pyobj

    parallel = get_parallel()
    if parallel.tp_size == 1:
        return None
    group = parallel.tp_group

    def broadcast(value: float) -> float:
        data: Any = [value] if group.rank == group.ranks[0] else None
        return float(broadcast_pyobj(data, group.rank, group.cpu_group, src=group.ranks[0])[0])

    return broadcast
