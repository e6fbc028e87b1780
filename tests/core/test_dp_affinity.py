"""Adapter-affinity dispatch across data-parallel replicas (chameleon_sglang.dp.affinity), the
policy alone: placement follows residency, loads stay bounded, hot adapters spread, rare ones
stay on one replica, a replica can leave, and a decision is cheap."""

from __future__ import annotations

import random
from collections import Counter, OrderedDict, defaultdict

import pytest

from chameleon_sglang.dp import AffinityDispatcher, ReplicaReport


def test_a_request_goes_to_a_replica_holding_its_adapter():
    d = AffinityDispatcher(range(4))
    d.report(ReplicaReport(2, frozenset({"a"}), 0))
    assert d.dispatch("a", 100) == 2
    assert d.num_affinity == 1 and d.load(2) == 100


def test_a_cold_adapter_always_goes_to_the_same_replica():
    picks = set()
    for _ in range(3):
        d = AffinityDispatcher(range(8))
        picks.add(d.dispatch("rare", 10))
    assert len(picks) == 1
    spread = Counter(AffinityDispatcher(range(8)).dispatch(f"a{i}", 10) for i in range(400))
    assert len(spread) == 8 and max(spread.values()) < 2 * 400 / 8  # hash order is balanced


def simulate(num_replicas=4, num_adapters=60, requests=6000, epsilon=0.25, seed=0):
    """Zipf-popular adapters; replicas report what they hold after every 50 requests; requests
    finish after 200 dispatches (load is what is in flight)."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(num_adapters)]
    d = AffinityDispatcher(range(num_replicas), epsilon)
    held = defaultdict(set)
    inflight = []
    max_ratio = 0.0
    for i in range(requests):
        adapter = f"a{rng.choices(range(num_adapters), weights)[0]}"
        tokens = rng.randint(50, 400)
        before = {x: d.load(x) for x in d.replicas}
        bound = d.bound(tokens)
        r = d.dispatch(adapter, tokens)
        # the bound, on what the dispatcher knows: the chosen replica was within it
        assert before[r] <= bound
        held[r].add(adapter)
        inflight.append((r, tokens))
        if len(inflight) > 200:
            inflight.pop(0)
        if i % 50 == 49:
            loads = Counter()
            for rr, t in inflight:
                loads[rr] += t
            for rr in d.replicas:
                d.report(ReplicaReport(rr, frozenset(held[rr]), loads[rr]))
            mean = sum(loads.values()) / num_replicas
            max_ratio = max(max_ratio, max(loads[rr] for rr in d.replicas) / mean)
    return d, held, max_ratio


def test_loads_stay_bounded_and_hot_adapters_spread_while_rare_ones_do_not():
    d, held, max_ratio = simulate()
    assert max_ratio <= 1.5  # true in-flight loads, known to the dispatcher 50 requests late
    copies = {f"a{i}": sum(f"a{i}" in held[r] for r in d.replicas) for i in range(60)}
    assert copies["a0"] >= 3  # the most popular adapter lives on several replicas
    rare = [copies[f"a{i}"] for i in range(40, 60)]
    assert sum(c == 1 for c in rare) >= 15  # most rare adapters live on one
    assert d.num_affinity > d.num_missed  # residency decided most requests


def test_affinity_loads_fewer_adapter_copies_than_round_robin():
    d, held, _ = simulate()
    affinity_copies = sum(len(v) for v in held.values())
    rng = random.Random(0)
    weights = [1 / (i + 1) for i in range(60)]
    rr = defaultdict(set)
    for i in range(6000):
        rr[i % 4].add(f"a{rng.choices(range(60), weights)[0]}")
        rng.randint(50, 400)
    assert affinity_copies <= 0.6 * sum(len(v) for v in rr.values())


def loads_with_small_caches(
    dispatch,
    miss_cost=1.0,
    num_replicas=2,
    num_adapters=100,
    capacity=50,
    requests=4000,
    inflight_per_replica=3,
    seed=0,
):
    """Adapter loads when each replica's cache holds ``capacity`` adapters (LRU) of
    ``num_adapters`` Zipf-popular ones; ``dispatch(i, adapter, tokens, dispatcher)`` picks the
    replica; every replica reports its cache and in-flight tokens after each request."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(num_adapters)]
    d = AffinityDispatcher(range(num_replicas), miss_cost=miss_cost)
    caches = [OrderedDict() for _ in range(num_replicas)]
    inflight, loads = [], 0
    for i in range(requests):
        adapter = f"a{rng.choices(range(num_adapters), weights)[0]}"
        tokens = rng.randint(50, 400)
        replica = dispatch(i, adapter, tokens, d)
        cache = caches[replica]
        if adapter in cache:
            cache.move_to_end(adapter)
        else:
            loads += 1
            cache[adapter] = True
            if len(cache) > capacity:
                cache.popitem(last=False)
        inflight.append((replica, tokens))
        if len(inflight) > inflight_per_replica * num_replicas:
            inflight.pop(0)
        for r in range(num_replicas):
            d.report(ReplicaReport(r, frozenset(caches[r]), sum(t for x, t in inflight if x == r)))
    return loads


def test_under_cache_pressure_affinity_loads_fewer_the_dearer_a_miss():
    """Each replica's cache holds half the adapters, a few requests in flight (moderate load):
    affinity loads fewer adapters than round robin, and a miss priced at 4 mean requests keeps
    each replica to its own share (at most half of round robin's loads)."""
    round_robin = loads_with_small_caches(lambda i, a, t, d: i % 2)
    by_cost = {
        m: loads_with_small_caches(lambda i, a, t, d: d.dispatch(a, t), miss_cost=m)
        for m in (1.0, 4.0)
    }
    assert by_cost[1.0] <= 0.8 * round_robin
    assert by_cost[4.0] < by_cost[1.0] and by_cost[4.0] <= 0.5 * round_robin


def test_slack_lets_a_holder_with_one_more_request_in_flight_keep_its_adapter():
    """The holder of ``a`` has two requests in flight, the other replica none, when the next
    ``a`` arrives. Without slack the bound (1.25 x the mean) sends it away, whatever a miss
    costs; one mean request of slack keeps it with its holder."""
    picks = {}
    for slack in (0.0, 1.0):
        d = AffinityDispatcher([0, 1], miss_cost=100.0, slack=slack)
        for _ in range(4):
            d.dispatch("a", 100)  # the mean request: 100 tokens
        d.report(ReplicaReport(0, frozenset({"a"}), 200))
        d.report(ReplicaReport(1, frozenset(), 0))
        assert d.bound(100) == pytest.approx(1.25 * 300 / 2 + slack * 100)
        picks[slack] = d.dispatch("a", 100)
    assert picks == {0.0: 1, 1.0: 0}


@pytest.mark.parametrize("slack, kept", [(0.0, 2), (1.0, 5)])
def test_slack_still_bounds_the_load(slack, kept):
    """A holder keeps its adapter's requests only while its load is within (1 + epsilon) x the
    mean plus the slack; the next goes elsewhere (100-token requests, no reports)."""
    d = AffinityDispatcher([0, 1], miss_cost=100.0, slack=slack)
    d.report(ReplicaReport(0, frozenset({"hot"}), 0))
    picks = [d.dispatch("hot", 100) for _ in range(kept + 1)]
    assert picks == [0] * kept + [1]


def test_slack_must_not_be_negative():
    with pytest.raises(ValueError):
        AffinityDispatcher([0, 1], slack=-1.0)


def test_a_replica_leaving_gets_nothing_more():
    d = AffinityDispatcher(range(3))
    d.report(ReplicaReport(1, frozenset({"a"}), 0))
    d.remove_replica(1)
    assert all(d.dispatch("a", 10) != 1 for _ in range(50))
    with pytest.raises(ValueError):
        d.remove_replica(1)
    with pytest.raises(ValueError):
        AffinityDispatcher([], 0.25)


def test_no_replica_starves_under_one_hot_adapter():
    d = AffinityDispatcher(range(4))
    d.report(ReplicaReport(0, frozenset({"hot"}), 0))
    picks = Counter(d.dispatch("hot", 100) for _ in range(400))
    assert set(picks) == {0, 1, 2, 3} and max(picks.values()) <= 1.3 * 100


def warmed(num_replicas=2, miss_cost=1.0, request=100):
    """A dispatcher whose mean request is ``request`` tokens, every replica idle again."""
    d = AffinityDispatcher(range(num_replicas), miss_cost=miss_cost)
    for _ in range(5):
        d.dispatch(None, request)
    for r in d.replicas:
        d.report(ReplicaReport(r, frozenset(), 0))
    return d


def test_a_request_does_not_wait_behind_a_busy_holder_while_another_replica_idles():
    d = warmed()
    d.report(ReplicaReport(0, frozenset({"a"}), 250))  # 2.5 mean requests ahead on the holder
    missed = d.num_missed
    assert d.dispatch("a", 100) == 1 and d.num_missed == missed + 1


def test_a_holder_at_most_one_mean_request_busier_wins():
    d = warmed()
    d.report(ReplicaReport(0, frozenset({"a"}), 90))
    hits = d.num_affinity
    assert d.dispatch("a", 100) == 0 and d.num_affinity == hits + 1


def test_with_no_miss_cost_the_least_loaded_wins_and_residency_breaks_ties():
    d = warmed(miss_cost=0.0)
    d.report(ReplicaReport(0, frozenset({"a"}), 10))
    assert d.dispatch("a", 100) == 1
    d.report(ReplicaReport(0, frozenset({"a"}), 0))
    d.report(ReplicaReport(1, frozenset(), 0))
    assert d.dispatch("a", 100) == 0


def test_at_high_load_adapters_stay_on_their_holder_within_epsilon_of_the_mean():
    d = warmed()  # mean request 100 tokens; 40 requests in flight per replica
    d.report(ReplicaReport(0, frozenset({"a"}), 4300))
    d.report(ReplicaReport(1, frozenset(), 3700))  # holder 6 requests busier, within 0.25 x mean
    assert d.dispatch("a", 100) == 0
    d.report(ReplicaReport(0, frozenset({"a"}), 5500))  # now beyond it: the other replica
    assert d.dispatch("a", 100) == 1


def test_the_miss_cost_is_validated():
    with pytest.raises(ValueError):
        AffinityDispatcher(range(2), miss_cost=-1)


def test_a_report_made_before_a_dispatched_request_arrived_does_not_forget_it():
    d = AffinityDispatcher([0, 1], miss_cost=0.0)
    d.report(ReplicaReport(0, frozenset(), 0, received=0))
    d.report(ReplicaReport(1, frozenset(), 0, received=0))
    first = d.dispatch("a", 500)
    # the replica reports while busy in a forward pass: it has not read the request yet
    d.report(ReplicaReport(first, frozenset(), 0, received=0))
    assert d.load(first) == 500 and d.in_flight(first) == 1
    assert d.dispatch("b", 500) != first  # the busy replica is not taken for idle
    # once it has read the request, the report's load carries it and the count acknowledges it
    d.report(ReplicaReport(first, frozenset({"a"}), 520, received=1))
    assert d.load(first) == 520 and d.in_flight(first) == 0


def test_requests_are_acknowledged_in_order_by_count():
    d = AffinityDispatcher([0], miss_cost=0.0)
    for tokens in (100, 200, 300):
        d.dispatch(None, tokens)
    d.report(ReplicaReport(0, frozenset(), 40, received=1))  # the first read, the others not
    assert d.in_flight(0) == 2 and d.load(0) == 40 + 200 + 300
    d.report(ReplicaReport(0, frozenset(), 0, received=3))
    assert d.in_flight(0) == 0 and d.load(0) == 0
    d.dispatch(None, 50)
    d.report(ReplicaReport(0, frozenset(), 7))  # no count: everything sent is in the report
    assert d.in_flight(0) == 0 and d.load(0) == 7


def test_requests_routed_by_another_rule_are_counted_and_acknowledged():
    d = AffinityDispatcher([0, 1], miss_cost=0.0)
    d.count_routed(1, 400)  # routed_dp_rank
    assert d.load(1) == 400
    assert d.dispatch(None, 10) == 0
    d.report(ReplicaReport(1, frozenset(), 0, received=0))
    assert d.load(1) == 400  # still on its way
    d.report(ReplicaReport(1, frozenset(), 30, received=1))
    assert d.load(1) == 30 and d.stats()["loads"] == [10, 30]
