"""``--load-balance-method chameleon`` in a controller shaped like SGLang's (no processes): requests
follow the replicas' reports, ``routed_dp_rank`` wins, inactive replicas get nothing, and the
flag falls back to round robin where it cannot run."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import List, Optional

import pytest

from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.dp.residency_channel import ResidencyPublisher
from chameleon_sglang.integration import dp_controller as controller_routing
from chameleon_sglang.integration.dp_controller import AffinityRouting
from chameleon_sglang.integration.hooks import dp as sglang_hooks


class FakeController:
    """The attributes and method of SGLang's DataParallelController the routing uses."""

    def __init__(self, num: int) -> None:
        self._active_workers = list(range(num))
        self.status = [True] * num
        self.workers = [f"worker-{i}" for i in range(num)]

    def maybe_external_dp_rank_routing(self, req) -> bool:
        if req.routed_dp_rank is not None:
            sent.append((req.routed_dp_rank, req))
            return True
        return False


sent: List = []


@pytest.fixture(autouse=True)
def record_sends(monkeypatch):
    import sglang.srt.managers.io_struct as io_struct

    sent.clear()
    monkeypatch.setattr(
        io_struct, "sock_send", lambda worker, req: sent.append((int(worker.split("-")[1]), req))
    )


def request(adapter: Optional[str], prompt: int = 10, cap: int = 10, routed=None):
    return SimpleNamespace(
        lora_id=adapter,
        input_ids=[1] * prompt,
        routed_dp_rank=routed,
        sampling_params=SimpleNamespace(max_new_tokens=cap),
    )


@pytest.fixture
def routing(tmp_path):
    controller = FakeController(2)
    r = AffinityRouting(
        controller, epsilon=0.25, endpoint=f"ipc://{tmp_path}/res", miss_cost=1.0, slack=0.0
    )
    yield r
    r.reader.close()


def report(routing, replica, adapters, load):
    publisher = ResidencyPublisher(routing.reader.endpoint, replica)
    publisher.publish(adapters, load)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and routing.reader.socket.poll(10) == 0:
        pass
    routing.apply_reports()
    publisher.close()


def test_a_request_goes_to_the_replica_that_reports_its_adapter(routing):
    report(routing, 1, {"hot"}, 0)
    report(routing, 0, {"other"}, 0)
    for _ in range(3):
        routing.dispatch(request("hot"))
        report(routing, 1, {"hot"}, 0)  # served: replica 1 is idle again
    assert [replica for replica, _ in sent] == [1, 1, 1]


def test_load_bound_sends_overflow_to_the_other_replica(routing):
    report(routing, 1, {"hot"}, 0)
    for _ in range(20):
        routing.dispatch(request("hot"))
    counts = [sum(1 for r, _ in sent if r == i) for i in (0, 1)]
    assert counts[1] > counts[0] > 0
    assert max(counts) / (sum(counts) / 2) <= 1.25 + 1e-9 + 2 / 20  # within one request


def test_routed_dp_rank_is_obeyed_and_counted_in_that_replicas_load(routing):
    report(routing, 1, {"hot"}, 0)
    routing.dispatch(request("hot", routed=0))
    assert sent[0][0] == 0 and routing.dispatcher.load(0) == 20  # prompt 10 + cap 10
    routing.dispatch(request("other"))
    assert sent[1][0] == 1  # the replica that took the routed request is busier


def test_a_replica_that_goes_inactive_gets_nothing_and_comes_back(routing):
    report(routing, 1, {"hot"}, 0)
    routing.controller.status[1] = False
    for _ in range(5):
        routing.dispatch(request("hot"))
    assert {r for r, _ in sent} == {0}
    routing.controller.status[1] = True
    sent.clear()
    for _ in range(10):
        routing.dispatch(request(f"cold-{_}"))
    assert {r for r, _ in sent} == {0, 1}


def test_no_active_replica_is_an_error(routing):
    routing.controller.status[:] = [False, False]
    with pytest.raises(RuntimeError, match="No active DP workers"):
        routing.dispatch(request("a"))


def test_base_model_requests_go_to_the_least_loaded(routing):
    report(routing, 0, set(), 500)
    report(routing, 1, set(), 0)
    routing.dispatch(request(None))
    assert sent[0][0] == 1


def test_install_replaces_the_controllers_dispatch(tmp_path, monkeypatch):
    controller = FakeController(2)
    controller.dispatching = None
    controller.refresh_load_budget_on_dispatch = True
    monkeypatch.setattr(
        controller_routing, "residency_endpoint", lambda name: f"ipc://{tmp_path}/{name}"
    )
    config = ChameleonConfig(enabled=True, dp_epsilon=0.25, dp_miss_cost=1.0, dp_slack=0.0)
    routing = controller_routing.install_affinity_routing(controller, config, "tok")
    try:
        assert controller.dispatching == routing.dispatch
        assert controller.refresh_load_budget_on_dispatch is False
        dispatcher = routing.dispatcher
        assert (dispatcher.epsilon, dispatcher.miss_cost, dispatcher.slack) == (0.25, 1.0, 0.0)
    finally:
        routing.reader.close()


def test_from_str_builds_sglangs_controller_as_round_robin():
    from sglang.srt.managers.data_parallel_controller import LoadBalanceMethod

    original = LoadBalanceMethod.from_str.__func__
    original = getattr(original, "__wrapped__", original)
    hook = sglang_hooks.load_balance_method_from_str
    assert hook(original, LoadBalanceMethod, "chameleon") == LoadBalanceMethod.ROUND_ROBIN
    assert hook(original, LoadBalanceMethod, "total_tokens") == LoadBalanceMethod.TOTAL_TOKENS
    with pytest.raises(ValueError):
        hook(original, LoadBalanceMethod, "nonsense")


def args(**kw):
    base = dict(
        chameleon=True,
        load_balance_method="chameleon",
        dp_size=2,
        enable_dp_attention=False,
        disaggregation_mode="null",
    )
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"chameleon": False}, "needs --chameleon"),
        ({"enable_dp_attention": True}, "dp-attention"),
        ({"disaggregation_mode": "prefill"}, "disaggregation"),
    ],
)
def test_flags_it_cannot_serve_are_named(overrides, words):
    assert words in sglang_hooks.affinity_unsupported_reason(args(**overrides))
    assert not sglang_hooks.affinity_enabled(args(**overrides))


def test_affinity_is_on_only_with_several_replicas():
    assert sglang_hooks.affinity_enabled(args())
    assert not sglang_hooks.affinity_enabled(args(dp_size=1))
    assert not sglang_hooks.affinity_enabled(args(load_balance_method="round_robin"))


def test_the_flag_is_a_choice_of_sglangs_parser():
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    parsed = parser.parse_args(["--model-path", "m", "--load-balance-method", "chameleon"])
    assert parsed.load_balance_method == "chameleon"
