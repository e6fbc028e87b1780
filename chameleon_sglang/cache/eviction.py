"""Eviction policies: which idle adapters leave the cache first.

A policy only orders candidates; the cache decides who is a candidate (idle entries, one tier at a
time) and how many to evict. Policies are chosen by name through ``create_eviction_policy``.
"""

from __future__ import annotations

import abc
from typing import Callable, Dict, List, Sequence, Tuple

from chameleon_sglang.cache.entry import CacheEntry

ScoreWeights = Tuple[float, float, float]
DEFAULT_SCORE_WEIGHTS: ScoreWeights = (0.45, 0.10, 0.45)
DEFAULT_WINDOW_S = 300.0


class EvictionPolicy(abc.ABC):
    """Orders eviction candidates; the cache evicts from the front of ``order``.

    Contract: ``order`` returns a permutation of ``candidates``; it is deterministic, with ties
    broken by adapter id, and never depends on the order of its input. The hooks let a stateful
    policy follow the cache; the cache calls ``on_admit`` once per new entry, ``on_use`` on every
    acquire and ``on_remove`` once when the entry leaves.
    """

    name: str = ""

    @abc.abstractmethod
    def order(self, candidates: Sequence[CacheEntry], now: float) -> List[CacheEntry]:
        """``candidates`` sorted first-to-evict first."""

    # Optional notifications (a policy that keeps state of its own overrides them).
    def on_admit(self, entry: CacheEntry, now: float) -> None:  # noqa: B027
        """``entry`` was just loaded."""

    def on_use(self, entry: CacheEntry, now: float) -> None:  # noqa: B027
        """``entry`` was just acquired by a request (its use is already recorded)."""

    def on_remove(self, entry: CacheEntry, is_eviction: bool) -> None:  # noqa: B027
        """``entry`` left the cache: evicted by the policy's order, or else unloaded."""


class ScorePolicy(EvictionPolicy):
    """Chameleon's score: ``F·frequency + R·recency + S·size``; the lowest score leaves first.

    Each term is min-max normalised to [0, 1] over the candidates passed to ``order`` (a term
    that is equal for all candidates counts 0 for all):
    frequency = uses in the last ``window_s`` seconds; recency = ``1 - age/max_age`` with
    ``age = now - last_use``, which after normalisation is ``(max_age - age)/(max_age - min_age)``,
    i.e. the min-max of ``last_use``: the most recently used candidate scores 1, the least
    recently used 0; size = adapter bytes. Small, cold adapters thus go first.
    """

    name = "chameleon"

    def __init__(
        self, weights: ScoreWeights = DEFAULT_SCORE_WEIGHTS, window_s: float = DEFAULT_WINDOW_S
    ) -> None:
        _check_weights(weights)
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.weights: ScoreWeights = (float(weights[0]), float(weights[1]), float(weights[2]))
        self.window_s = float(window_s)

    def scores(self, candidates: Sequence[CacheEntry], now: float) -> Dict[str, float]:
        """The score of each candidate, keyed by adapter id."""
        freq = _min_max([float(e.frequency(now, self.window_s)) for e in candidates])
        recency = _min_max([e.last_use for e in candidates])
        size = _min_max([float(e.num_bytes) for e in candidates])
        wf, wr, ws = self.weights
        return {
            e.adapter_id: wf * f + wr * r + ws * s
            for e, f, r, s in zip(candidates, freq, recency, size)
        }

    def order(self, candidates: Sequence[CacheEntry], now: float) -> List[CacheEntry]:
        scores = self.scores(candidates, now)
        return sorted(candidates, key=lambda e: (scores[e.adapter_id], e.adapter_id))


class FairSharePolicy(ScorePolicy):
    """The score with equal weights (1/3 each) for frequency, recency and size."""

    name = "fairshare"

    def __init__(
        self, weights: ScoreWeights = DEFAULT_SCORE_WEIGHTS, window_s: float = DEFAULT_WINDOW_S
    ) -> None:
        super().__init__((1 / 3, 1 / 3, 1 / 3), window_s)


class LRUPolicy(EvictionPolicy):
    """Least recently used first: oldest ``last_use`` first."""

    name = "lru"

    def order(self, candidates: Sequence[CacheEntry], now: float) -> List[CacheEntry]:
        return sorted(candidates, key=lambda e: (e.last_use, e.adapter_id))


class GDSFPolicy(EvictionPolicy):
    """Greedy-Dual-Size-Frequency: the lowest priority ``H`` leaves first.

    ``H = L + F · C / S`` is set when an entry is admitted and on every use, with
    F = ``max(1, uses in the last window_s seconds)``, S = adapter bytes and load cost C = adapter
    bytes (loading is bandwidth-bound), so ``C / S = 1`` and ``H = L + F``: frequency with
    aging. The inflation value L starts at 0 and, on every policy eviction, becomes the evicted
    entry's H (it never decreases), so entries not used for a while lose to newly used ones.
    Unloads do not inflate L.
    """

    name = "gdsf"

    def __init__(
        self, weights: ScoreWeights = DEFAULT_SCORE_WEIGHTS, window_s: float = DEFAULT_WINDOW_S
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = float(window_s)
        self.inflation = 0.0
        self._priority: Dict[str, float] = {}

    def priority(self, entry: CacheEntry) -> float:
        """The entry's current H (L for an entry the policy has not seen)."""
        return self._priority.get(entry.adapter_id, self.inflation)

    def order(self, candidates: Sequence[CacheEntry], now: float) -> List[CacheEntry]:
        return sorted(candidates, key=lambda e: (self.priority(e), e.adapter_id))

    def on_admit(self, entry: CacheEntry, now: float) -> None:
        self._update(entry, now)

    def on_use(self, entry: CacheEntry, now: float) -> None:
        self._update(entry, now)

    def on_remove(self, entry: CacheEntry, is_eviction: bool) -> None:
        priority = self._priority.pop(entry.adapter_id, self.inflation)
        if is_eviction:
            self.inflation = max(self.inflation, priority)

    def _update(self, entry: CacheEntry, now: float) -> None:
        frequency = max(1, entry.frequency(now, self.window_s))
        cost_per_byte = 1.0  # C / S with C = S = entry.num_bytes
        self._priority[entry.adapter_id] = self.inflation + frequency * cost_per_byte


PolicyFactory = Callable[[ScoreWeights, float], EvictionPolicy]

_POLICIES: Dict[str, PolicyFactory] = {
    "chameleon": ScorePolicy,
    "fairshare": FairSharePolicy,
    "lru": lambda weights, window_s: LRUPolicy(),
    "gdsf": GDSFPolicy,
}

EVICTION_POLICY_NAMES: Tuple[str, ...] = tuple(sorted(_POLICIES))


def create_eviction_policy(
    name: str, weights: ScoreWeights = DEFAULT_SCORE_WEIGHTS, window_s: float = DEFAULT_WINDOW_S
) -> EvictionPolicy:
    """A new policy by name (``EVICTION_POLICY_NAMES``).

    ``weights`` (frequency, recency, size) are used by "chameleon" only; ``window_s`` by the
    policies that count frequency. Each cache needs its own instance (a policy may keep state).
    """
    if name not in _POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {EVICTION_POLICY_NAMES}")
    return _POLICIES[name](weights, window_s)


def _min_max(values: List[float]) -> List[float]:
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi == lo:
        return [0.0] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


def _check_weights(weights: ScoreWeights) -> None:
    if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"score weights must be three non-negative numbers (frequency, recency, size), "
            f"not all zero; got {tuple(weights)}"
        )
