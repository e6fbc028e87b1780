"""Chameleon's configuration: one typed, frozen object built from SGLang's server arguments.

Defaults are the paper's constants and our documented decisions
(``shared/design/chameleon.md``). Importable without SGLang or torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Tuple

SchedulerMode = Literal["dynamic", "static", "off"]
EvictionPolicyName = Literal["chameleon", "lru", "fairshare", "gdsf"]
PredictorName = Literal["online", "max-new-tokens", "synthetic"]
PrefetchPolicyName = Literal["queue", "predictive"]


@dataclasses.dataclass(frozen=True)
class ChameleonConfig:
    """Everything ``--chameleon`` and its sub-options decide. Validated on construction."""

    enabled: bool = False
    # Scheduler (paper §4.3)
    scheduler: SchedulerMode = "dynamic"
    max_queues: int = 4
    refresh_period_s: float = 300.0
    warmup_requests: int = 200
    elbow_threshold: float = 0.20
    wrs_input_weight: float = 0.4
    wrs_output_weight: float = 0.6
    ttft_slo_s: float = 5.0
    bypass: bool = True
    predictor: PredictorName = "online"
    predictor_accuracy: float = 1.0  # of the synthetic predictor
    # Adapter cache (paper §4.2)
    cache: bool = True
    eviction_policy: EvictionPolicyName = "chameleon"
    score_weights: Tuple[float, float, float] = (0.45, 0.10, 0.45)
    frequency_window_s: float = 300.0
    prefetch: bool = True
    prefetch_policy: PrefetchPolicyName = "queue"
    # Adapter catalog: directories whose <name>/ subdirectories are served on first request
    adapter_dirs: Tuple[str, ...] = ()
    # ... adapter reads off the scheduler loop: worker threads (0: in the loop, as SGLang) and
    # the time a read may take before its load fails
    adapter_read_workers: int = 2
    adapter_read_timeout_s: float = 120.0
    # ... the host tier's byte budget (GB); None: a share of the RAM available at start
    host_cache_gb: Optional[float] = None
    # Host-link model (CPU machines): GB/s every host-to-device adapter copy is held to; 0 = off
    host_link_gbps: float = 0.0
    # Data parallelism: the load bound of adapter-affinity dispatch, (1 + dp_epsilon) x mean
    dp_epsilon: float = 0.25
    # ... and what a replica without the request's adapter counts as, in mean requests of load
    dp_miss_cost: float = 4.0
    # ... and the bound's room beyond (1 + dp_epsilon) x mean, in mean requests
    dp_slack: float = 1.0

    def __post_init__(self) -> None:
        _require(1 <= self.max_queues <= 4, "--chameleon-max-queues must be between 1 and 4")
        _require(self.refresh_period_s > 0, "--chameleon-refresh-period must be > 0 seconds")
        _require(self.warmup_requests >= 1, "--chameleon-warmup-requests must be >= 1")
        _require(0 < self.elbow_threshold < 1, "--chameleon-elbow-threshold must be in (0, 1)")
        _require(
            self.wrs_input_weight >= 0
            and self.wrs_output_weight >= 0
            and self.wrs_input_weight + self.wrs_output_weight > 0,
            "--chameleon-wrs-weights must be two non-negative numbers, not both zero",
        )
        _require(self.ttft_slo_s > 0, "--chameleon-ttft-slo must be > 0 seconds")
        _require(
            len(self.score_weights) == 3
            and all(w >= 0 for w in self.score_weights)
            and sum(self.score_weights) > 0,
            "--chameleon-score-weights must be three non-negative numbers "
            "(frequency recency size), not all zero",
        )
        _require(self.frequency_window_s > 0, "--chameleon-frequency-window must be > 0 seconds")
        _require(
            0 <= self.predictor_accuracy <= 1, "--chameleon-predictor-accuracy must be in [0, 1]"
        )
        _require(
            0 <= self.adapter_read_workers <= 64,
            "--chameleon-adapter-read-workers must be between 0 and 64",
        )
        _require(self.adapter_read_timeout_s > 0, "--chameleon-adapter-read-timeout must be > 0")
        _require(
            self.host_cache_gb is None or self.host_cache_gb > 0,
            "--chameleon-host-cache-gb must be > 0",
        )
        _require(self.host_link_gbps >= 0, "--chameleon-host-link-gbps must be >= 0")
        _require(self.dp_epsilon > 0, "--chameleon-dp-epsilon must be > 0")
        _require(self.dp_miss_cost >= 0, "--chameleon-dp-miss-cost must be >= 0")
        _require(self.dp_slack >= 0, "--chameleon-dp-slack must be >= 0")
        _require(
            self.prefetch_policy in ("queue", "predictive"),
            "--chameleon-prefetch-policy must be 'queue' or 'predictive'",
        )

    @staticmethod
    def from_server_args(server_args: Any) -> ChameleonConfig:
        """Build from an object carrying the ``chameleon_*`` fields (SGLang's ``ServerArgs``)."""
        get = lambda name: getattr(server_args, name)  # noqa: E731
        wrs = tuple(get("chameleon_wrs_weights"))
        _require(len(wrs) == 2, "--chameleon-wrs-weights takes two numbers (input output)")
        return ChameleonConfig(
            enabled=bool(get("chameleon")),
            scheduler=get("chameleon_scheduler"),
            max_queues=get("chameleon_max_queues"),
            refresh_period_s=get("chameleon_refresh_period"),
            warmup_requests=get("chameleon_warmup_requests"),
            elbow_threshold=get("chameleon_elbow_threshold"),
            wrs_input_weight=float(wrs[0]),
            wrs_output_weight=float(wrs[1]),
            ttft_slo_s=get("chameleon_ttft_slo"),
            bypass=get("chameleon_bypass"),
            predictor=get("chameleon_predictor"),
            predictor_accuracy=float(get("chameleon_predictor_accuracy")),
            cache=get("chameleon_cache"),
            eviction_policy=get("chameleon_eviction_policy"),
            score_weights=tuple(float(w) for w in get("chameleon_score_weights")),
            frequency_window_s=get("chameleon_frequency_window"),
            prefetch=get("chameleon_prefetch"),
            prefetch_policy=get("chameleon_prefetch_policy"),
            host_link_gbps=float(get("chameleon_host_link_gbps")),
            adapter_dirs=tuple(str(d) for d in get("chameleon_adapter_dir") or ()),
            adapter_read_workers=int(get("chameleon_adapter_read_workers")),
            adapter_read_timeout_s=float(get("chameleon_adapter_read_timeout")),
            host_cache_gb=_optional_float(get("chameleon_host_cache_gb")),
            dp_epsilon=float(get("chameleon_dp_epsilon")),
            dp_miss_cost=float(get("chameleon_dp_miss_cost")),
            dp_slack=float(get("chameleon_dp_slack")),
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)
