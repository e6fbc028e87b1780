import pytest
from cache_factories import make_entry

from chameleon_sglang.cache import EVICTION_POLICY_NAMES, create_eviction_policy
from chameleon_sglang.config import ChameleonConfig

NOW = 1000.0


def ids(entries):
    return [e.adapter_id for e in entries]


def test_chameleon_evicts_a_small_cold_adapter_before_a_large_hot_one():
    """With the paper's weights the small, rarely and long-ago used adapter leaves first."""
    small_cold = make_entry("small", num_bytes=100, last_use=800.0, uses=[800.0])
    large_hot = make_entry("large", num_bytes=10_000, last_use=990.0, uses=[950, 970, 990])
    policy = create_eviction_policy("chameleon")
    assert ids(policy.order([large_hot, small_cold], NOW)) == ["small", "large"]


def test_chameleon_weights_decide_between_frequency_and_size():
    """A frequency-only score evicts the cold adapter; a size-only score evicts the small one."""
    big_cold = make_entry("big", num_bytes=5000, last_use=900.0, uses=[900.0])
    small_hot = make_entry("hot", num_bytes=100, last_use=900.0, uses=[900, 900, 900, 900])
    by_frequency = create_eviction_policy("chameleon", weights=(1.0, 0.0, 0.0))
    by_size = create_eviction_policy("chameleon", weights=(0.0, 0.0, 1.0))
    assert ids(by_frequency.order([big_cold, small_hot], NOW)) == ["big", "hot"]
    assert ids(by_size.order([big_cold, small_hot], NOW)) == ["hot", "big"]


def test_chameleon_terms_are_min_max_normalised_over_the_candidates():
    """Each term maps the candidates' minimum to 0 and maximum to 1, whatever the units."""
    low = make_entry("low", num_bytes=100, last_use=760.0, uses=[760.0])
    mid = make_entry("mid", num_bytes=200, last_use=880.0, uses=[820, 880])
    high = make_entry("high", num_bytes=300, last_use=1000.0, uses=[900, 950, 1000])
    policy = create_eviction_policy("chameleon", weights=(0.45, 0.10, 0.45))
    scores = policy.scores([low, mid, high], NOW)
    assert scores["low"] == pytest.approx(0.0)
    assert scores["mid"] == pytest.approx(0.5)
    assert scores["high"] == pytest.approx(1.0)
    for e in (low, mid, high):
        e.num_bytes *= 1000
    assert policy.scores([low, mid, high], NOW) == pytest.approx(scores)


def test_chameleon_term_equal_for_all_candidates_counts_zero():
    """A term with no spread among the candidates adds nothing to any score."""
    a = make_entry("a", num_bytes=100, last_use=500.0)
    b = make_entry("b", num_bytes=100, last_use=500.0)
    policy = create_eviction_policy("chameleon")
    assert policy.scores([a, b], NOW) == {"a": 0.0, "b": 0.0}


def test_chameleon_recency_scores_the_most_recently_used_highest():
    """With recency alone, the least recently used candidate leaves first."""
    entries = [make_entry(i, last_use=t) for i, t in (("x", 900.0), ("y", 100.0), ("z", 500.0))]
    policy = create_eviction_policy("chameleon", weights=(0.0, 1.0, 0.0))
    scores = policy.scores(entries, NOW)
    assert scores == pytest.approx({"x": 1.0, "y": 0.0, "z": 0.5})
    assert ids(policy.order(entries, NOW)) == ["y", "z", "x"]


def test_chameleon_frequency_counts_only_the_window():
    """Uses older than the frequency window do not make an adapter hot."""
    old_fan = make_entry("old", last_use=NOW, uses=[10, 20, 30, 40, NOW])
    recent = make_entry("new", last_use=NOW, uses=[NOW - 10, NOW])
    policy = create_eviction_policy("chameleon", weights=(1.0, 0.0, 0.0), window_s=300.0)
    assert ids(policy.order([recent, old_fan], NOW)) == ["old", "new"]


@pytest.mark.parametrize("name", EVICTION_POLICY_NAMES)
def test_ties_are_broken_by_adapter_id_not_input_order(name):
    """Identical candidates leave in adapter-id order, whatever order they come in."""
    entries = [make_entry(i, num_bytes=100, last_use=5.0, uses=[5.0]) for i in ("b", "c", "a")]
    policy = create_eviction_policy(name)
    assert ids(policy.order(entries, NOW)) == ["a", "b", "c"]
    assert ids(policy.order(entries[::-1], NOW)) == ["a", "b", "c"]


def test_lru_evicts_the_oldest_last_use_first_regardless_of_size_and_frequency():
    """LRU orders by last use only."""
    hot_old = make_entry("hot_old", num_bytes=10, last_use=100.0, uses=[90, 95, 100])
    big_new = make_entry("big_new", num_bytes=10_000, last_use=900.0)
    mid = make_entry("mid", num_bytes=500, last_use=500.0)
    policy = create_eviction_policy("lru")
    assert ids(policy.order([big_new, mid, hot_old], NOW)) == ["hot_old", "mid", "big_new"]


def test_fairshare_weighs_the_three_terms_equally():
    """FairShare uses weights 1/3 each, ignores given weights, and can order unlike Chameleon."""
    window = 2000.0
    a = make_entry("a", num_bytes=300, last_use=1000.0)
    b = make_entry("b", num_bytes=200, last_use=0.0, uses=[-10.0, 0.0])
    c = make_entry("c", num_bytes=100, last_use=500.0, uses=[500.0])
    fairshare = create_eviction_policy("fairshare", weights=(1.0, 0.0, 0.0), window_s=window)
    chameleon = create_eviction_policy("chameleon", window_s=window)
    assert fairshare.weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert ids(fairshare.order([a, b, c], NOW)) == ["c", "b", "a"]
    assert ids(chameleon.order([a, b, c], NOW)) == ["c", "a", "b"]


def test_gdsf_priority_is_inflation_plus_frequency_independent_of_size():
    """GDSF with load cost = size sets H = L + frequency: the less used adapter leaves first."""
    policy = create_eviction_policy("gdsf", window_s=300.0)
    big_once = make_entry("big", num_bytes=10_000, last_use=NOW)
    small_twice = make_entry("small", num_bytes=10, last_use=NOW)
    for entry, times in ((big_once, [NOW]), (small_twice, [NOW, NOW])):
        policy.on_admit(entry, NOW)
        for t in times:
            entry.record_use(t, 300.0)
            policy.on_use(entry, t)
    assert policy.priority(big_once) == 1.0 and policy.priority(small_twice) == 2.0
    assert ids(policy.order([small_twice, big_once], NOW)) == ["big", "small"]


def test_gdsf_inflation_ages_entries_not_used_since_an_eviction():
    """After an eviction L rises to the victim's H, so newly used adapters outrank stale ones."""
    policy = create_eviction_policy("gdsf", window_s=300.0)
    stale, victim, fresh = (make_entry(i, last_use=NOW) for i in ("stale", "victim", "fresh"))
    for entry, num_uses in ((stale, 2), (victim, 1)):
        policy.on_admit(entry, NOW)
        for _ in range(num_uses):
            entry.record_use(NOW, 300.0)
            policy.on_use(entry, NOW)
    assert ids(policy.order([stale, victim], NOW)) == ["victim", "stale"]
    policy.on_remove(victim, is_eviction=True)
    assert policy.inflation == 1.0
    policy.on_admit(fresh, NOW)
    for _ in range(2):
        fresh.record_use(NOW, 300.0)
        policy.on_use(fresh, NOW)
    assert policy.priority(fresh) == 3.0
    assert ids(policy.order([fresh, stale], NOW)) == ["stale", "fresh"]


def test_gdsf_unload_does_not_inflate():
    """Removing an entry that was not evicted by the policy leaves L unchanged."""
    policy = create_eviction_policy("gdsf")
    entry = make_entry("a", last_use=NOW, uses=[NOW, NOW])
    policy.on_admit(entry, NOW)
    policy.on_remove(entry, is_eviction=False)
    assert policy.inflation == 0.0


def test_every_configurable_policy_name_is_registered():
    """Each eviction policy the config accepts can be created by name; others are refused."""
    for name in ("chameleon", "lru", "fairshare", "gdsf"):
        config = ChameleonConfig(eviction_policy=name)
        assert create_eviction_policy(config.eviction_policy).name == name
    with pytest.raises(ValueError, match="unknown eviction policy"):
        create_eviction_policy("fifo")


def test_score_weights_are_validated():
    """Negative or all-zero score weights are refused."""
    with pytest.raises(ValueError):
        create_eviction_policy("chameleon", weights=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        create_eviction_policy("chameleon", weights=(-1.0, 1.0, 1.0))
