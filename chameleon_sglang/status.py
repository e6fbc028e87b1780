"""Which Chameleon components are active in a running server, and why.

Nothing may claim to be active that is not: a component reports ``active`` only when its code
path is installed in the scheduler process (the caller says so; the config alone never does).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from chameleon_sglang.config import ChameleonConfig

SCHEDULER = "scheduler"
ADAPTER_CACHE = "adapter_cache"


@dataclasses.dataclass(frozen=True)
class ComponentStatus:
    name: str
    active: bool
    detail: str


def scheduler_status(config: ChameleonConfig, installed_reason: Optional[str]) -> ComponentStatus:
    """``installed_reason`` is None when the scheduler bridge is installed, else why it is not."""
    if not config.enabled:
        return ComponentStatus(SCHEDULER, False, "--chameleon not set: SGLang's own scheduling")
    if config.scheduler == "off":
        return ComponentStatus(SCHEDULER, False, "disabled by --chameleon-scheduler off")
    if installed_reason is not None:
        return ComponentStatus(SCHEDULER, False, installed_reason)
    queues = "K-means queues" if config.scheduler == "dynamic" else "static queues"
    return ComponentStatus(
        SCHEDULER, True, f"multi-level queues ({queues}, WRS, quotas, Algorithm 1 admission)"
    )


def cache_status(config: ChameleonConfig, installed_reason: Optional[str]) -> ComponentStatus:
    """``installed_reason`` is None when the adapter cache is SGLang's LoRA pool, else why not."""
    if not config.enabled:
        return ComponentStatus(ADAPTER_CACHE, False, "--chameleon not set: SGLang's LoRA pool")
    if not config.cache:
        return ComponentStatus(ADAPTER_CACHE, False, "disabled by --no-chameleon-cache")
    if installed_reason is not None:
        return ComponentStatus(ADAPTER_CACHE, False, installed_reason)
    prefetch = config.prefetch_policy if config.prefetch else "off"
    return ComponentStatus(
        ADAPTER_CACHE,
        True,
        f"LoRA pool in free KV memory, rank-exact, no per-batch adapter cap "
        f"({config.eviction_policy} eviction, prefetch {prefetch})",
    )


def status_report(config: ChameleonConfig, statuses: List[ComponentStatus]) -> Dict[str, object]:
    """The JSON-able block published under ``chameleon_status`` in ``/server_info``."""
    return {
        "enabled": config.enabled,
        "active_components": [s.name for s in statuses if s.active],
        "components": {s.name: {"active": s.active, "detail": s.detail} for s in statuses},
        "config": dataclasses.asdict(config),
    }


def status_line(config: ChameleonConfig, statuses: List[ComponentStatus]) -> str:
    """One log line naming each component and whether it is active."""
    parts = [f"{s.name}={'ACTIVE' if s.active else 'inactive'} ({s.detail})" for s in statuses]
    return "Chameleon " + ("enabled" if config.enabled else "disabled") + ": " + "; ".join(parts)
