"""Which Chameleon components are active in a running server, and why.

Nothing may claim to be active that is not: each component reports ``active`` only once its code
path is really installed in the scheduler process.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

from chameleon_sglang.config import ChameleonConfig


@dataclasses.dataclass(frozen=True)
class ComponentStatus:
    name: str
    active: bool
    detail: str


def component_statuses(config: ChameleonConfig) -> List[ComponentStatus]:
    """The state of every component for ``config`` in this build of the package."""
    if not config.enabled:
        return [
            ComponentStatus("scheduler", False, "--chameleon not set: SGLang's own scheduling"),
            ComponentStatus("adapter_cache", False, "--chameleon not set: SGLang's LoRA pool"),
        ]
    return [_scheduler_status(config), _cache_status(config)]


def _scheduler_status(config: ChameleonConfig) -> ComponentStatus:
    if config.scheduler == "off":
        return ComponentStatus("scheduler", False, "disabled by --chameleon-scheduler off")
    return ComponentStatus(
        "scheduler", False, "not implemented in this version: SGLang's own admission is in use"
    )


def _cache_status(config: ChameleonConfig) -> ComponentStatus:
    if not config.cache:
        return ComponentStatus("adapter_cache", False, "disabled by --no-chameleon-cache")
    return ComponentStatus(
        "adapter_cache", False, "not implemented in this version: SGLang's LoRA pool is in use"
    )


def status_report(config: ChameleonConfig) -> Dict[str, object]:
    """The JSON-able block published under ``chameleon_status`` in ``/server_info``."""
    statuses = component_statuses(config)
    return {
        "enabled": config.enabled,
        "active_components": [s.name for s in statuses if s.active],
        "components": {s.name: {"active": s.active, "detail": s.detail} for s in statuses},
        "config": dataclasses.asdict(config),
    }


def status_line(config: ChameleonConfig) -> str:
    """One log line naming each component and whether it is active."""
    parts = [
        f"{s.name}={'ACTIVE' if s.active else 'inactive'} ({s.detail})"
        for s in component_statuses(config)
    ]
    return "Chameleon " + ("enabled" if config.enabled else "disabled") + ": " + "; ".join(parts)
