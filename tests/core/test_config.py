"""ChameleonConfig: the paper's defaults, validation, and parsing from server arguments."""

from __future__ import annotations

import dataclasses

import pytest
from config_factories import server_args

from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.status import cache_status, scheduler_status, status_report


def test_defaults_are_the_papers_constants():
    """WRS 0.4/0.6, score 0.45/0.10/0.45, K <= 4, 300 s refresh and window."""
    c = ChameleonConfig()
    assert (c.wrs_input_weight, c.wrs_output_weight) == (0.4, 0.6)
    assert c.score_weights == (0.45, 0.10, 0.45)
    assert c.max_queues == 4 and c.refresh_period_s == 300 and c.frequency_window_s == 300


def test_parsed_from_server_args_and_frozen():
    """Server arguments become a typed, frozen config."""
    c = ChameleonConfig.from_server_args(server_args(chameleon_max_queues=3))
    assert c.enabled and c.max_queues == 3 and isinstance(c.score_weights, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_queues = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"chameleon_max_queues": 5}, "max-queues"),
        ({"chameleon_max_queues": 0}, "max-queues"),
        ({"chameleon_ttft_slo": 0.0}, "ttft-slo"),
        ({"chameleon_score_weights": [0, 0, 0]}, "score-weights"),
        ({"chameleon_score_weights": [0.5, -0.1, 0.6]}, "score-weights"),
        ({"chameleon_wrs_weights": [0.4]}, "wrs-weights"),
        ({"chameleon_elbow_threshold": 1.5}, "elbow"),
        ({"chameleon_dp_epsilon": 0.0}, "dp-epsilon"),
        ({"chameleon_dp_miss_cost": -1.0}, "dp-miss-cost"),
        ({"chameleon_dp_slack": -0.5}, "dp-slack"),
    ],
)
def test_invalid_values_are_rejected_with_the_flag_named(overrides, message):
    """Each invalid sub-option fails with an error naming the flag."""
    with pytest.raises(ValueError, match=message):
        ChameleonConfig.from_server_args(server_args(**overrides))


def test_cache_status_follows_installation():
    """The adapter cache is active only when installed as the LoRA pool; else the reason."""
    config = ChameleonConfig(enabled=True)
    report = status_report(config, [scheduler_status(config, None), cache_status(config, None)])
    assert report["active_components"] == ["scheduler", "adapter_cache"]
    missing = cache_status(config, "needs --page-size 1: SGLang's LoRA pool in use")
    assert missing.active is False and "page-size" in missing.detail
    off = cache_status(ChameleonConfig(enabled=True, cache=False), None)
    assert off.active is False and "no-chameleon-cache" in off.detail


def test_scheduler_status_follows_installation():
    """The scheduler is active only when installed; otherwise the reason is reported."""
    config = ChameleonConfig(enabled=True)
    assert scheduler_status(config, None).active is True
    missing = scheduler_status(config, "not supported with pipeline parallelism")
    assert missing.active is False and "pipeline" in missing.detail
    off = scheduler_status(ChameleonConfig(enabled=True, scheduler="off"), None)
    assert off.active is False and "off" in off.detail


def test_disabled_config_reports_disabled():
    """Without --chameleon every component is inactive."""
    config = ChameleonConfig(enabled=False)
    report = status_report(config, [scheduler_status(config, None), cache_status(config, None)])
    assert report["enabled"] is False and report["active_components"] == []
