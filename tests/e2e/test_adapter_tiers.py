"""The adapter tiers below the device cache, on real servers: disk reads off the scheduler loop,
the byte-bounded host tier, backoff after a failed load, unload from every tier.

Two servers of one adapter directory start side by side, every adapter read made slower
(``CHAMELEON_ADAPTER_READ_DELAY_S``: a slow disk): ``background`` (the default: reads on worker
threads, 1 s each, a 1.5 MB host budget) and ``in_loop`` (``--chameleon-adapter-read-workers 0``:
reads in the scheduler loop, as SGLang does, 1.5 s each; at most two adapters loaded), the
contrast that shows what the workers remove.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import pytest
import requests
from client import generate, healthy
from conftest import start_servers, stop_server

from chameleon_sglang.dev.assets import Assets

pytestmark = pytest.mark.slow

READ_DELAY_S = 1.5  # reads in the loop (the contrast)
BACKGROUND_READ_DELAY_S = 1.0  # reads on the workers (every other test reads there)
BUDGET_GB = 0.0015  # about the tiny rank-8, 16 and 32 adapters together, not with rank 64
NAMES = ("a000r8", "a001r16", "a002r32", "a003r64", "a006r16", "a007r32")
COLD = "a005r8"  # for the stall test only
PROMPT = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def adapter_dir(tiny_assets: Assets, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiers")
    for name in NAMES:
        shutil.copytree(tiny_assets.adapter(name).path, root / name)
    shutil.copytree(tiny_assets.adapter(COLD).path, root / COLD)
    shutil.copytree(tiny_assets.adapter("a000r8").path, root / "broken")
    shutil.copytree(tiny_assets.adapter("a000r8").path, root / "vanishing")
    weights = root / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return root


@pytest.fixture(scope="module")
def servers(tiny_assets: Assets, adapter_dir: Path, tmp_path_factory):
    logs = tmp_path_factory.mktemp("tiers-logs")
    common = ["--chameleon-adapter-dir", str(adapter_dir), "--max-lora-rank", "64"]
    specs = [
        dict(
            extra_args=[*common, "--chameleon-host-cache-gb", str(BUDGET_GB), "--enable-metrics"],
            name="background",
        ),
        dict(
            extra_args=[
                *common,
                "--chameleon-adapter-read-workers",
                "0",
                *("--max-loaded-loras", "2", "--max-loras-per-batch", "2"),
            ],
            name="in_loop",
        ),
    ]
    delay = "CHAMELEON_ADAPTER_READ_DELAY_S"
    started = start_servers(
        [dict(assets=tiny_assets, log_dir=logs, chameleon=True, adapters=[], **s) for s in specs],
        env=[{delay: str(BACKGROUND_READ_DELAY_S)}, {delay: str(READ_DELAY_S)}],
    )
    by_name = dict(zip([s["name"] for s in specs], started))
    for name, server in by_name.items():
        server.log = logs / f"{name}.log"  # type: ignore[attr-defined]
    yield by_name
    for server in started:
        stop_server(server)


def _post(url: str, adapter: str, timeout: float = 120) -> requests.Response:
    body = {
        "input_ids": PROMPT,
        "lora_path": adapter,
        "sampling_params": {"max_new_tokens": 4, "temperature": 0},
    }
    return requests.post(url + "/generate", json=body, timeout=timeout)


def _host_tier(url: str) -> Dict:
    return requests.get(url + "/chameleon/stats", timeout=30).json()["host_tier"]


def _stream_gaps_during_cold_load(url: str, cold: str) -> Dict[str, float]:
    """Stream a long base-model generation; once tokens flow, request ``cold`` (never loaded)
    from another thread. The largest gap between streamed chunks, and whether the stream was
    still running when the cold request was answered (the measurement covers the read)."""
    arrivals: List[float] = []
    answered: Dict[str, float] = {}

    def cold_request() -> None:
        answered["status"] = _post(url, cold).status_code
        answered["at"] = time.monotonic()

    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 2000, "temperature": 0, "ignore_eos": True},
        "stream": True,
    }
    worker = threading.Thread(target=cold_request)
    with requests.post(url + "/generate", json=body, stream=True, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith(b"data:") or line.endswith(b"[DONE]"):
                continue
            arrivals.append(time.monotonic())
            if len(arrivals) == 20:
                worker.start()
            if "at" in answered and arrivals[-1] > answered["at"] + 0.3:
                break
    worker.join(timeout=120)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {
        "max_gap_s": max(gaps),
        "status": answered.get("status", 0),
        "covered": float("at" in answered and arrivals[-1] > answered["at"]),
    }


def test_a_cold_read_does_not_stall_running_requests(servers):
    """With reads in the loop, a running stream stops for the whole 1.5 s read; with the
    workers, it keeps its pace (its largest gap stays under half of its 1 s read)."""
    background = _stream_gaps_during_cold_load(servers["background"].url, COLD)
    in_loop = _stream_gaps_during_cold_load(servers["in_loop"].url, COLD)
    for run in (background, in_loop):
        assert run["status"] == 200 and run["covered"], run
    assert in_loop["max_gap_s"] >= 0.8 * READ_DELAY_S, in_loop
    assert background["max_gap_s"] < 0.5 * BACKGROUND_READ_DELAY_S, (background, in_loop)


def test_the_host_tier_stays_within_its_budget_and_reloads_from_disk(servers):
    """Six adapters of 2.6 MB through a 1.5 MB host tier: after each load the tier fits its
    budget; an evicted adapter is read again on its next request, with the same output."""
    url = servers["background"].url
    first = {}
    for name in NAMES:
        resp = _post(url, name)
        assert resp.status_code == 200, resp.text
        first[name] = resp.json()["output_ids"]
        tier = _host_tier(url)
        assert tier["used_bytes"] <= tier["budget_bytes"], tier
    assert tier["evictions"] >= 3, tier
    registered = {m["id"] for m in requests.get(url + "/v1/models", timeout=30).json()["data"]}
    evicted = [n for n in NAMES if n not in registered]
    assert evicted, registered
    assert _post(url, evicted[0]).json()["output_ids"] == first[evicted[0]]
    assert _host_tier(url)["misses"] >= len(NAMES) + 1


def test_the_tiers_are_prometheus_series(servers):
    """With --enable-metrics, /metrics has the host tier's gauges and the read-latency
    histogram (published at most every 0.5 s: one more request after a pause publishes)."""
    url = servers["background"].url
    assert _post(url, "a001r16").status_code == 200
    time.sleep(0.6)
    assert _post(url, "a001r16").status_code == 200
    text = requests.get(url + "/metrics", timeout=30).text
    used = [line for line in text.splitlines() if line.startswith("chameleon:host_tier_used_bytes")]
    assert used and 0 < float(used[0].split()[-1]) <= BUDGET_GB * 1e9, used
    buckets = [
        line for line in text.splitlines() if "chameleon:adapter_read_seconds_bucket" in line
    ]
    assert any('le="+Inf"' in line and float(line.split()[-1]) >= 1 for line in buckets), buckets


def test_a_failed_load_backs_off_then_serves_the_fixed_adapter(servers, adapter_dir, tiny_assets):
    """A truncated adapter: a 400 naming the failure, then at once a 400 naming the backoff (no
    second read); fixed on disk, it is served with its new weights once the backoff ends."""
    url = servers["background"].url
    failed = _post(url, "broken")
    assert failed.status_code == 400 and "Failed" in failed.text, failed.text
    refused = _post(url, "broken")
    assert refused.status_code == 400 and "retried in" in refused.text, refused.text
    log = servers["background"].log.read_text(errors="replace")
    assert log.count("Reading LoRA adapter broken ") == 1
    source = Path(tiny_assets.adapter("a000r8").path) / "adapter_model.safetensors"
    shutil.copyfile(source, adapter_dir / "broken" / "adapter_model.safetensors")
    time.sleep(1.1)  # the first backoff is 1 s
    fixed = _post(url, "broken")
    assert fixed.status_code == 200, fixed.text
    expected = generate(servers["in_loop"].url, PROMPT, "a000r8", 4)["output_ids"]
    assert fixed.json()["output_ids"][:4] == expected[:4]


def test_an_adapter_deleted_while_it_is_read_fails_alone(servers, adapter_dir):
    """The adapter is resolved, then its files are deleted while the (1 s) read is under
    way: that request gets a 400 naming the missing file; others are served meanwhile."""
    url = servers["background"].url
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, url, "vanishing")
        time.sleep(0.5)
        shutil.rmtree(adapter_dir / "vanishing")
        assert _post(url, "a002r32").status_code == 200
        resp = pending.result()
    assert resp.status_code == 400, resp.text
    assert "vanishing" in resp.text, resp.text
    assert healthy(url)


def test_unload_drops_an_adapter_from_the_host_tier_and_it_reloads(servers):
    url = servers["background"].url
    assert _post(url, "a000r8").status_code == 200
    before = _host_tier(url)
    resp = requests.post(url + "/unload_lora_adapter", json={"lora_name": "a000r8"}, timeout=60)
    assert resp.status_code == 200, resp.text
    after = _host_tier(url)
    assert after["adapters"] == before["adapters"] - 1, (before, after)
    assert after["used_bytes"] < before["used_bytes"]
    assert _post(url, "a000r8").status_code == 200


def test_a_burst_of_unknown_names_leaves_nothing_behind(servers):
    """300 distinct names no directory has, 16 at a time: each a 400, no lock, no failure
    record and no registration left; the server serves on."""
    url = servers["background"].url
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: _post(url, f"nobody-{i}").status_code, range(300)))
    assert codes == [400] * 300
    tier = _host_tier(url)
    assert tier["loading"] == 0 and tier["failures_remembered"] <= 1, json.dumps(tier)
    assert healthy(url) and _post(url, "a001r16").status_code == 200


def test_max_loaded_loras_unloads_an_idle_adapter_not_one_in_use(servers):
    """``--max-loaded-loras 2``, two adapters loaded, the least recently used one (``busy``)
    serving a long stream: a third adapter's request takes the idle one's place and is
    answered while the stream runs. (SGLang's own LRU unloads ``busy``, waiting with its
    update lock held until the stream ends: no adapter loads meanwhile.)"""
    url = servers["in_loop"].url
    busy, idle, third = "a006r16", "a007r32", "a003r64"
    assert _post(url, busy).status_code == 200 and _post(url, idle).status_code == 200
    body = {
        "input_ids": PROMPT,
        "lora_path": busy,
        "sampling_params": {"max_new_tokens": 2000, "temperature": 0, "ignore_eos": True},
        "stream": True,
    }
    answered: Dict[str, float] = {}
    with requests.post(url + "/generate", json=body, stream=True, timeout=300) as resp:
        resp.raise_for_status()
        for i, line in enumerate(resp.iter_lines()):
            if i == 5:  # busy is acquired (the newest); idle becomes the newest again
                assert _post(url, idle).status_code == 200
                answered["status"] = _post(url, third).status_code
                answered["at"] = time.monotonic()
            if line.endswith(b"[DONE]"):
                break
        stream_end = time.monotonic()
    assert answered["status"] == 200 and answered["at"] < stream_end
    log = servers["in_loop"].log.read_text(errors="replace")
    assert f"unloaded {idle}" in log and f"adapter '{busy}'" not in log


def test_max_loaded_loras_refuses_a_load_at_once_when_every_adapter_is_in_use(servers):
    """Both loaded adapters serve streams: a third adapter's request is refused at once, saying
    why (SGLang would unload one of them, waiting for its streams with every other load held
    up), and it is served once the streams are gone (nothing remembered as a failure)."""
    url = servers["in_loop"].url
    first, second, third = "a006r16", "a007r32", "a002r32"
    with contextlib.ExitStack() as stack:
        for name in (first, second):
            assert _post(url, name).status_code == 200
        for i in range(16):  # together seconds of decoding; closed (aborted) below
            body = {
                "input_ids": PROMPT,
                "lora_path": (first, second)[i % 2],
                "sampling_params": {"max_new_tokens": 2000, "temperature": 0, "ignore_eos": True},
                "stream": True,
            }
            resp = stack.enter_context(
                requests.post(url + "/generate", json=body, stream=True, timeout=300)
            )
            resp.raise_for_status()
        t0 = time.monotonic()
        refused = _post(url, third)
        waited = time.monotonic() - t0
        assert next(resp.iter_lines())  # the streams were running
    assert refused.status_code == 400 and "every loaded adapter is in use" in refused.text
    assert waited < 5.0, waited
    deadline = time.monotonic() + 60
    while (status := _post(url, third).status_code) != 200 and time.monotonic() < deadline:
        time.sleep(0.5)  # the closed streams are being aborted
    assert status == 200
