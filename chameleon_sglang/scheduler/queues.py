"""Queue layouts: how many queues there are and which WRS goes where (paper §4.3).

A dynamic layout is fitted with a deterministic 1-D K-means over recent WRS values for
K = 1..max_queues, K chosen by the elbow rule (``choose_k``); cut-offs are midpoints between
sorted centroids.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class QueueLayout:
    """Queues by WRS: queue ``i`` holds ``cutoffs[i-1] <= wrs < cutoffs[i]``; 0 is the smallest.

    ``cutoffs`` must be finite and strictly increasing; ``()`` is one queue for everything.
    """

    cutoffs: Tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not all(math.isfinite(c) for c in self.cutoffs):
            raise ValueError("cut-offs must be finite")
        if any(b <= a for a, b in zip(self.cutoffs, self.cutoffs[1:])):
            raise ValueError("cut-offs must be strictly increasing")

    @property
    def num_queues(self) -> int:
        return len(self.cutoffs) + 1

    def queue_of(self, wrs: float) -> int:
        """The queue index of a WRS, in ``[0, num_queues)``."""
        return bisect.bisect_right(self.cutoffs, wrs)


@dataclasses.dataclass(frozen=True)
class LayoutFit:
    """The outcome of ``fit_layout``: the layout and the numbers that chose it."""

    layout: QueueLayout
    centroids: Tuple[float, ...]
    """Sorted centroids of the chosen K (one per queue)."""
    wcss: Tuple[float, ...]
    """``wcss[k - 1]`` is the within-cluster sum of squares for K = k."""
    num_samples: int


def static_layout(num_queues: int = 4, max_wrs: float = 1.0) -> QueueLayout:
    """``num_queues`` queues splitting ``[0, max_wrs]`` into equal ranges."""
    if num_queues < 1 or max_wrs <= 0:
        raise ValueError("need num_queues >= 1 and max_wrs > 0")
    return QueueLayout(tuple(max_wrs * i / num_queues for i in range(1, num_queues)))


def kmeans_1d(
    values: Sequence[float], k: int, max_iters: int = 100
) -> Tuple[Tuple[float, ...], float]:
    """Deterministic 1-D K-means: ``(sorted centroids, WCSS)``.

    Centroids start at the ``(2j+1)/2k`` quantiles of the sorted data (of its distinct values if
    those coincide) and follow Lloyd iterations until assignments stop changing; ties go to the
    lower centroid. With at most ``k`` distinct values every distinct value is a centroid (WCSS 0).
    Clusters that end empty are dropped, so fewer than ``k`` centroids may come back.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    x = np.sort(np.asarray(values, dtype=np.float64))
    distinct = np.unique(x)
    if distinct.size <= k:
        return tuple(float(c) for c in distinct), 0.0
    centroids = _initial_centroids(x, distinct, k)
    labels = _assign(x, centroids)
    for _ in range(max_iters):
        centroids = _update(x, labels, centroids)
        new_labels = _assign(x, centroids)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    used = np.unique(labels)
    wcss = float(np.sum((x - centroids[labels]) ** 2))
    return tuple(float(c) for c in np.sort(centroids[used])), wcss


def choose_k(wcss: Sequence[float], elbow_threshold: float) -> int:
    """The elbow rule: the smallest K whose step to K+1 cuts WCSS by less than
    ``elbow_threshold``; ``len(wcss)`` if every step cuts more.

    A cut is measured as a fraction of the total spread, WCSS at K = 1. (Measured against WCSS
    at K instead, the rule is scale-free within clusters and overshoots clear clusters: halving
    one of three uniform clusters always removes 25% of the remaining WCSS.) With WCSS 0 at
    K = 1 there is nothing to split and K = 1.
    """
    total = wcss[0] if wcss else 0.0
    for k in range(1, len(wcss)):
        improvement = (wcss[k - 1] - wcss[k]) / total if total > 0 else 0.0
        if improvement < elbow_threshold:
            return k
    return max(len(wcss), 1)


def fit_layout(values: Sequence[float], max_queues: int, elbow_threshold: float) -> LayoutFit:
    """Fit K-means for K = 1..max_queues, pick K by the elbow rule, cut at centroid midpoints.

    No values give one queue; fewer distinct values than ``max_queues`` cap K at their number.
    """
    if max_queues < 1:
        raise ValueError("max_queues must be >= 1")
    if len(values) == 0:
        return LayoutFit(QueueLayout(), (), (), 0)
    fits = [kmeans_1d(values, k) for k in range(1, max_queues + 1)]
    k = choose_k([wcss for _, wcss in fits], elbow_threshold)
    centroids = fits[k - 1][0]
    return LayoutFit(
        QueueLayout(cutoffs_between(centroids)),
        centroids,
        tuple(wcss for _, wcss in fits),
        len(values),
    )


def cutoffs_between(centroids: Sequence[float]) -> Tuple[float, ...]:
    """Midpoints between consecutive sorted centroids (a midpoint that rounding made equal to
    the one before it is dropped, so the result is strictly increasing)."""
    ordered = sorted(centroids)
    cutoffs: list[float] = []
    for a, b in zip(ordered, ordered[1:]):
        mid = (a + b) / 2
        if not cutoffs or mid > cutoffs[-1]:
            cutoffs.append(mid)
    return tuple(cutoffs)


def _initial_centroids(x: np.ndarray, distinct: np.ndarray, k: int) -> np.ndarray:
    picks = [((2 * j + 1) * x.size) // (2 * k) for j in range(k)]
    centroids = x[picks]
    if np.all(np.diff(centroids) > 0):
        return centroids.copy()
    picks = [((2 * j + 1) * distinct.size) // (2 * k) for j in range(k)]
    return distinct[picks].copy()


def _assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmin(np.abs(x[:, None] - centroids[None, :]), axis=1)


def _update(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    updated = centroids.copy()
    for j in range(centroids.size):
        members = x[labels == j]
        if members.size:
            updated[j] = members.mean()
    return updated
