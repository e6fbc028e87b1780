"""Server arguments as SGLang hands them to our code (the ``chameleon_*`` fields), for tests
that need no SGLang: ``server_args(chameleon_max_queues=3)``."""

from __future__ import annotations

from types import SimpleNamespace


def server_args(**overrides):
    fields = dict(
        chameleon=True,
        chameleon_scheduler="dynamic",
        chameleon_max_queues=4,
        chameleon_refresh_period=300.0,
        chameleon_warmup_requests=200,
        chameleon_elbow_threshold=0.2,
        chameleon_wrs_weights=[0.4, 0.6],
        chameleon_ttft_slo=5.0,
        chameleon_bypass=True,
        chameleon_predictor="online",
        chameleon_predictor_accuracy=1.0,
        chameleon_cache=True,
        chameleon_eviction_policy="chameleon",
        chameleon_score_weights=[0.45, 0.10, 0.45],
        chameleon_frequency_window=300.0,
        chameleon_prefetch=True,
        chameleon_prefetch_policy="queue",
        chameleon_host_link_gbps=0.0,
        chameleon_adapter_dir=[],
        chameleon_adapter_read_workers=2,
        chameleon_adapter_read_timeout=120.0,
        chameleon_host_cache_gb=None,
        chameleon_dp_epsilon=0.25,
        chameleon_dp_miss_cost=1.0,
        chameleon_dp_slack=0.0,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)
