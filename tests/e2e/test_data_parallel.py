"""Data parallelism on the CPU: ``--chameleon --dp-size 2 --load-balance-method chameleon``.

Each replica is its own scheduler process with its own Chameleon scheduler and adapter cache;
SGLang's DP controller dispatches by adapter affinity (``chameleon_sglang.dp``). Observable:
the greedy outputs of DP=1, every replica in ``/chameleon/stats``, requests following the replica
that holds their adapter, nothing lost under a burst that saturates both replicas, and adapters
from an adapter directory loaded on every replica on their first request.
"""

from __future__ import annotations

import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import requests
from client import TIMEOUT_S, generate, healthy, integrity_problems
from conftest import start_server, stop_server

from chameleon_sglang.dev.assets import Assets

# DP=1's reference outputs come from the session's --chameleon server (tests/conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("server", ["chameleon"], indirect=True)]

NUM_REQUESTS = 24
NEW_TOKENS = 8
DP2 = ["--dp-size", "2", "--load-balance-method", "chameleon", "--enable-metrics"]
RESERVED = 2  # the last adapters: kept for the residency test


def _workload(assets: Assets, n: int, seed: int) -> List[Tuple[List[int], Optional[str]]]:
    rng = random.Random(seed)
    names: List[Optional[str]] = [a.name for a in assets.adapters[:-RESERVED]] + [None]
    return [
        ([rng.randrange(5, 2000) for _ in range(rng.randrange(4, 60))], rng.choice(names))
        for _ in range(n)
    ]


def _run(url: str, work, threads: int = 8) -> List[List[int]]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda w: generate(url, w[0], w[1], NEW_TOKENS)["output_ids"], work))


def _replicas(url: str) -> List[Dict[str, Any]]:
    """Every replica's statistics, in DP rank order."""
    return requests.get(url + "/chameleon/stats", timeout=30).json()["ranks"]


def _taken(url: str) -> List[int]:
    return [rank["dp"]["num_requests"] for rank in _replicas(url)]


def _received(url: str) -> List[int]:
    """Requests each replica acknowledges to the controller (its reports' count)."""
    return [rank["dp"]["num_received"] for rank in _replicas(url)]


def _routed(url: str, adapter: Optional[str], replica: int, ids=(7, 8, 9, 10)) -> List[int]:
    body = {
        "input_ids": list(ids),
        "lora_path": adapter,
        "routed_dp_rank": replica,
        "sampling_params": {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
    }
    if adapter is None:
        del body["lora_path"]
    resp = requests.post(url + "/generate", json=body, timeout=TIMEOUT_S)
    resp.raise_for_status()
    return resp.json()["output_ids"]


@pytest.fixture(scope="module")
def dp1_outputs(tiny_assets, server) -> List[List[int]]:
    """DP=1's greedy outputs of the reference workload, on the session's ``--chameleon`` server
    (the same launch line without ``--dp-size``; every test of this module asks for that arm)."""
    assert server.arm == "chameleon"
    return _run(server.url, _workload(tiny_assets, NUM_REQUESTS, seed=5))


@pytest.fixture(scope="module")
def adapter_dir(tiny_assets, tmp_path_factory):
    """An adapter directory: copies of the first adapter under names the server is not told."""
    root = tmp_path_factory.mktemp("dp2-adapters")
    for name in ("disk-a", "disk-b"):
        shutil.copytree(tiny_assets.adapters[0].path, root / name)
    return root


@pytest.fixture(scope="module")
def dp2(tiny_assets, tmp_path_factory, dp1_outputs, adapter_dir):
    srv = start_server(
        tiny_assets,
        tmp_path_factory.mktemp("dp2"),
        "dp2",
        chameleon=True,
        extra_args=DP2 + ["--chameleon-adapter-dir", str(adapter_dir)],
    )
    try:
        yield srv
    finally:
        stop_server(srv)


def test_dp2_serves_the_greedy_outputs_of_dp1(tiny_assets, dp1_outputs, dp2):
    work = _workload(tiny_assets, NUM_REQUESTS, seed=5)
    dp1 = dp1_outputs
    before = sum(_taken(dp2.url))
    outs = _run(dp2.url, work)
    assert [i for i, (a, b) in enumerate(zip(dp1, outs)) if a != b] == []
    replicas = _replicas(dp2.url)
    assert [r["dp"]["dp_rank"] for r in replicas] == [0, 1]
    assert all(r["adapter_cache"] is not None and r["scheduler"] is not None for r in replicas)
    assert sum(_taken(dp2.url)) - before == NUM_REQUESTS
    log = dp2.log_path.read_text(errors="replace")
    assert "adapter-affinity dispatch over replicas [0, 1]" in log
    assert "Traceback" not in log


def test_prometheus_gauges_show_every_replica(dp2):
    for replica in (0, 1):
        _routed(dp2.url, None, replica)
    time.sleep(1.0)  # gauges publish at most every 0.5 s
    for replica in (0, 1):
        _routed(dp2.url, None, replica)
    metrics = requests.get(dp2.url + "/metrics", timeout=30).text
    for gauge in ("chameleon:num_queues", "chameleon:cache_bytes_loaded"):
        lines = [line for line in metrics.splitlines() if line.startswith(gauge + "{")]
        assert any('dp_rank="0"' in line for line in lines), (gauge, lines)
        assert any('dp_rank="1"' in line for line in lines), (gauge, lines)
    log = dp2.log_path.read_text(errors="replace")
    assert "Traceback" not in log


def test_requests_follow_the_replica_that_holds_their_adapter(tiny_assets, dp2):
    # adapters no other request of this module uses: resident nowhere until now
    first, second = (a.name for a in tiny_assets.adapters[-RESERVED:])
    _routed(dp2.url, first, 0)  # now resident on replica 0 only ...
    _routed(dp2.url, second, 1)  # ... and this one on replica 1 only
    time.sleep(0.5)  # the idle replicas' reports reach the controller
    before = _taken(dp2.url)
    for _ in range(4):
        generate(dp2.url, [11, 12, 13], first, 2)
    middle = _taken(dp2.url)
    for _ in range(4):
        generate(dp2.url, [11, 12, 13], second, 2)
    after = _taken(dp2.url)
    assert [m - b for m, b in zip(middle, before)] == [4, 0]
    assert [a - m for a, m in zip(after, middle)] == [0, 4]


def test_a_burst_that_saturates_both_replicas_loses_nothing(tiny_assets, dp2):
    work = _workload(tiny_assets, 64, seed=9)
    before, received_before = _taken(dp2.url), _received(dp2.url)
    outs = _run(dp2.url, work, threads=64)
    assert all(len(o) == NEW_TOKENS for o in outs)
    taken = [a - b for a, b in zip(_taken(dp2.url), before)]
    assert sum(taken) == len(work) and min(taken) > 0, taken
    # every request a replica took it also acknowledged, so none stays "in flight" for the
    # controller (health checks, which the controller routes itself, are not counted)
    assert [a - b for a, b in zip(_received(dp2.url), received_before)] == taken
    assert healthy(dp2.url)
    assert integrity_problems(dp2.url) == []


def _host_tier(url: str) -> Dict[str, Any]:
    return requests.get(url + "/chameleon/stats", timeout=30).json()["host_tier"]


def test_a_directory_adapter_loads_on_every_replica_on_its_first_request(tiny_assets, dp2):
    """A name the server was never told about, first asked on replica 1: loaded on both replicas
    (either serves it next, with the outputs of the same weights served by their own name),
    counted once per replica in the host tier, unloaded from both, and read again from disk."""
    same = tiny_assets.adapters[0]
    ids = (21, 22, 23, 24, 25)
    expected = _routed(dp2.url, same.name, 0, ids)
    assert _routed(dp2.url, "disk-a", 1, ids) == expected
    assert _routed(dp2.url, "disk-a", 0, ids) == expected
    file_bytes = (Path(same.path) / "adapter_model.safetensors").stat().st_size
    tier = _host_tier(dp2.url)
    assert (
        tier["used_bytes"] >= 2 * file_bytes
    )  # disk-a's weights on both replicas (and the others')
    unload = requests.post(
        dp2.url + "/unload_lora_adapter", json={"lora_name": "disk-a"}, timeout=TIMEOUT_S
    )
    assert unload.status_code == 200, unload.text
    assert _host_tier(dp2.url)["used_bytes"] == tier["used_bytes"] - 2 * file_bytes
    assert generate(dp2.url, list(ids), "disk-a", 2)["output_ids"] == expected
    # concurrent first requests on both replicas: one load, every request served
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: _routed(dp2.url, "disk-b", i % 2, ids), range(8)))
    assert outs == [expected] * 8
    assert "Traceback" not in dp2.log_path.read_text(errors="replace")
    # (after a refused name SGLang's LoRARegistry.release logs a TypeError of its own)
    missing = requests.post(
        dp2.url + "/generate",
        json={"input_ids": list(ids), "lora_path": "nowhere", "sampling_params": {}},
        timeout=TIMEOUT_S,
    )
    assert missing.status_code == 400 and "none of the adapter directories" in missing.text
    assert healthy(dp2.url) and integrity_problems(dp2.url) == []


def test_loads_describe_the_adapter_cache_of_each_replica(tiny_assets, dp2):
    """``/v1/loads`` (what SGLang's gateway and autoscalers poll), per replica: the LoRA section
    counts the adapters resident in that replica's cache, and idle cached adapters are not used
    KV (token usage is zero once nothing runs, while the cache holds adapters)."""
    for replica in (0, 1):
        _routed(dp2.url, tiny_assets.adapters[replica].name, replica)
    time.sleep(0.5)
    loads = requests.get(dp2.url + "/v1/loads", timeout=30).json()["loads"]
    replicas = _replicas(dp2.url)
    assert [load["dp_rank"] for load in loads] == [0, 1]
    for load, stats in zip(loads, replicas):
        cache = stats["adapter_cache"]
        assert cache["num_resident"] >= 1 and cache["resident_slots"] > 0
        assert load["lora"]["slots_total"] == cache["num_resident"], (load, cache)
        assert load["num_running_reqs"] == 0 and load["token_usage"] == 0.0, load
        assert load["num_used_tokens"] == 0, load
