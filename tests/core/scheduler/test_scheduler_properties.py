"""Properties of Algorithm 1 under random queues, quotas, engine verdicts and event streams."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_factories import ADAPTER_MISFIT, ADMITTED, QUEUE_MISFIT, STOP, make_entry, make_queue

from chameleon_sglang.scheduler import (
    AdmitResult,
    BypassHooks,
    MultiLevelQueue,
    QueueDemand,
    QueueLayout,
    RequestEntry,
    plan_quotas,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

verdicts = st.sampled_from([ADMITTED] * 6 + [QUEUE_MISFIT, ADAPTER_MISFIT, STOP])


@st.composite
def pass_setups(draw) -> Tuple[MultiLevelQueue, Dict[str, AdmitResult]]:
    """A queue with random quotas, some running requests and a random waiting set."""
    k = draw(st.integers(1, 4))
    mlq = make_queue([10**9] * k)
    running = draw(st.lists(st.tuples(st.integers(0, k - 1), st.integers(1, 200)), max_size=6))
    for i, (queue, charge) in enumerate(running):
        mlq.add(make_entry(f"run{i}", queue=queue, charge=charge))
    mlq.schedule_pass(lambda e: ADMITTED)
    mlq.set_quotas(draw(st.lists(st.integers(0, 400), min_size=k, max_size=k)))
    waiting = draw(st.lists(st.tuples(st.integers(0, k - 1), st.integers(1, 200)), max_size=25))
    script = {}
    for i, (queue, charge) in enumerate(waiting):
        adapter = draw(st.sampled_from(["hot", "cold", None]))
        mlq.add(
            make_entry(
                f"w{i}",
                queue=queue,
                charge=charge,
                adapter_id=adapter,
                predicted_output=draw(st.integers(1, charge)),
            )
        )
        script[f"w{i}"] = draw(verdicts)
    return mlq, script


@dataclasses.dataclass
class Observer:
    """try_admit that answers from a script and remembers what each queue had when asked."""

    mlq: MultiLevelQueue
    script: Dict[str, AdmitResult]
    seen: Dict[str, Tuple[int, int]] = dataclasses.field(default_factory=dict)

    def __call__(self, entry: RequestEntry) -> AdmitResult:
        q = entry.queue
        self.seen[entry.request_id] = (self.mlq.usage[q], self.mlq.quotas[q])
        return self.script.get(entry.request_id, ADMITTED)


HOOKS = BypassHooks(is_adapter_resident=lambda a: a == "hot", predicted_free_at=lambda h: 50.0)


def check_usage_matches_running(mlq: MultiLevelQueue, all_ids: List[str]) -> None:
    expected = [0] * mlq.num_queues
    for rid in all_ids:
        if rid in mlq and mlq.get(rid).is_running:
            expected[mlq.get(rid).queue] += mlq.get(rid).charge
    assert list(mlq.usage) == expected


@FAST
@given(pass_setups())
def test_admitted_charge_fits_what_its_queue_had(setup):
    """Phase 1: charge <= quota - usage (or the queue was idle); phase 2: plus the donations."""
    mlq, script = setup
    observer = Observer(mlq, script)
    result = mlq.schedule_pass(observer, hooks=HOOKS)
    for entry in result.admitted_phase1:
        usage, quota = observer.seen[entry.request_id]
        assert usage == 0 or entry.charge <= quota - usage
    pool = 0 if result.is_lending_withheld else result.donated_tokens
    for entry in result.admitted_phase2:
        usage, quota = observer.seen[entry.request_id]
        own = max(quota - usage, 0)
        assert entry.charge <= own + pool
        pool -= max(entry.charge - own, 0)


@FAST
@given(pass_setups())
def test_queue_that_did_not_drain_donates_nothing(setup):
    """A queue still holding waiting requests after the pass donated nothing."""
    mlq, script = setup
    result = mlq.schedule_pass(Observer(mlq, script), hooks=HOOKS)
    for q in range(mlq.num_queues):
        if mlq.num_waiting(q) > 0:
            assert result.donated[q] == 0
        assert result.donated[q] >= 0


@FAST
@given(pass_setups())
def test_smaller_queues_are_served_first(setup):
    """Each phase admits queue by queue, smallest first (the first pass of a queue is unrotated)."""
    mlq, script = setup
    result = mlq.schedule_pass(Observer(mlq, script), hooks=HOOKS)
    assert result.turn_order == tuple(range(mlq.num_queues))
    for phase in (result.admitted_phase1, result.admitted_phase2):
        queues = [e.queue for e in phase]
        assert queues == sorted(queues)


@FAST
@given(pass_setups())
def test_usage_is_the_sum_of_running_charges_after_a_pass(setup):
    """After a pass every queue's usage is exactly the charges of its running requests."""
    mlq, script = setup
    all_ids = [e.request_id for e in mlq] + [f"run{i}" for i in range(6)]
    mlq.schedule_pass(Observer(mlq, script), hooks=HOOKS)
    check_usage_matches_running(mlq, all_ids)


OPS = ("add", "add", "pass", "pass", "finish", "retract", "grow", "abort", "relayout", "squash")


@FAST
@given(
    st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 10**6)), max_size=60),
    st.lists(verdicts, min_size=1, max_size=16),
)
def test_quota_is_conserved(ops, verdict_cycle):
    """Whatever happens, usage tracks running charges (and the running-bypass index the running
    bypass requests), and is zero once everything is released."""
    mlq = make_queue([150, 100, 80, 50])
    all_ids: List[str] = []
    calls = [0]

    def engine(entry: RequestEntry) -> AdmitResult:
        calls[0] += 1
        return verdict_cycle[calls[0] % len(verdict_cycle)]

    for op, n in ops:
        running = [e for e in _entries(mlq, all_ids) if e.is_running]
        if op == "add":
            rid = f"r{len(all_ids)}"
            all_ids.append(rid)
            mlq.add(
                make_entry(
                    rid, queue=n % 4, charge=1 + n % 120, adapter_id=("hot", "cold", None)[n % 3]
                )
            )
        elif op == "pass":
            mlq.schedule_pass(engine, hooks=HOOKS)
        elif op == "relayout":
            cutoffs = ((), (0.5,), (0.2, 0.45, 0.75))[n % 3]
            mlq.set_layout(QueueLayout(cutoffs), [100 + n % 50] * (len(cutoffs) + 1))
        elif running:
            target = running[n % len(running)]
            if op == "finish":
                mlq.release(target.request_id)
            elif op == "retract":
                mlq.requeue_front(target.request_id)
            elif op == "grow":
                mlq.update_charge(target.request_id, n % 300)
            elif op == "abort":
                mlq.remove(target.request_id)
            elif op == "squash" and target.is_bypass:
                mlq.squash(target.request_id)
        check_usage_matches_running(mlq, all_ids)
        bypasses = {e.request_id for e in _entries(mlq, all_ids) if e.is_running and e.is_bypass}
        assert {e.request_id for e in mlq.running_bypasses()} == bypasses
        assert all(e.queue == mlq.layout.queue_of(e.wrs) for e in _entries(mlq, all_ids))
        for q in range(mlq.num_queues):
            orders = [e.order for e in _entries(mlq, all_ids) if not e.is_running and e.queue == q]
            assert [e.order for e in mlq if e.queue == q] == sorted(orders)
    for entry in _entries(mlq, all_ids):
        if entry.is_running:
            mlq.release(entry.request_id)
        else:
            mlq.remove(entry.request_id)
    assert mlq.usage == (0,) * mlq.num_queues and len(mlq) == 0 and mlq.num_running == 0


def _entries(mlq: MultiLevelQueue, all_ids: List[str]) -> List[RequestEntry]:
    return [mlq.get(rid) for rid in all_ids if rid in mlq]


@dataclasses.dataclass
class MemoryEngine:
    """A toy engine: token memory of ``capacity`` and at most ``max_running`` requests; each
    admitted request runs for ``duration(entry)`` passes."""

    capacity: int
    max_running: int
    small_duration: int
    remaining: Dict[str, int] = dataclasses.field(default_factory=dict)
    used: int = 0

    def __call__(self, entry: RequestEntry) -> AdmitResult:
        if len(self.remaining) >= self.max_running:
            return STOP
        if self.used + entry.charge > self.capacity:
            return QUEUE_MISFIT
        self.used += entry.charge
        is_large = entry.request_id == "large"
        self.remaining[entry.request_id] = 10**9 if is_large else self.small_duration
        return ADMITTED

    def step(self, mlq: MultiLevelQueue) -> None:
        for rid in list(self.remaining):
            self.remaining[rid] -= 1
            if self.remaining[rid] == 0:
                del self.remaining[rid]
                self.used -= mlq.release(rid).charge


@FAST
@given(
    capacity=st.integers(200, 2000),
    max_running=st.integers(2, 64),
    small_duration=st.integers(1, 8),
    arrivals_per_pass=st.integers(1, 8),
    small_charge=st.integers(1, 40),
    medium_every=st.integers(0, 3),
    large_fraction=st.floats(0.05, 1.0),
)
def test_large_request_is_not_starved_by_a_steady_small_stream(
    capacity,
    max_running,
    small_duration,
    arrivals_per_pass,
    small_charge,
    medium_every,
    large_fraction,
):
    """With small requests arriving every pass, a large request is admitted within a bounded
    number of passes (even one larger than its queue's whole quota, if memory can hold it)."""
    quotas = plan_quotas([QueueDemand(0.0, 0.0, 0.0)] * 4, capacity, slo_s=5.0).quotas
    mlq = make_queue(quotas)
    engine = MemoryEngine(capacity, max_running, small_duration)
    large_charge = max(1, int(large_fraction * (capacity - quotas[0] - quotas[1])))
    bound = 4 * small_duration + 10
    n = 0
    for step in range(20 + bound):
        for _ in range(arrivals_per_pass):
            mlq.add(make_entry(f"s{n}", queue=0, charge=min(small_charge, quotas[0])))
            n += 1
        if medium_every and step % medium_every == 0:
            mlq.add(make_entry(f"m{step}", queue=1, charge=min(3 * small_charge, quotas[1])))
        if step == 20:
            mlq.add(make_entry("large", queue=3, charge=large_charge))
        mlq.schedule_pass(engine)
        if "large" in engine.remaining:
            assert step - 20 <= bound
            return
        engine.step(mlq)
    raise AssertionError(f"large request still waiting after {bound} passes")
