"""What a server reports about its load, with ``--chameleon`` (scheduler process): ``/v1/loads``,
which SGLang's model gateway and autoscalers poll, and the ``sglang:lora_pool_*`` gauges.

- KV use: SGLang counts used tokens as capacity minus available and evictable ones; idle cached
  adapters count as available (``integration/kv_allocator.py``), so ``num_used_tokens`` and
  ``token_usage`` are the requests' KV and the adapters they use, not the cache's idle ones. A
  gateway's overload guard on token usage sees the load, not the cache.
- The ``lora`` section counts slots of SGLang's fixed pool, which Chameleon does not have. After
  SGLang's update (:func:`report_cached_adapters`, after
  ``SchedulerMetricsReporter._update_lora_metrics``, with ``--enable-metrics`` as SGLang's own):
  ``slots_used`` stays the number of adapters in the running batch, ``slots_total`` is the number
  of adapters resident in the adapter cache (in use or idle), ``utilization`` their ratio.
"""

from __future__ import annotations

from typing import Any

from chameleon_sglang.integration.state import state_of


def report_cached_adapters(result: Any, reporter: Any, *args: Any, **kwargs: Any) -> Any:
    """After ``SchedulerMetricsReporter._update_lora_metrics``: the LoRA section describes the
    adapter cache (module docstring); without the cache, SGLang's figures stand."""
    state = state_of(reporter.scheduler)
    if state is None or state.cache is None:
        return result
    stats = reporter.stats
    used = int(stats.lora_pool_slots_used)
    total = max(len(state.cache.cache.resident_ids()), used)
    stats.lora_pool_slots_total = total
    stats.lora_pool_utilization = used / total if total else 0.0
    return result
