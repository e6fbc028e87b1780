"""Weighted Request Size (paper §4.3)."""

from __future__ import annotations

import pytest
from scheduler_factories import make_limits

from chameleon_sglang.scheduler import SizeLimits, compute_wrs


def test_wrs_is_weighted_size_times_rank_ratio():
    """WRS = (0.4*in/max_in + 0.6*out/max_out) * rank/max_rank."""
    limits = make_limits(max_input=1000, max_output=500, max_rank=64)
    wrs = compute_wrs(250, 100, 32, limits)
    assert wrs == pytest.approx((0.4 * 0.25 + 0.6 * 0.2) * 0.5)


def test_wrs_weights_are_configurable():
    """The input and output weights come from the caller."""
    limits = make_limits(max_input=100, max_output=100, max_rank=8, min_rank=8)
    assert compute_wrs(50, 0, 8, limits, input_weight=1.0, output_weight=0.0) == pytest.approx(0.5)


def test_wrs_ratios_are_clamped_to_unit_interval():
    """Lengths or ranks beyond their maxima count as the maximum; WRS stays in [0, 1]."""
    limits = make_limits(max_input=100, max_output=100, max_rank=16)
    assert compute_wrs(10_000, 10_000, 128, limits) == pytest.approx(1.0)
    assert compute_wrs(-5, 0, 16, limits) == 0.0


def test_base_model_request_uses_min_rank():
    """A request without an adapter (rank None) is sized with the smallest served rank."""
    limits = make_limits(max_rank=64, min_rank=8)
    assert compute_wrs(100, 100, None, limits) == compute_wrs(100, 100, 8, limits)


def test_higher_rank_gives_larger_wrs():
    """Same lengths, larger rank: larger WRS."""
    limits = make_limits()
    assert compute_wrs(100, 100, 16, limits) < compute_wrs(100, 100, 64, limits)


def test_size_limits_are_validated():
    """Non-positive maxima or min_rank > max_rank are rejected."""
    with pytest.raises(ValueError):
        SizeLimits(0, 10, 8, 8)
    with pytest.raises(ValueError):
        SizeLimits(10, 10, 8, 16)
