"""Output-length predictors and their accuracy report."""

from __future__ import annotations

import pytest

from chameleon_sglang.scheduler import MaxNewTokensPredictor, OnlinePredictor, create_predictor
from chameleon_sglang.scheduler.predictor import input_bucket
from chameleon_sglang.scheduler.quantile import nearest_rank


def observe_many(p: OnlinePredictor, adapter: str | None, input_len: int, outputs) -> None:
    for out in outputs:
        p.observe(adapter, input_len, out)


def test_max_new_tokens_predictor_returns_the_cap():
    """The max-new-tokens predictor predicts the request's cap, at least 1."""
    p = MaxNewTokensPredictor()
    assert p.predict("a", 10, 256) == 256
    assert p.predict(None, 10, 0) == 1


def test_online_predictor_without_data_returns_the_cap():
    """With no observations anywhere the online predictor falls back to max_new_tokens."""
    assert OnlinePredictor().predict("a", 100, 300) == 300


def test_online_predictor_uses_p90_of_its_cell():
    """With min_samples in the (adapter, input bucket) cell, it predicts their nearest-rank p90."""
    p = OnlinePredictor(quantile=0.9, min_samples=8)
    observe_many(p, "a", 100, range(10, 110, 10))  # 10..100
    assert p.predict("a", 100, 1000) == 90


def test_online_predictor_falls_back_to_adapter_then_global():
    """A sparse cell falls back to the adapter's samples, an unseen adapter to all samples."""
    p = OnlinePredictor(quantile=1.0, min_samples=4)
    observe_many(p, "a", 8, [50] * 4)  # bucket of 8
    observe_many(p, "b", 8, [500] * 4)
    p.observe("a", 1000, 70)  # a different bucket, only one sample
    assert p.predict("a", 1000, 10_000) == 70  # adapter "a": max of 50,50,50,50,70
    assert p.predict("zzz", 8, 10_000) == 500  # global: max over everything


def test_online_predictor_skips_levels_below_min_samples():
    """Levels with fewer than min_samples observations are not used."""
    p = OnlinePredictor(min_samples=8)
    observe_many(p, "a", 10, [5] * 7)
    assert p.predict("a", 10, 400) == 400


def test_online_prediction_is_capped_and_at_least_one():
    """Predictions never exceed max_new_tokens and never drop below 1."""
    p = OnlinePredictor(min_samples=2)
    observe_many(p, "a", 10, [900, 900])
    observe_many(p, "z", 10, [0, 0])
    assert p.predict("a", 10, 64) == 64
    assert p.predict("z", 10, 64) == 1


def test_online_predictor_memory_is_a_recent_window():
    """Each level keeps only its latest `window` observations."""
    p = OnlinePredictor(quantile=1.0, min_samples=2, window=4, global_window=4)
    observe_many(p, "a", 10, [1000] * 4 + [10] * 4)
    assert p.predict("a", 10, 5000) == 10


def test_base_model_requests_learn_under_their_own_key():
    """adapter_id None is a key of its own."""
    p = OnlinePredictor(quantile=1.0, min_samples=2)
    observe_many(p, None, 10, [7, 7])
    observe_many(p, "a", 10, [99, 99])
    assert p.predict(None, 10, 1000) == 7


def test_accuracy_counts_predictions_within_25_percent_and_mae():
    """Accuracy: fraction with |pred-actual| <= 25% of actual, and mean absolute error."""
    p = OnlinePredictor()
    p.observe("a", 10, 100, predicted=120)  # within
    p.observe("a", 10, 100, predicted=130)  # outside
    p.observe("a", 10, 100, predicted=80)  # within, under
    p.observe("a", 10, 100)  # not scored
    acc = p.accuracy()
    assert acc["num_outcomes"] == 3
    assert acc["within_tolerance"] == pytest.approx(2 / 3)
    assert acc["under_predicted"] == pytest.approx(1 / 3)
    assert acc["mean_abs_error"] == pytest.approx((20 + 30 + 20) / 3)


def test_accuracy_is_zero_before_outcomes():
    """An unscored predictor reports zeros, not NaN."""
    assert MaxNewTokensPredictor().accuracy()["within_tolerance"] == 0.0


def test_input_buckets_are_log2():
    """Bucket = bit length: 0 | 1 | 2-3 | 4-7 | 8-15 ..."""
    lengths = (0, 1, 2, 3, 4, 7, 8, 1023, 1024)
    assert [input_bucket(n) for n in lengths] == [0, 1, 2, 2, 3, 3, 4, 10, 11]


def test_nearest_rank_quantile():
    """The nearest-rank quantile is an observed value; p90 of 1..10 is 9."""
    assert nearest_rank(list(range(1, 11)), 0.9) == 9
    assert nearest_rank([3, 1, 2], 0.0) == 1
    assert nearest_rank([3, 1, 2], 1.0) == 3


def test_create_predictor_by_name():
    """create_predictor maps --chameleon-predictor names to implementations."""
    assert isinstance(create_predictor("online"), OnlinePredictor)
    assert isinstance(create_predictor("max-new-tokens"), MaxNewTokensPredictor)
    with pytest.raises(ValueError):
        create_predictor("bert")  # type: ignore[arg-type]


def test_synthetic_predictor_hits_its_accuracy_and_is_deterministic():
    from chameleon_sglang.scheduler.predictor import SyntheticAccuracyPredictor, create_predictor

    for target in (1.0, 0.8, 0.6):
        p = create_predictor("synthetic", target)
        q = SyntheticAccuracyPredictor(target)
        preds = [p.predict("a", 10, 1 + i % 60) for i in range(3000)]
        assert preds == [q.predict("a", 10, 1 + i % 60) for i in range(3000)]
        for i, pred in enumerate(preds):
            p.observe("a", 10, 1 + i % 60, pred)
        measured = p.accuracy()
        assert abs(measured["within_tolerance"] - target) < 0.03, measured
        assert all(pred >= 1 for pred in preds)
    with pytest.raises(ValueError):
        SyntheticAccuracyPredictor(1.5)
