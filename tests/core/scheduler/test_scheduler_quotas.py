"""Token quotas: the K x M/M/1 minimum, the 1/q split, scale-down and demand estimates."""

from __future__ import annotations

import pytest

from chameleon_sglang.scheduler import QueueDemand, QueueStats, plan_quotas
from chameleon_sglang.scheduler.quotas import equal_quotas

NO_DEMAND = QueueDemand(0.0, 0.0, 0.0)


def test_minimum_is_s_times_d_times_inverse_slo_plus_rate():
    """Tok_min = S * D * (1/SLO + lambda)."""
    assert QueueDemand(1000, 2.0, 3.0).min_tokens(slo_s=5.0) == pytest.approx(1000 * 2 * (0.2 + 3))


def test_remainder_is_split_one_over_q():
    """Without minimums the total is split with weights 1, 1/2, 1/3 (smallest queue first)."""
    plan = plan_quotas([NO_DEMAND] * 3, 11_000, slo_s=5.0)
    assert plan.quotas == (6000, 3000, 2000)
    assert not plan.scaled_down


def test_minimums_come_first_then_the_split():
    """Each queue gets its minimum plus its 1/q share of what is left."""
    demands = [NO_DEMAND, QueueDemand(100, 1.0, 0.0)]  # second needs 100 * 1 * 1/5 = 20
    plan = plan_quotas(demands, 320, slo_s=5.0)
    assert plan.minimums == pytest.approx((0.0, 20.0))
    assert plan.quotas == (200, 120)


def test_quotas_always_sum_to_the_total():
    """Rounding never loses or invents tokens."""
    demands = [QueueDemand(7, 0.3, 1.1), QueueDemand(13, 0.7, 0.2), NO_DEMAND]
    assert sum(plan_quotas(demands, 1001, slo_s=3.0).quotas) == 1001


def test_minimums_above_total_are_scaled_down_proportionally():
    """If the minimums exceed the total they shrink by one factor, reported as scaled_down."""
    demands = [QueueDemand(100, 1.0, 0.8), QueueDemand(300, 1.0, 0.8)]  # 100 and 300 tokens
    plan = plan_quotas(demands, 200, slo_s=5.0)
    assert plan.scaled_down
    assert plan.scale_factor == pytest.approx(0.5)
    assert plan.quotas == (50, 150)


def test_equal_quotas_for_static_mode():
    """Static mode: equal quotas, leftover tokens to the smallest queues."""
    assert equal_quotas(4, 1002).quotas == (251, 251, 250, 250)


def test_queue_stats_estimate_rate_service_time_and_p99():
    """Steady arrivals every 0.5 s give lambda ~ 2/s; D is the mean service; S the p99 charge."""
    stats = QueueStats(time_constant_s=300.0, start_s=0.0)
    for i in range(1, 201):
        stats.observe_arrival(i * 0.5, charge=i)
        stats.observe_service(i * 0.5, service_s=1.5)
    demand = stats.demand(now=100.0)
    assert demand.arrival_rate == pytest.approx(2.0, rel=0.05)
    assert demand.mean_service_s == pytest.approx(1.5)
    assert demand.p99_charge == 198


def test_queue_stats_rate_decays_when_arrivals_stop():
    """Without arrivals the estimated rate falls with time."""
    stats = QueueStats(time_constant_s=10.0, start_s=0.0)
    for i in range(100):
        stats.observe_arrival(i * 0.1, charge=1)
    assert stats.arrival_rate(50.0) < stats.arrival_rate(10.0) / 10


def test_queue_stats_without_events_demand_nothing():
    """An idle queue has zero demand (and so a zero minimum)."""
    assert QueueStats(60.0, start_s=5.0).demand(5.0).min_tokens(1.0) == 0.0
