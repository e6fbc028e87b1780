"""The host-link model: on a CPU machine, a host-to-device adapter copy held to a PCIe-like rate.

``--chameleon-host-link-gbps`` (both arms, off by default) makes every adapter copy, in SGLang's
LoRA pool and in the adapter cache alike, take at least ``bytes / bandwidth``, so that adapter
loads cost on a CPU what they cost over a GPU's host link.
"""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass(frozen=True)
class HostLink:
    """A link of ``gbps`` GB/s; 0 models none (copies take what they take)."""

    gbps: float = 0.0

    def hold(self, num_bytes: int, started: float) -> None:
        """Return once a copy of ``num_bytes`` begun at ``started`` (``time.perf_counter()``)
        has taken at least ``num_bytes / bandwidth``."""
        if self.gbps > 0:
            remaining = num_bytes / (self.gbps * 1e9) - (time.perf_counter() - started)
            if remaining > 0:
                time.sleep(remaining)
