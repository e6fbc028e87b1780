"""Two Chameleon servers behind SGLang's model gateway (``smg``), routed by adapter.

``smg launch --policy prefix_hash`` with the adapter's name in ``X-SMG-Routing-Key``
(``chameleon_sglang.dev.gateway``): requests for one adapter stick to one server until the
gateway's load bound trips, then spill; outputs are a single server's; a server taken away
mid-run loses no request that the gateway could send elsewhere. Each server's share is read from
its own access log (every ``POST /generate`` it answered).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import pytest
import requests
from client import TIMEOUT_S, generate, healthy, integrity_problems
from conftest import start_servers, stop_server

from chameleon_sglang.dev.gateway import (
    ROUTING_HEADER,
    gateway_command,
    smg_executable,
    workers_ready,
)
from chameleon_sglang.dev.serve import ServerProcess, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smg_executable() is None, reason="smg (the gateway) is not installed"),
]

SPILL = ("--prefix-hash-load-factor", "1.0", "--prefix-hash-balance-abs-threshold", "1")
"""A tight load bound, so that a handful of concurrent requests is enough to trip it."""


@pytest.fixture(scope="module")
def cluster(tiny_assets, tmp_path_factory):
    """Two ``--chameleon`` servers (started side by side) and ``smg`` in front of them."""
    log_dir = tmp_path_factory.mktemp("gateway")
    servers = start_servers(
        [dict(assets=tiny_assets, log_dir=log_dir, name=f"s{i}", chameleon=True) for i in (0, 1)]
    )
    port = free_port()
    command = gateway_command(port, [s.url for s in servers], ("--policy", "prefix_hash", *SPILL))
    gateway = ServerProcess(command, port, log_dir / "gateway.log").launch()
    try:
        deadline = time.monotonic() + 60
        while not workers_ready(gateway.url, 2):
            assert gateway.proc.poll() is None, (log_dir / "gateway.log").read_text()
            assert time.monotonic() < deadline, "smg did not register both servers"
            time.sleep(0.2)
        yield gateway, servers
    finally:
        gateway.stop()
        for server in servers:
            if server.proc is not None:
                stop_server(server)


def _answered(server: ServerProcess) -> int:
    """``POST /generate`` requests the server answered with 200 (its access log)."""
    return server.log_path.read_text(errors="replace").count('"POST /generate HTTP/1.1" 200')


def _via_gateway(url: str, ids: List[int], adapter: Optional[str], num_new: int = 4) -> dict:
    body = {
        "input_ids": ids,
        "lora_path": adapter,
        "sampling_params": {"max_new_tokens": num_new, "temperature": 0, "ignore_eos": True},
    }
    headers = {ROUTING_HEADER: adapter} if adapter else {}
    resp = requests.post(url + "/generate", json=body, headers=headers, timeout=TIMEOUT_S)
    resp.raise_for_status()
    return resp.json()


def _shares(servers, before: Tuple[int, ...]) -> List[int]:
    return [_answered(s) - b for s, b in zip(servers, before)]


def test_one_adapters_requests_stick_to_one_server(tiny_assets, cluster):
    gateway, servers = cluster
    for adapter in (a.name for a in tiny_assets.adapters[:4]):
        before = tuple(_answered(s) for s in servers)
        for i in range(5):  # one at a time: the load bound never trips
            _via_gateway(gateway.url, [5, 6, 7 + i], adapter)
        time.sleep(0.3)  # access log lines
        assert sorted(_shares(servers, before)) == [0, 5], adapter


@pytest.mark.parametrize("server", ["chameleon"], indirect=True)
def test_outputs_equal_a_single_servers(tiny_assets, cluster, server):
    gateway, _ = cluster
    for i, adapter in enumerate([a.name for a in tiny_assets.adapters] + [None]):
        ids = [11 + i, 12, 13, 14, 15]
        ours = _via_gateway(gateway.url, ids, adapter, 8)["output_ids"]
        assert ours == generate(server.url, ids, adapter, 8)["output_ids"], adapter


def test_concurrent_requests_for_one_adapter_spill_to_the_other_server(tiny_assets, cluster):
    gateway, servers = cluster
    adapter = tiny_assets.adapters[-1].name
    before = tuple(_answered(s) for s in servers)
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda i: _via_gateway(gateway.url, [9, i], adapter, 16), range(32)))
    assert len(outs) == 32
    time.sleep(0.3)
    shares = _shares(servers, before)
    assert sum(shares) == 32 and min(shares) > 0, shares


def test_a_server_taken_away_loses_no_request_the_gateway_could_resend(tiny_assets, cluster):
    """Server 1 is stopped (SIGINT, as an operator would) while requests run on both: every
    request completes (those it held are resent by the gateway, later ones go to server 0)."""
    gateway, servers = cluster
    names = [a.name for a in tiny_assets.adapters]
    done: List[str] = []

    def one(i: int) -> str:
        try:
            _via_gateway(gateway.url, [3, i % 50 + 5], names[i % len(names)], 8)
            outcome = "ok"
        except requests.RequestException as exc:
            outcome = f"request {i} failed: {exc}"
        done.append(outcome)
        return outcome

    before = tuple(_answered(s) for s in servers)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(48)]
        while len(done) < 12:
            time.sleep(0.05)
        assert _answered(servers[1]) > before[1]  # server 1 was serving
        stop_server(servers[1])
        outcomes = [f.result() for f in futures]
    assert [o for o in outcomes if o != "ok"] == []
    assert healthy(servers[0].url) and integrity_problems(servers[0].url) == []
