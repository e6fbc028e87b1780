"""The Chameleon scheduler inside a real SGLang server: head-of-line blocking is gone, queues and
quotas are fitted live, and the stats endpoint reports them.

Scenario (the same for both arms, one server at a time): a long "hog" request holds most of the
KV pool; a "large" request that cannot fit until the hog finishes arrives next; then small
requests that fit easily. Stock SGLang admits in arrival order and stops at the large request,
so the small ones wait for the hog. Chameleon puts the small ones in their own queue and admits
them at once.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Dict, List, Optional, Tuple

import pytest
import requests
from conftest import start_servers, stop_server

pytestmark = pytest.mark.slow

COMMON = ["--chunked-prefill-size", "512"]
HOG = ("hog", 1600, "a004r128", 300)
LARGE = ("large", 1900, "a004r128", 16)
SMALLS = [(f"small{i}", 20 + i, "a000r8", 8) for i in range(6)]
# Stock SGLang keeps adapters in LoRA slots outside the KV pool; the adapter cache lives in it.
# The Chameleon arm's pool is the stock KV pool plus room for this scenario's two adapters
# (rank 128: 2880 slots, rank 8: 180 slots of this tiny model).
HOL_TOTAL_TOKENS = {"stock": 3072, "chameleon": 3072 + 3072}


first_token: Dict[str, float] = {}
sent_at: Dict[str, float] = {}
output_ids: Dict[str, List[int]] = {}


def _stream(
    url: str,
    ids: List[int],
    adapter: Optional[str],
    max_new: int,
    t0: float,
    out: Dict[str, Tuple[float, float]],
    name: str,
) -> None:
    body = {
        "input_ids": ids,
        "stream": True,
        "lora_path": adapter,
        "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True},
    }
    first = None
    last: List[int] = []
    sent_at[name] = time.monotonic() - t0
    with requests.post(url + "/generate", json=body, stream=True, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith(b"data:") and b"[DONE]" not in line:
                last = json.loads(line[5:])["output_ids"]
                if first is None:
                    first = time.monotonic() - t0
                    first_token[name] = first
    output_ids[name] = last
    out[name] = (first, time.monotonic() - t0)


def run_scenario(url: str) -> Dict[str, Tuple[float, float]]:
    """Times (first token, end) in seconds from the start, per request name."""
    t0 = time.monotonic()
    out: Dict[str, Tuple[float, float]] = {}
    threads = []
    for shared in (first_token, sent_at, output_ids):
        shared.clear()

    def send(name: str, input_len: int, adapter: str, max_new: int) -> None:
        ids = [10 + (i * 7 + len(name)) % 2000 for i in range(input_len)]
        t = threading.Thread(target=_stream, args=(url, ids, adapter, max_new, t0, out, name))
        t.start()
        threads.append(t)

    send(*HOG)
    while "hog" not in first_token and time.monotonic() - t0 < 120:
        time.sleep(0.02)
    send(*LARGE)  # the hog is decoding now
    time.sleep(0.3)
    for small in SMALLS:  # a stream of short rank-8 requests
        send(*small)
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=300)
    assert set(out) == {"hog", "large", *(s[0] for s in SMALLS)}  # every request completed
    out["ttft"] = {name: first_token[name] - sent_at[name] for name in out}
    out["output_ids"] = dict(output_ids)
    return out


SCENARIO_ARMS = {
    "stock": COMMON,
    "chameleon": COMMON + ["--chameleon", "--chameleon-scheduler", "static"],
}


@pytest.fixture(scope="module")
def module_servers(tiny_assets, tmp_path_factory):
    """Every server of this module, started side by side: the scenario's two (``hol-*``) and
    ``dynamic`` (see ``dynamic_server``); each test uses its own while the others idle."""
    log_dir = tmp_path_factory.mktemp("hol-logs")
    specs = [
        dict(
            assets=tiny_assets,
            log_dir=log_dir,
            name=f"hol-{arm}",
            chameleon=False,
            max_total_tokens=HOL_TOTAL_TOKENS[arm],
            extra_args=extra,
        )
        for arm, extra in SCENARIO_ARMS.items()
    ]
    dynamic = ["--chameleon-warmup-requests", "12", "--enable-metrics", *FEATURES]
    specs.append(
        dict(
            assets=tiny_assets, log_dir=log_dir, name="dynamic", chameleon=True, extra_args=dynamic
        )
    )
    servers = start_servers(specs)
    try:
        yield dict(zip([*SCENARIO_ARMS, "dynamic"], servers))
    finally:
        for srv in servers:
            stop_server(srv)


@pytest.fixture(scope="module")
def scenario_times(module_servers):
    """Run the scenario on stock SGLang and on Chameleon (static queues), one after the other."""
    results = {}
    servers = [module_servers[arm] for arm in SCENARIO_ARMS]
    for arm, srv in zip(SCENARIO_ARMS, servers):  # one at a time: the others idle
        results[arm] = run_scenario(srv.url)
        if arm == "chameleon":
            results["stats"] = requests.get(srv.url + "/chameleon/stats", timeout=30).json()
    return results


def test_stock_small_requests_wait_behind_the_large_one(scenario_times):
    """Stock SGLang: small requests start no earlier than the blocked large request."""
    t = scenario_times["stock"]
    large_first = t["large"][0]
    # the large request really was blocked: its first token came once the hog had finished
    # (not a fixed time after the hog's first: how long the hog decodes depends on the machine)
    assert large_first >= t["hog"][1] - 0.1 and large_first > t["hog"][0] + 0.5, t
    for name, _, _, _ in SMALLS:
        assert t[name][0] >= large_first - 0.25, (name, t)


def test_chameleon_small_requests_pass_the_blocked_large_one(scenario_times):
    """Chameleon: small requests are admitted from their own queue and finish before the large
    request (which waits for memory) produces its first token."""
    t = scenario_times["chameleon"]
    for name, _, _, _ in SMALLS:
        assert t[name][1] < t["large"][0], (name, t)
        assert t[name][1] < t["hog"][1], (name, t)


def test_short_requests_ttft_halved_with_identical_outputs(scenario_times):
    """Short rank-8 requests behind long rank-128 ones: median TTFT under --chameleon is at
    most half of stock's, and every request's greedy output is the same in both arms."""
    stock, chameleon = scenario_times["stock"], scenario_times["chameleon"]
    shorts = [name for name, _, _, _ in SMALLS]
    stock_ttft = statistics.median(stock["ttft"][n] for n in shorts)
    chameleon_ttft = statistics.median(chameleon["ttft"][n] for n in shorts)
    assert chameleon_ttft <= 0.5 * stock_ttft, (chameleon_ttft, stock_ttft)
    assert chameleon["output_ids"] == stock["output_ids"]
    assert all(
        len(ids) == n
        for (name, _, _, n) in [HOG, LARGE, *SMALLS]
        for ids in [chameleon["output_ids"][name]]
    )


def test_chameleon_stats_report_static_queues(scenario_times):
    """/chameleon/stats shows 4 static queues with equal quotas and every request accounted."""
    sched = scenario_times["stats"]["ranks"][0]["scheduler"]
    assert sched["mode"] == "static" and sched["num_queues"] == 4
    assert sched["cutoffs"] == sorted(sched["cutoffs"]) and len(sched["cutoffs"]) == 3
    assert len(set(sched["quotas"])) == 1 and sum(sched["quotas"]) == HOL_TOTAL_TOKENS["chameleon"]
    assert sched["num_arrivals"] >= 2 + len(SMALLS)  # plus the server's own warm-up request
    # Every request finished, so every charge came back: quota is conserved.
    assert sched["num_running"] == 0 and sum(sched["num_waiting"]) == 0
    assert sched["usage"] == [0, 0, 0, 0]


FEATURES = [
    "--max-running-requests",
    "2",
    "--lora-drain-wait-threshold",
    "0.5",
    "--chunked-prefill-size",
    "256",
    "--max-loras-per-batch",
    "2",
]


@pytest.fixture(scope="module")
def dynamic_server(module_servers):
    """One server for the two tests below, in file order: dynamic queues fitted after 12
    arrivals, metrics on, and SGLang features the scheduler must keep working (FEATURES)."""
    return module_servers["dynamic"]


def test_dynamic_queues_are_fitted_from_live_traffic(dynamic_server):
    """Dynamic mode fits K-means queues once the warm-up requests have arrived."""
    srv = dynamic_server
    jobs = [([11 + i] * 8, "a000r8", 4) for i in range(8)]
    jobs += [([13 + i] * 900, "a004r128", 64) for i in range(6)]
    threads = [
        threading.Thread(target=_stream, args=(srv.url, ids, adapter, n, time.monotonic(), {}, "x"))
        for ids, adapter, n in jobs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    # One more request so that a pass runs after the warm-up arrivals.
    _stream(srv.url, [5] * 8, "a000r8", 2, time.monotonic(), {}, "last")
    sched = requests.get(srv.url + "/chameleon/stats", timeout=30).json()["ranks"][0]["scheduler"]
    metrics = requests.get(srv.url + "/metrics", timeout=30).text
    assert sched["mode"] == "dynamic"
    assert sched["num_refreshes"] >= 1
    assert sched["num_queues"] >= 2, sched  # two clearly separated request sizes
    assert len(sched["quotas"]) == sched["num_queues"]
    assert sched["predictor"]["num_outcomes"] >= 14
    # The same statistics as Prometheus gauges with --enable-metrics.
    assert "chameleon:num_queues" in metrics
    assert "chameleon:queue_quota_tokens{" in metrics and 'queue="0"' in metrics
    assert "chameleon:predictor_within_tolerance" in metrics
    # ... and the adapter cache's.
    assert "chameleon:cache_misses" in metrics and "chameleon:cache_bytes_loaded" in metrics
    assert "chameleon:cache_evictions_by_reason{" in metrics and 'reason="unload"' in metrics


def test_chameleon_keeps_sglang_features_working(tiny_assets, dynamic_server):
    """--max-running-requests, the LoRA drainer, chunked prefill and grammar-constrained
    requests all keep working under the Chameleon scheduler."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    srv = dynamic_server

    def one(i: int) -> int:
        adapter = tiny_assets.adapters[i % len(tiny_assets.adapters)].name
        body = {
            "input_ids": [10 + i] * (40 + 300 * (i % 2)),
            "lora_path": adapter,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        }
        resp = requests.post(srv.url + "/generate", json=body, timeout=300)
        resp.raise_for_status()
        return len(resp.json()["output_ids"])

    with ThreadPoolExecutor(max_workers=10) as pool:
        assert list(pool.map(one, range(10))) == [6] * 10

    body = {
        "text": "Give me a number:",
        "lora_path": "a001r16",
        "sampling_params": {"max_new_tokens": 24, "temperature": 0, "regex": "(yes|no), [0-9]{3}"},
    }
    resp = requests.post(srv.url + "/generate", json=body, timeout=300)
    resp.raise_for_status()
    assert re.fullmatch(r"(yes|no), [0-9]{3}", resp.json()["text"]), resp.json()["text"]
    sched = requests.get(srv.url + "/chameleon/stats", timeout=30).json()["ranks"][0]["scheduler"]
    assert sched["num_running"] == 0 and sum(sched["num_waiting"]) == 0
    assert sched["usage"] == [0] * sched["num_queues"]
