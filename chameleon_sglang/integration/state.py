"""Chameleon's state inside one SGLang process, kept beside SGLang's objects, never on them.

Each SGLang ``Scheduler`` (one per scheduler process), ``DataParallelController`` and
``TokenizerManager`` (launcher process) that Chameleon serves has one :class:`ChameleonState`,
found with :func:`state_of` and created by :func:`state_for`. Hooks read what they need from it;
nothing is ``setattr`` onto SGLang's objects. An owner's state lives as long as the process
(SGLang builds these objects once).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.status import ComponentStatus

if TYPE_CHECKING:  # pragma: no cover - types only
    from chameleon_sglang.catalog.background_reads import BackgroundReads
    from chameleon_sglang.catalog.host_tier import HostTier
    from chameleon_sglang.catalog.load_failures import LoadFailures
    from chameleon_sglang.catalog.name_locks import NameLocks
    from chameleon_sglang.integration.cache_bridge import CacheBridge
    from chameleon_sglang.integration.dp_controller import AffinityRouting
    from chameleon_sglang.integration.dp_reporter import ReplicaReporter
    from chameleon_sglang.integration.metrics import MetricsPublisher
    from chameleon_sglang.integration.scheduler_bridge import SchedulerBridge


@dataclasses.dataclass
class ChameleonState:
    """Everything Chameleon keeps for one SGLang scheduler or DP controller."""

    config: ChameleonConfig
    bridge: Optional[SchedulerBridge] = None
    """The Chameleon scheduler policy, where it runs (scheduler process)."""
    cache: Optional[CacheBridge] = None
    """The adapter cache, where it is the LoRA pool (scheduler process)."""
    reporter: Optional[ReplicaReporter] = None
    """This replica's reports to the DP controller (scheduler process, ``--dp-size`` > 1)."""
    routing: Optional[AffinityRouting] = None
    """Adapter-affinity dispatch (DP controller process)."""
    scheduler_metrics: Optional[MetricsPublisher] = None
    """The scheduler's ``chameleon:*`` gauges (``--enable-metrics``)."""
    cache_metrics: Optional[MetricsPublisher] = None
    """The adapter cache's ``chameleon:cache_*`` gauges (``--enable-metrics``)."""
    statuses: List[ComponentStatus] = dataclasses.field(default_factory=list)
    """Which components are active and why (published in ``/server_info``)."""
    reads: Optional[BackgroundReads] = None
    """Adapter reads off the event loop (scheduler process, created on the first load)."""
    read_metrics: Optional[MetricsPublisher] = None
    """The reads' ``chameleon:adapter_read_*`` gauges (``--enable-metrics``)."""
    host_tier: Optional[HostTier] = None
    """Loaded adapters in host memory, bounded in bytes (launcher process)."""
    host_tier_metrics: Optional[MetricsPublisher] = None
    """The host tier's ``chameleon:host_tier_*`` gauges (``--enable-metrics``)."""
    load_failures: Optional[LoadFailures] = None
    """Recent adapter load failures, for backoff (launcher process)."""
    loading: Optional[NameLocks] = None
    """Adapter names being loaded for requests (launcher process)."""
    loads_in_turn: Optional[asyncio.Lock] = None
    """Adapter loads one at a time, room made before each (launcher process)."""
    tokenizer_ipc_name: Optional[str] = None
    """The launch's tokenizer IPC name (the DP residency channel is derived from it)."""


_states: Dict[int, Tuple[Any, ChameleonState]] = {}


def state_of(owner: Any) -> Optional[ChameleonState]:
    """The state of ``owner`` (an SGLang scheduler or controller), or None."""
    entry = _states.get(id(owner))
    return entry[1] if entry is not None and entry[0] is owner else None


def state_for(owner: Any) -> ChameleonState:
    """The state of ``owner``, created from its ``server_args`` on first use."""
    state = state_of(owner)
    if state is None:
        state = attach_state(
            owner, ChameleonState(ChameleonConfig.from_server_args(owner.server_args))
        )
    return state


def attach_state(owner: Any, state: ChameleonState) -> ChameleonState:
    """Make ``state`` the state of ``owner`` (replacing any it had)."""
    _states[id(owner)] = (owner, state)
    return state


def forget_state(owner: Any) -> None:
    """Drop ``owner``'s state (tests that build many owners in one process)."""
    if state_of(owner) is not None:
        del _states[id(owner)]
