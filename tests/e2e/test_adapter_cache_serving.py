"""End to end: the adapter cache as SGLang's LoRA pool (tiny model, 40 adapters, fp32).

Real servers on loopback. Outputs must equal the stock server's (which ``test_serving`` checks
against HF+peft) and HF+peft's; batches hold more than SGLang's 8 adapters; the cache gives KV
memory back under pressure without failing or retracting a request, and grows again; unloading
a cached or in-use adapter loses nothing. SGLang's strict idle memory check is on (its default),
so a slot the cache leaked would crash the server.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import pytest
import requests
from client import generate, healthy, integrity_problems
from conftest import start_servers, stop_server
from reference import reference_outputs

from chameleon_sglang.dev.assets import Assets, build
from chameleon_sglang.memory.kv_store import SPLIT_ENV

pytestmark = pytest.mark.slow

NUM_ADAPTERS = 40
NUM_REQUESTS = 96
CONCURRENCY = 24
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def assets40() -> Assets:
    return build("tiny", num_adapters=NUM_ADAPTERS)


def _workload(assets: Assets, seed: int = 7) -> List[Tuple[List[int], Optional[str]]]:
    """Random mixed traffic: prompts of 4-60 tokens, every adapter (ranks 8-128), some base."""
    rng = random.Random(seed)
    names: List[Optional[str]] = [a.name for a in assets.adapters] + [None]
    return [
        ([rng.randrange(5, 2000) for _ in range(rng.randrange(4, 60))], rng.choice(names))
        for _ in range(NUM_REQUESTS)
    ]


def _run(url: str, workload: List[Tuple[List[int], Optional[str]]]) -> List[List[int]]:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        outs = list(pool.map(lambda w: generate(url, w[0], w[1], NEW_TOKENS), workload))
    return [o["output_ids"] for o in outs]


def _cache_stats(url: str) -> Dict:
    return requests.get(url + "/chameleon/stats", timeout=30).json()["ranks"][0]["adapter_cache"]


MIXED_ARMS = ("stock", "chameleon", "chameleon-split")


@pytest.fixture(scope="module")
def module_servers(assets40, tmp_path_factory):
    """Every server of this module, started side by side: the mixed-traffic arms (``mixed-*``;
    ``chameleon-split`` places every adapter in the pieces of its split layout, as on fragmented
    memory) and ``pressure`` (a small KV pool, see ``cache_server``)."""
    log_dir = tmp_path_factory.mktemp("cache-logs")
    specs = [
        dict(assets=assets40, log_dir=log_dir, name=f"mixed-{arm}", chameleon=arm != "stock")
        for arm in MIXED_ARMS
    ]
    specs.append(
        dict(
            assets=assets40,
            log_dir=log_dir,
            name="pressure",
            chameleon=True,
            max_total_tokens=PRESSURE_TOTAL_TOKENS,
        )
    )
    servers = start_servers(specs, env=[{}, {}, {SPLIT_ENV: "1"}, {}])
    try:
        yield dict(zip([*MIXED_ARMS, "pressure"], servers))
    finally:
        for srv in servers:
            stop_server(srv)


@pytest.fixture(scope="module")
def mixed_traffic(assets40, module_servers):
    """The same concurrent mixed workload on stock SGLang, on --chameleon, and on --chameleon
    with every adapter placed in the pieces of its split layout."""
    workload = _workload(assets40)
    results = {"workload": workload}
    for arm in MIXED_ARMS:  # one at a time; the others idle
        srv = module_servers[arm]
        results[arm] = _run(srv.url, workload)
        if arm != "stock":
            results[f"stats-{arm}"] = _cache_stats(srv.url)
        assert healthy(srv.url)
        assert integrity_problems(srv.url) == []
    results["stats"] = results["stats-chameleon"]
    return results


def test_outputs_equal_stock_under_mixed_concurrent_traffic(mixed_traffic):
    """40 adapters of mixed ranks, 24 concurrent clients: every greedy output is the stock
    server's, token for token."""
    mismatches = [
        i
        for i, (a, b) in enumerate(zip(mixed_traffic["stock"], mixed_traffic["chameleon"]))
        if a != b
    ]
    assert not mismatches, [(i, mixed_traffic["workload"][i][1]) for i in mismatches]
    assert all(len(out) == NEW_TOKENS for out in mixed_traffic["chameleon"])


def test_adapters_split_into_pieces_serve_the_same_outputs(mixed_traffic):
    """Every adapter in separate runs of KV slots (its split layout): the same greedy outputs
    as stock, token for token; the loads were split ones."""
    mismatches = [
        i
        for i, (a, b) in enumerate(zip(mixed_traffic["stock"], mixed_traffic["chameleon-split"]))
        if a != b
    ]
    assert not mismatches, [(i, mixed_traffic["workload"][i][1]) for i in mismatches]
    stats = mixed_traffic["stats-chameleon-split"]
    assert stats["split_loads"] == stats["num_loads"] > 0, stats


def test_outputs_equal_hf_peft(mixed_traffic, assets40):
    """A sample of the chameleon outputs equals HF transformers + peft."""
    sample = [(i, w) for i, w in enumerate(mixed_traffic["workload"]) if w[1] is not None][:3]
    for i, (ids, adapter) in sample:
        ref = reference_outputs(assets40, {adapter: str(assets40.adapter(adapter).path)}, [ids])
        assert mixed_traffic["chameleon"][i] == ref[(adapter, 0)][:NEW_TOKENS]


def test_batches_hold_more_adapters_than_sglang_slots(mixed_traffic):
    """The per-batch cap of SGLang's pool (8) is gone: batches held more distinct adapters,
    all of them resident in KV memory, loaded once per residency."""
    stats = mixed_traffic["stats"]
    assert stats["max_distinct_adapters_per_batch"] > 8, stats
    assert stats["misses"] >= 1 and stats["bytes_loaded"] > 0
    assert stats["num_loads"] == stats["misses"] + stats["prefetch_loads"]
    assert stats["num_in_use"] == 0  # every request released its adapter


# -- memory pressure and unload -------------------------------------------------------------
PRESSURE_TOTAL_TOKENS = 8192
LONG_PROMPT = 1800
LONG_REQUESTS = 4


@pytest.fixture(scope="module")
def cache_server(module_servers):
    return module_servers["pressure"]


def _small_adapters(assets: Assets, count: int) -> List[str]:
    return [a.name for a in assets.adapters if a.rank <= 16][:count]


def test_cache_gives_memory_back_under_kv_pressure_and_grows_again(cache_server, assets40):
    """Long base-model requests fill the KV pool while idle adapters fill the rest: the cache
    shrinks (KV-pressure evictions), no request fails or is retracted, and it grows back."""
    url = cache_server.url
    warm = _small_adapters(assets40, 12)
    for name in warm:
        generate(url, [7, 8, 9, 10], name, 2)
    before = _cache_stats(url)
    assert before["num_resident"] >= len(warm) - 1 and before["resident_slots"] > 2000, before
    longs = [[(13 * i + j) % 1900 + 5 for j in range(LONG_PROMPT)] for i in range(LONG_REQUESTS)]
    with ThreadPoolExecutor(LONG_REQUESTS) as pool:
        outs = list(pool.map(lambda ids: generate(url, ids, None, 32), longs))
    assert all(len(o["output_ids"]) == 32 for o in outs)
    assert all(o["meta_info"].get("num_retractions", 0) == 0 for o in outs)
    during = _cache_stats(url)
    assert during["evictions_by_reason"]["kv_pressure"] > 0, during
    assert during["resident_slots"] < before["resident_slots"]
    for name in warm:
        generate(url, [7, 8, 9, 10], name, 2)
    after = _cache_stats(url)
    assert after["num_resident"] > during["num_resident"], (during, after)
    assert after["num_in_use"] == 0
    time.sleep(1.5)  # let the scheduler go idle: its strict leak check runs then
    assert healthy(url)
    assert integrity_problems(url) == []


def test_unload_of_a_cached_idle_adapter_drops_it(cache_server, assets40):
    """Unloading an adapter resident in the cache frees it at once; a later request for it is
    served as SGLang serves it (the tokenizer reloads an unloaded adapter from its path) with
    the same output, through a fresh cache load."""
    url = cache_server.url
    adapter = next(a for a in assets40.adapters if a.rank == 64)
    first = generate(url, [11, 12, 13], adapter.name, 6)["output_ids"]
    before = _cache_stats(url)
    resp = requests.post(url + "/unload_lora_adapter", json={"lora_name": adapter.name}, timeout=60)
    assert resp.status_code == 200 and resp.json()["success"], resp.text
    assert adapter.name not in resp.json()["loaded_adapters"]
    after = _cache_stats(url)
    assert after["num_resident"] == before["num_resident"] - 1
    assert after["evictions_by_reason"]["unload"] == before["evictions_by_reason"]["unload"] + 1
    assert generate(url, [11, 12, 13], adapter.name, 6)["output_ids"] == first
    assert _cache_stats(url)["misses"] == after["misses"] + 1


def test_unload_while_in_use_loses_nothing(cache_server, assets40):
    """Unloading an adapter while a request decodes with it: the request completes with all its
    tokens (the unload waits for it), then the adapter's cached copy is gone."""
    url = cache_server.url
    adapter = next(a for a in assets40.adapters if a.rank == 32)
    expected = generate(url, [21, 22, 23], adapter.name, 64)["output_ids"]
    unloads = _cache_stats(url)["evictions_by_reason"]["unload"]
    result: Dict[str, List[int]] = {}

    def long_request() -> None:
        result["ids"] = generate(url, [21, 22, 23], adapter.name, 64)["output_ids"]

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.3)
    resp = requests.post(
        url + "/unload_lora_adapter", json={"lora_name": adapter.name}, timeout=120
    )
    thread.join(timeout=120)
    assert resp.status_code == 200 and resp.json()["success"], resp.text
    assert result.get("ids") == expected
    assert adapter.name not in resp.json()["loaded_adapters"]
    stats = _cache_stats(url)
    assert stats["num_in_use"] == 0
    assert stats["evictions_by_reason"]["unload"] == unloads + 1
    assert healthy(url)
    assert integrity_problems(url) == []


@pytest.fixture(scope="module")
def q_v_only_adapter(assets40, tmp_path_factory):
    """An adapter on q_proj and v_proj only (the served ones carry every module)."""
    from chameleon_sglang.dev.assets import write_adapter

    out = tmp_path_factory.mktemp("qv-only") / "qv-r16"
    write_adapter(assets40.model_path, out, rank=16, seed=5, target_modules=("q_proj", "v_proj"))
    return out


RELOAD_ROUNDS = 5  # ends on the q/v-only adapter


def test_reload_under_traffic_with_other_ranks_and_modules(
    cache_server, assets40, q_v_only_adapter
):
    """One name unloaded and loaded again with another rank or another set of target modules
    while requests (some hanging up mid-stream) use it: every request completes or gets a clear
    4xx error, the scheduler raises nothing, the name then serves exactly what its newest
    adapter serves under a fresh name, and references, quotas and slots are consistent."""
    url = cache_server.url
    rank8 = next(a for a in assets40.adapters if a.rank == 8)
    rank128 = next(a for a in assets40.adapters if a.rank == 128)
    paths = [str(rank8.path), str(rank128.path), str(q_v_only_adapter)]
    name, prompt = "reloaded", [31, 32, 33, 34]

    def load(path: str) -> dict:
        return requests.post(
            url + "/load_lora_adapter", timeout=300, json={"lora_name": name, "lora_path": path}
        ).json()

    assert load(paths[0])["success"]
    outcomes: List[str] = []

    def use(num_new: int, hang_up: bool) -> None:
        body = {
            "input_ids": prompt,
            "lora_path": name,
            "stream": hang_up,
            "sampling_params": {"max_new_tokens": num_new, "temperature": 0, "ignore_eos": True},
        }
        with requests.post(url + "/generate", json=body, stream=hang_up, timeout=300) as resp:
            if hang_up:
                next(resp.iter_lines())  # first chunk, then hang up
                outcomes.append("hung-up")
            elif resp.status_code == 200:
                outcomes.append("ok" if len(resp.json()["output_ids"]) == num_new else "short")
            else:
                outcomes.append(f"{resp.status_code}:{resp.text[:60]}")

    for i in range(RELOAD_ROUNDS):
        users = [
            threading.Thread(target=use, args=(n, hang))
            for n, hang in ((8, False), (48, False), (8, False), (200, True))
        ]
        for t in users:
            t.start()
        time.sleep(0.1 + 0.05 * i)
        unloaded = requests.post(
            url + "/unload_lora_adapter", json={"lora_name": name}, timeout=300
        ).json()
        assert unloaded["success"], unloaded
        assert load(paths[(i + 1) % len(paths)])["success"]
        for t in users:
            t.join(timeout=300)
    assert len(outcomes) == 4 * RELOAD_ROUNDS
    assert all(o in ("ok", "hung-up") or o.startswith("400") for o in outcomes), outcomes

    newest = paths[RELOAD_ROUNDS % len(paths)]
    assert newest == str(q_v_only_adapter)
    fresh = requests.post(
        url + "/load_lora_adapter",
        timeout=300,
        json={"lora_name": "fresh-copy", "lora_path": newest},
    ).json()
    assert fresh["success"], fresh
    served = generate(url, prompt, name, 8)["output_ids"]
    assert served == generate(url, prompt, "fresh-copy", 8)["output_ids"]
    reference = reference_outputs(assets40, {"qv": newest}, [prompt])[("qv", 0)][:8]
    assert served == reference  # other target modules than the rest, computed right
    assert _cache_stats(url)["num_in_use"] == 0
    assert healthy(url) and integrity_problems(url) == []
    log = cache_server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Scheduler hit an exception" not in log
