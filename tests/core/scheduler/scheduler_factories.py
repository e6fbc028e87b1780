"""Factories for the scheduler policy tests: entries, queues, policies and scripted engines."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.scheduler import (
    AdmitResult,
    ChameleonPolicy,
    MultiLevelQueue,
    QueueLayout,
    RequestEntry,
    SizeLimits,
)

ADMITTED = AdmitResult.ADMITTED
QUEUE_MISFIT = AdmitResult.QUEUE_MISFIT
ADAPTER_MISFIT = AdmitResult.ADAPTER_MISFIT
STOP = AdmitResult.STOP

# Four queues: WRS 0.1 -> 0, 0.3 -> 1, 0.6 -> 2, 0.9 -> 3.
FOUR_CUTOFFS = (0.2, 0.45, 0.75)
WRS_OF_QUEUE = (0.1, 0.3, 0.6, 0.9)


def make_limits(
    max_input: int = 1000, max_output: int = 1000, max_rank: int = 64, min_rank: int = 8
) -> SizeLimits:
    return SizeLimits(max_input, max_output, max_rank, min_rank)


def make_entry(
    request_id: str,
    *,
    queue: int = 0,
    charge: int = 10,
    adapter_id: str | None = "a0",
    predicted_output: int = 1,
    arrival_s: float = 0.0,
) -> RequestEntry:
    """An entry with WRS in the middle of ``queue`` (of FOUR_CUTOFFS) and the given charge."""
    return RequestEntry(
        request_id=request_id,
        adapter_id=adapter_id,
        input_len=charge - predicted_output,
        max_new_tokens=max(predicted_output, 1) * 4,
        predicted_output=predicted_output,
        rank=8,
        wrs=WRS_OF_QUEUE[queue],
        arrival_s=arrival_s,
    )


def make_queue(
    quotas: Sequence[int] = (100, 100, 100, 100),
    *,
    cutoffs: Sequence[float] | None = None,
    bypass: bool = True,
) -> MultiLevelQueue:
    if cutoffs is None:
        cutoffs = FOUR_CUTOFFS[: len(quotas) - 1]
    return MultiLevelQueue(QueueLayout(tuple(cutoffs)), list(quotas), bypass=bypass)


def fill(mlq: MultiLevelQueue, spec: Sequence[tuple[int, int]], prefix: str = "r") -> List[str]:
    """Add one entry per ``(queue, charge)``; returns their ids (``r0``, ``r1``, ...)."""
    ids = []
    for i, (queue, charge) in enumerate(spec):
        rid = f"{prefix}{i}"
        mlq.add(make_entry(rid, queue=queue, charge=charge))
        ids.append(rid)
    return ids


@dataclasses.dataclass
class ScriptedEngine:
    """``try_admit`` answering from a per-request script (default ADMITTED) and logging calls."""

    verdicts: Dict[str, AdmitResult] = dataclasses.field(default_factory=dict)
    calls: List[str] = dataclasses.field(default_factory=list)

    def __call__(self, entry: RequestEntry) -> AdmitResult:
        self.calls.append(entry.request_id)
        return self.verdicts.get(entry.request_id, ADMITTED)


def admit_all(entry: RequestEntry) -> AdmitResult:
    return ADMITTED


def ids(entries: Sequence[RequestEntry]) -> List[str]:
    return [e.request_id for e in entries]


def make_config(**overrides: object) -> ChameleonConfig:
    fields = dict(enabled=True, warmup_requests=20, refresh_period_s=60.0)
    fields.update(overrides)
    return ChameleonConfig(**fields)  # type: ignore[arg-type]


def make_policy(total_tokens: int = 10_000, **config_overrides: object) -> ChameleonPolicy:
    return ChameleonPolicy(make_config(**config_overrides), make_limits(), total_tokens)
