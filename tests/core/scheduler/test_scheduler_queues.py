"""Queue layouts: deterministic 1-D K-means, the elbow rule, cut-offs and static layouts."""

from __future__ import annotations

import numpy as np
import pytest

from chameleon_sglang.scheduler import QueueLayout, fit_layout, static_layout
from chameleon_sglang.scheduler.queues import choose_k, cutoffs_between, kmeans_1d


def three_clusters(n: int = 60) -> list[float]:
    """Tight clusters around 0.1, 0.5 and 0.9 (deterministic jitter)."""
    jitter = [((i * 37) % 11 - 5) / 1000 for i in range(n)]
    return [c + j for c in (0.1, 0.5, 0.9) for j in jitter]


def test_kmeans_is_deterministic_and_order_independent():
    """Same data in any order gives the same centroids and WCSS, every time."""
    data = three_clusters()
    shuffled = list(np.random.default_rng(0).permutation(data))
    assert kmeans_1d(data, 3) == kmeans_1d(shuffled, 3) == kmeans_1d(data, 3)


def test_kmeans_finds_clear_clusters():
    """On three tight clusters K=3 recovers their centres."""
    centroids, wcss = kmeans_1d(three_clusters(), 3)
    assert centroids == pytest.approx((0.1, 0.5, 0.9), abs=0.01)
    assert wcss < 0.01


def test_kmeans_with_few_distinct_values_uses_each_value():
    """With at most K distinct values each is a centroid and WCSS is 0."""
    assert kmeans_1d([0.2, 0.2, 0.7], 4) == ((0.2, 0.7), 0.0)
    assert kmeans_1d([], 2) == ((), 0.0)


def test_kmeans_survives_heavy_duplicates():
    """Many repeats of one value plus a few others still give K sorted distinct centroids."""
    centroids, _ = kmeans_1d([0.5] * 100 + [0.1, 0.9, 0.95], 3)
    assert len(centroids) == 3 and list(centroids) == sorted(set(centroids))


def test_elbow_rule_takes_smallest_k_whose_next_step_gains_little():
    """K is the smallest whose step to K+1 cuts WCSS by less than the threshold (of WCSS at K=1)."""
    assert choose_k([100.0, 50.0, 45.0, 44.0], 0.2) == 2
    assert choose_k([100.0, 50.0, 30.0, 25.0], 0.2) == 3  # 50 -> 30 is 20% of 100: not less
    assert choose_k([100.0, 90.0, 10.0, 9.0], 0.2) == 1


def test_elbow_rule_takes_max_when_every_step_gains_much():
    """If every step cuts at least the threshold, K = max."""
    assert choose_k([100.0, 60.0, 30.0, 5.0], 0.2) == 4


def test_elbow_rule_with_no_spread_is_one_queue():
    """WCSS 0 at K=1 (all values equal) gives K=1; a step that reaches 0 ends the search."""
    assert choose_k([0.0, 0.0, 0.0], 0.2) == 1
    assert choose_k([4.0, 0.0, 0.0, 0.0], 0.2) == 2


def test_elbow_rule_is_not_fooled_by_spread_inside_clusters():
    """Uniform spread inside three clusters does not add a fourth queue."""
    wcss = fit_layout(three_clusters(), max_queues=4, elbow_threshold=0.2).wcss
    assert (wcss[2] - wcss[3]) / wcss[2] > 0.2  # a per-step ratio would have split further
    assert choose_k(wcss, 0.2) == 3


def test_fit_layout_picks_three_queues_on_three_clusters():
    """Clearly three-clustered WRS values give K=3 with cut-offs between the clusters."""
    fit = fit_layout(three_clusters(), max_queues=4, elbow_threshold=0.2)
    assert fit.layout.num_queues == 3
    assert fit.layout.cutoffs == pytest.approx((0.3, 0.7), abs=0.01)
    assert len(fit.wcss) == 4


def test_fit_layout_respects_max_queues():
    """K never exceeds max_queues."""
    assert fit_layout(three_clusters(), max_queues=2, elbow_threshold=0.2).layout.num_queues == 2


def test_fit_layout_of_nothing_or_one_value_is_one_queue():
    """Empty input or a single distinct value gives one queue."""
    assert fit_layout([], 4, 0.2).layout == QueueLayout()
    assert fit_layout([0.3] * 10, 4, 0.2).layout.num_queues == 1


def test_cutoffs_are_midpoints_between_sorted_centroids():
    """Cut-offs sit halfway between consecutive sorted centroids."""
    assert cutoffs_between([0.8, 0.2, 0.4]) == pytest.approx((0.3, 0.6))


def test_static_layout_has_equal_ranges():
    """static_layout(n, m) cuts [0, m] into n equal ranges."""
    assert static_layout(4, 1.0).cutoffs == pytest.approx((0.25, 0.5, 0.75))
    assert static_layout(1).num_queues == 1


def test_queue_of_maps_wrs_to_ranges_smallest_first():
    """Queue i holds cutoffs[i-1] <= wrs < cutoffs[i]; 0 is the smallest."""
    layout = QueueLayout((0.25, 0.5, 0.75))
    assert [layout.queue_of(w) for w in (0.0, 0.2499, 0.25, 0.6, 0.75, 5.0)] == [0, 0, 1, 2, 3, 3]


def test_layout_rejects_unsorted_cutoffs():
    """Cut-offs must be strictly increasing."""
    with pytest.raises(ValueError):
        QueueLayout((0.5, 0.5))
