"""The ChameleonPolicy facade: modes, warm-up, refresh, events and stats."""

from __future__ import annotations

import json

import pytest
from scheduler_factories import (
    ScriptedEngine,
    admit_all,
    ids,
    make_config,
    make_limits,
    make_policy,
)

from chameleon_sglang.scheduler import ChameleonPolicy, MaxNewTokensPredictor


def arrive(
    policy: ChameleonPolicy,
    rid: str,
    now: float,
    *,
    input_len: int = 100,
    adapter: str | None = "a",
    rank: int = 8,
    max_new: int = 100,
) -> None:
    policy.on_arrival(
        rid,
        adapter_id=adapter,
        input_len=input_len,
        max_new_tokens=max_new,
        now=now,
        rank=rank if adapter else None,
    )


def arrive_clustered(policy: ChameleonPolicy, n: int, start: float = 0.0) -> None:
    """n requests alternating between a small (rank 8) and a large (rank 64) size class."""
    for i in range(n):
        large = i % 2 == 1
        arrive(
            policy,
            f"w{start}-{i}",
            start + i * 0.1,
            input_len=900 if large else 50,
            rank=64 if large else 8,
            max_new=900 if large else 50,
        )


def test_off_mode_is_not_this_policy():
    """Mode 'off' is the integrator's job: constructing the policy for it is an error."""
    with pytest.raises(ValueError):
        make_policy(scheduler="off")


def test_dynamic_mode_starts_with_one_queue_owning_everything():
    """Before the first fit there is one queue whose quota is the whole capacity."""
    policy = make_policy(total_tokens=5000)
    assert policy.queue.num_queues == 1 and policy.queue.quotas == (5000,)


def test_first_fit_waits_for_warmup_requests():
    """The layout is first fitted once warmup_requests requests have arrived."""
    policy = make_policy(warmup_requests=20)
    arrive_clustered(policy, 19)
    assert not policy.maybe_refresh(2.0)
    arrive_clustered(policy, 1, start=5.0)
    assert policy.maybe_refresh(2.0)
    assert policy.queue.num_queues == 2
    assert sum(policy.queue.quotas) == policy.total_tokens


def test_refits_every_refresh_period():
    """After the first fit the layout is refitted only once refresh_period_s has passed."""
    policy = make_policy(warmup_requests=20, refresh_period_s=60.0)
    arrive_clustered(policy, 20)
    assert policy.maybe_refresh(10.0)
    assert not policy.maybe_refresh(69.9)
    assert policy.maybe_refresh(70.0)
    assert policy.num_refreshes == 2


def test_refresh_rebins_waiting_requests_in_order():
    """A refresh moves queued requests to their new queues, keeping their arrival order."""
    policy = make_policy(warmup_requests=20)
    arrive_clustered(policy, 20)
    policy.maybe_refresh(3.0)
    small, large = ids(policy.queue)[:10], ids(policy.queue)[10:]
    assert small == [f"w0.0-{i}" for i in range(0, 20, 2)]
    assert large == [f"w0.0-{i}" for i in range(1, 20, 2)]


def test_static_mode_has_equal_range_queues_and_equal_quotas():
    """Static mode: max_queues equal-WRS-range queues, equal quotas, never refitted."""
    policy = make_policy(scheduler="static", total_tokens=4000, warmup_requests=1)
    assert policy.queue.layout.cutoffs == pytest.approx((0.25, 0.5, 0.75))
    assert policy.queue.quotas == (1000, 1000, 1000, 1000)
    arrive_clustered(policy, 10)
    assert not policy.maybe_refresh(1000.0)


def test_base_model_request_is_sized_with_min_rank_and_no_adapter_memory():
    """A base-model request gets rank = min_rank and no adapter charge."""
    policy = make_policy()
    entry = policy.on_arrival(
        "b", adapter_id=None, input_len=10, max_new_tokens=20, now=0.0, rank=64, adapter_tokens=99
    )
    assert entry.rank == make_limits().min_rank and entry.adapter_tokens == 0
    assert entry.charge == 10 + 20


def test_adapter_request_needs_its_rank():
    """An adapter request without a rank is rejected."""
    with pytest.raises(ValueError):
        make_policy().on_arrival("r", adapter_id="a", input_len=1, max_new_tokens=1, now=0.0)


def test_adapter_memory_is_part_of_the_charge():
    """charge = input + predicted output + adapter tokens."""
    entry = make_policy().on_arrival(
        "r", adapter_id="a", input_len=10, max_new_tokens=20, now=0.0, rank=8, adapter_tokens=7
    )
    assert entry.charge == 10 + 20 + 7


def test_finish_releases_and_teaches_the_predictor():
    """on_finish returns the charge and scores the prediction that was used."""
    policy = make_policy()
    arrive(policy, "r", 0.0, max_new=100)
    policy.schedule_pass(admit_all, now=1.0)
    policy.on_finish("r", output_len=90, now=3.0)
    stats = policy.stats()
    assert stats["usage"] == [0]
    assert stats["predictor"]["num_outcomes"] == 1
    assert stats["predictor"]["within_tolerance"] == 1.0


def test_progress_retract_abort_and_squash_events():
    """on_progress grows charges, on_retracted requeues at the head, on_abort forgets."""
    policy = make_policy()
    arrive(policy, "r", 0.0, max_new=10)
    arrive(policy, "s", 0.0, max_new=10)
    policy.schedule_pass(admit_all, now=0.0)
    assert policy.on_progress("r", 50) == 100 + 50
    policy.on_retracted("r")
    assert ids(policy.queue) == ["r"]
    policy.on_abort("r")
    policy.on_abort("unknown")
    assert len(policy.queue) == 0 and policy.queue.usage == (110,)


def test_stats_are_json_able_and_complete():
    """stats() has K, cut-offs, quotas, usage, lengths, accuracy, bypasses and scale-down."""
    policy = make_policy(warmup_requests=20)
    arrive_clustered(policy, 20)
    policy.maybe_refresh(5.0)
    stats = json.loads(json.dumps(policy.stats()))
    for key in (
        "num_queues",
        "cutoffs",
        "quotas",
        "usage",
        "num_waiting",
        "predictor",
        "num_bypasses",
        "num_squashes",
        "quota_scaled_down",
        "min_quotas",
        "wcss",
    ):
        assert key in stats
    assert stats["num_queues"] == len(stats["cutoffs"]) + 1 == len(stats["quotas"])


def test_quota_minimums_use_observed_demand():
    """After traffic with finished requests, refreshed quotas carry non-zero minimums."""
    policy = make_policy(warmup_requests=20, total_tokens=100_000)
    arrive_clustered(policy, 20)
    policy.schedule_pass(admit_all, now=2.0)  # first fit (no demand yet), then admits all
    assert policy.plan.minimums == (0.0, 0.0)
    for rid in [f"w0.0-{i}" for i in range(20)]:
        policy.on_finish(rid, output_len=10, now=4.0)
    assert policy.maybe_refresh(62.0)
    assert policy.plan.num_queues == 2
    assert all(m > 0 for m in policy.plan.minimums)


def test_identical_event_streams_give_identical_decisions():
    """Two policies fed the same events make the same decisions (no clocks, no randomness)."""

    def run() -> list[list[str]]:
        policy = ChameleonPolicy(
            make_config(warmup_requests=20), make_limits(), 3000, predictor=MaxNewTokensPredictor()
        )
        arrive_clustered(policy, 40)
        decisions = []
        for step in range(5):
            admitted = policy.schedule_pass(ScriptedEngine(), now=10.0 + step).admitted
            decisions.append(ids(admitted))
            for entry in admitted[:1]:
                policy.on_finish(entry.request_id, 5, now=10.5 + step)
        return decisions

    assert run() == run()
