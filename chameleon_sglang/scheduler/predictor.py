"""Output-length predictors: how many tokens a request will generate (paper §4.3).

The paper used a BERT proxy model; none can be downloaded here, so the default is an online
predictor learnt from observed output lengths. Anything with the ``OutputPredictor`` methods can
replace it. Predictions are whole tokens in ``[1, max(1, max_new_tokens)]``.

Accuracy is measured on outcomes: the caller passes the prediction it used back to ``observe``
together with the true output length. A prediction counts as accurate when
``|predicted - actual| <= 0.25 * max(actual, 1)``.
"""

from __future__ import annotations

import collections
import random
from typing import Any, Deque, Dict, Hashable, Protocol, Tuple

from chameleon_sglang.config import PredictorName
from chameleon_sglang.scheduler.quantile import nearest_rank


class OutputPredictor(Protocol):
    """The predictor contract. Implementations must be deterministic in their inputs."""

    def predict(self, adapter_id: str | None, input_len: int, max_new_tokens: int) -> int:
        """Predicted output tokens, in ``[1, max(1, max_new_tokens)]``."""
        ...

    def observe(
        self, adapter_id: str | None, input_len: int, output_len: int, predicted: int | None = None
    ) -> None:
        """Learn a finished request's true ``output_len``; with ``predicted``, score it too."""
        ...

    def accuracy(self) -> Dict[str, float]:
        """JSON-able accuracy over scored outcomes (see ``AccuracyTracker.summary``)."""
        ...


class AccuracyTracker:
    """Running accuracy of (predicted, actual) pairs in O(1) memory."""

    def __init__(self, tolerance: float = 0.25) -> None:
        self.tolerance = tolerance
        self.num_outcomes = 0
        self._num_within = 0
        self._num_under = 0
        self._sum_abs_error = 0

    def record(self, predicted: int, actual: int) -> None:
        error = predicted - actual
        self.num_outcomes += 1
        self._sum_abs_error += abs(error)
        self._num_within += abs(error) <= self.tolerance * max(actual, 1)
        self._num_under += error < 0

    def summary(self) -> Dict[str, float]:
        """``num_outcomes``; ``within_tolerance`` (fraction within ±tolerance of the actual);
        ``under_predicted`` (fraction below the actual: those charges grew later);
        ``mean_abs_error`` in tokens. Fractions and error are 0.0 before any outcome."""
        n = self.num_outcomes
        return {
            "num_outcomes": n,
            "tolerance": self.tolerance,
            "within_tolerance": self._num_within / n if n else 0.0,
            "under_predicted": self._num_under / n if n else 0.0,
            "mean_abs_error": self._sum_abs_error / n if n else 0.0,
        }


class _CapPredictor:
    """A predictor that learns nothing from outcomes: it only scores its predictions."""

    def __init__(self, tolerance: float = 0.25) -> None:
        self._accuracy = AccuracyTracker(tolerance)

    def observe(
        self, adapter_id: str | None, input_len: int, output_len: int, predicted: int | None = None
    ) -> None:
        if predicted is not None:
            self._accuracy.record(predicted, output_len)

    def accuracy(self) -> Dict[str, float]:
        return self._accuracy.summary()


class MaxNewTokensPredictor(_CapPredictor):
    """Predicts the request's cap: never under-charges, often over-charges."""

    def predict(self, adapter_id: str | None, input_len: int, max_new_tokens: int) -> int:
        return max(1, max_new_tokens)


class SyntheticAccuracyPredictor(_CapPredictor):
    """An artificial predictor of set accuracy, for sensitivity experiments (the paper's Fig. 19).

    The request's cap is taken as the truth (the evaluation's requests generate exactly
    ``max_new_tokens``, ``ignore_eos``): with probability ``accuracy`` it is predicted, else a
    wrong value outside the accuracy tolerance (0.1-0.7x or 1.3-3x of it, uniformly). Draws come
    from one seeded generator in call order, so every tensor-parallel rank predicts alike.
    """

    def __init__(self, accuracy: float, seed: int = 0, tolerance: float = 0.25) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"predictor accuracy must be in [0, 1], got {accuracy}")
        super().__init__(tolerance)
        self.target = float(accuracy)
        self._rng = random.Random(seed)

    def predict(self, adapter_id: str | None, input_len: int, max_new_tokens: int) -> int:
        truth = max(1, max_new_tokens)
        if self._rng.random() < self.target:
            return truth
        low = self._rng.random() < 0.5
        factor = self._rng.uniform(0.1, 0.7) if low else self._rng.uniform(1.3, 3.0)
        return max(1, round(truth * factor))

    def accuracy(self) -> Dict[str, float]:
        return {**super().accuracy(), "target": self.target}


class OnlinePredictor:
    """A high quantile of recent output lengths, per adapter and log2 input-length bucket.

    Fallback chain: the (adapter, bucket) cell, then the adapter, then all requests, each used
    only once it holds ``min_samples`` observations; with none of them, ``max_new_tokens``. The
    result is capped by ``max_new_tokens`` and at least 1. Each level keeps only its most recent
    ``window`` (``global_window`` for all requests) observations.
    """

    def __init__(
        self,
        quantile: float = 0.9,
        min_samples: int = 8,
        window: int = 128,
        global_window: int = 2048,
        tolerance: float = 0.25,
    ) -> None:
        if not 0.0 <= quantile <= 1.0:
            raise ValueError("quantile must be in [0, 1]")
        if min_samples < 1 or window < min_samples or global_window < min_samples:
            raise ValueError("need 1 <= min_samples <= window, global_window")
        self.quantile = quantile
        self.min_samples = min_samples
        self._window = window
        self._cells: Dict[Tuple[str | None, int], Deque[int]] = {}
        self._adapters: Dict[str | None, Deque[int]] = {}
        self._global: Deque[int] = collections.deque(maxlen=global_window)
        self._accuracy = AccuracyTracker(tolerance)

    def predict(self, adapter_id: str | None, input_len: int, max_new_tokens: int) -> int:
        cap = max(1, max_new_tokens)
        for samples in self._levels(adapter_id, input_len):
            if samples is not None and len(samples) >= self.min_samples:
                return min(max(1, nearest_rank(samples, self.quantile)), cap)
        return cap

    def observe(
        self, adapter_id: str | None, input_len: int, output_len: int, predicted: int | None = None
    ) -> None:
        cell = (adapter_id, input_bucket(input_len))
        _window_of(self._cells, cell, self._window).append(output_len)
        _window_of(self._adapters, adapter_id, self._window).append(output_len)
        self._global.append(output_len)
        if predicted is not None:
            self._accuracy.record(predicted, output_len)

    def accuracy(self) -> Dict[str, float]:
        return self._accuracy.summary()

    def _levels(
        self, adapter_id: str | None, input_len: int
    ) -> Tuple[Deque[int] | None, Deque[int] | None, Deque[int]]:
        cell = self._cells.get((adapter_id, input_bucket(input_len)))
        return cell, self._adapters.get(adapter_id), self._global


def input_bucket(input_len: int) -> int:
    """The log2 bucket of an input length: 0 for 0, then 1 for 1, 2 for 2-3, 3 for 4-7, ..."""
    return max(input_len, 0).bit_length()


def create_predictor(name: PredictorName, accuracy: float = 1.0) -> OutputPredictor:
    """The predictor ``--chameleon-predictor`` names, with default parameters (``accuracy``:
    the synthetic one's)."""
    if name == "online":
        return OnlinePredictor()
    if name == "max-new-tokens":
        return MaxNewTokensPredictor()
    if name == "synthetic":
        return SyntheticAccuracyPredictor(accuracy)
    raise ValueError(f"unknown predictor {name!r}")


def _window_of(table: Dict[Any, Deque[int]], key: Hashable, window: int) -> Deque[int]:
    samples = table.get(key)
    if samples is None:
        samples = table[key] = collections.deque(maxlen=window)
    return samples
