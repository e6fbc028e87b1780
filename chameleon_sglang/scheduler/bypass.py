"""The engine's estimates for opportunistic bypass (:class:`BypassHooks`), from plain data.

Two memory models, one view each; both are built per pass and compute lazily (a pass needs them
only when it meets an adapter misfit):

- :class:`SlotBypassView` - a fixed number of adapter slots (SGLang's own LoRA pool): an adapter
  is resident while requests of it run (or were admitted this pass); a blocked head gets a slot
  when the running adapter with the least work left finishes; a younger request can delay that
  only by holding the first slot to free for longer than it already will be held;
- :class:`CacheBypassView` - the adapter cache in KV memory: cached adapters are resident; memory
  for a blocked head frees when the first running request finishes.

Work is counted in decode steps: a running request's predicted steps left.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Tuple

from chameleon_sglang.scheduler.entry import RequestEntry
from chameleon_sglang.scheduler.multi_level_queue import BypassHooks

RunningSteps = Callable[[], Iterable[Tuple[Optional[str], float]]]
"""``(adapter id, predicted steps left)`` of each running request (None: the base model)."""


class SlotBypassView:
    """Bypass estimates under fixed adapter slots (module docstring)."""

    def __init__(
        self, running: RunningSteps, admitted: Callable[[], Iterable[Optional[str]]]
    ) -> None:
        self._running = running
        self._admitted = admitted
        self._steps: Optional[Dict[Optional[str], float]] = None

    def _steps_left(self) -> Dict[Optional[str], float]:
        """Per running adapter, the most steps any of its requests has left."""
        if self._steps is None:
            steps: Dict[Optional[str], float] = {}
            for adapter, left in self._running():
                steps[adapter] = max(steps.get(adapter, 0.0), float(left))
            self._steps = steps
        return self._steps

    def is_resident(self, adapter: Optional[str]) -> bool:
        """In the running batch, or admitted earlier in this pass."""
        return adapter in self._steps_left() or adapter in set(self._admitted())

    def frees_in(self, entry: RequestEntry) -> float:
        """Steps until the first running adapter's slot frees: what a blocked head waits for."""
        steps = self._steps_left()
        return min(steps.values()) if steps else 0.0

    def holds_slot_until(self, entry: RequestEntry) -> float:
        """When admitting ``entry`` would stop holding a slot the head could get: ``-inf`` when
        it cannot delay the head (its adapter is not the first to free, or already runs at least
        as long, or was admitted earlier in this pass); else its predicted output."""
        steps = self._steps_left()
        own = steps.get(entry.adapter_id)
        if own is None or own > min(steps.values()) or entry.predicted_output <= own:
            return float("-inf")
        return float(entry.predicted_output)

    def hooks(self) -> BypassHooks:
        return BypassHooks(
            is_adapter_resident=self.is_resident,
            predicted_free_at=self.frees_in,
            predicted_finish_at=self.holds_slot_until,
        )


class CacheBypassView:
    """Bypass estimates with the adapter cache (module docstring)."""

    def __init__(self, running: RunningSteps, is_cached: Callable[[Optional[str]], bool]) -> None:
        self._running = running
        self._is_cached = is_cached

    def frees_in(self, entry: RequestEntry) -> float:
        left = [max(float(steps), 0.0) for _, steps in self._running()]
        return min(left) if left else 0.0

    def hooks(self) -> BypassHooks:
        return BypassHooks(is_adapter_resident=self._is_cached, predicted_free_at=self.frees_in)
