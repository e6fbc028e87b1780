"""End to end: the patched SGLang server, without and with --chameleon, on the tiny model (fp32).

Outputs must equal an HF transformers + peft reference token for token, for the base model and
adapters of every rank, sequentially, concurrently, streaming and through the OpenAI API.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import pytest
import requests
from client import generate, generate_stream, healthy
from reference import NUM_NEW_TOKENS, prompt_ids, reference_outputs

from chameleon_sglang.dev.assets import Assets
from chameleon_sglang.dev.serve import served_model_name

pytestmark = pytest.mark.slow

# One adapter of each rank 8, 16, 32, 64, 128, plus the base model (None).
ADAPTERS: Tuple[Optional[str], ...] = (None, "a000r8", "a001r16", "a002r32", "a003r64", "a004r128")


@pytest.fixture(scope="session")
def prompts(tiny_assets: Assets) -> List[List[int]]:
    return prompt_ids(tiny_assets)


@pytest.fixture(scope="session")
def expected(tiny_assets: Assets, prompts) -> Dict[Tuple[Optional[str], int], List[int]]:
    paths = {a: (tiny_assets.adapter(a).path if a else None) for a in ADAPTERS}
    return reference_outputs(tiny_assets, paths, prompts)


def test_reference_adapters_differ(expected):
    """The adapters really change the output (otherwise equality would prove nothing)."""
    outputs = {tuple(expected[(a, 0)]) for a in ADAPTERS}
    assert len(outputs) == len(ADAPTERS)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_greedy_output_equals_hf_peft(server, prompts, expected, adapter):
    """Sequential greedy outputs equal HF transformers + peft, base model and every rank."""
    for i, ids in enumerate(prompts):
        out = generate(server.url, ids, adapter, NUM_NEW_TOKENS)
        assert out["output_ids"] == expected[(adapter, i)], f"adapter={adapter} prompt={i}"


def test_concurrent_mixed_adapters_equal_sequential(server, prompts, expected):
    """Concurrent requests over mixed adapters give the same tokens as sequential ones."""
    jobs = [(a, i) for i in range(len(prompts)) for a in ADAPTERS]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {
            job: pool.submit(generate, server.url, prompts[job[1]], job[0], NUM_NEW_TOKENS)
            for job in jobs
        }
        results = {job: f.result()["output_ids"] for job, f in futures.items()}
    for job in jobs:
        assert results[job] == expected[job], f"adapter={job[0]} prompt={job[1]}"


@pytest.mark.parametrize("adapter", ["a002r32", None])
def test_streaming_generate(server, prompts, expected, adapter):
    """Streaming /generate yields growing chunks whose last one equals the reference."""
    chunks = generate_stream(server.url, prompts[1], adapter, NUM_NEW_TOKENS)
    assert len(chunks) >= 2
    lengths = [len(c["output_ids"]) for c in chunks]
    assert lengths == sorted(lengths)
    assert chunks[-1]["output_ids"] == expected[(adapter, 1)]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_openai_completions_with_adapter(server, tiny_assets, prompts, expected):
    """OpenAI /v1/completions with model 'base:adapter' uses that adapter."""
    body = {
        "model": f"{served_model_name(tiny_assets)}:a003r64",
        "prompt": prompts[2],
        "max_tokens": NUM_NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    resp = requests.post(server.url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    text = resp.json()["choices"][0]["text"]
    native = generate(server.url, prompts[2], "a003r64", NUM_NEW_TOKENS)
    assert native["output_ids"] == expected[("a003r64", 2)]
    assert text == native["text"]


def test_load_and_unload_adapter_at_runtime(server, tiny_assets, prompts, expected):
    """/load_lora_adapter serves a new name with that adapter's weights; unload removes it."""
    name = f"runtime-{server.arm}"
    path = tiny_assets.adapter("a001r16").path
    resp = requests.post(
        server.url + "/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=120
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["success"] is True
    assert name in resp.json()["loaded_adapters"]
    out = generate(server.url, prompts[0], name, NUM_NEW_TOKENS)
    assert out["output_ids"] == expected[("a001r16", 0)]

    resp = requests.post(server.url + "/unload_lora_adapter", json={"lora_name": name}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["success"] is True
    assert name not in resp.json()["loaded_adapters"]
    assert healthy(server.url)


def test_chameleon_status_is_reported(server):
    """/server_info says whether Chameleon is on and which components are really active."""
    info = requests.get(server.url + "/server_info", timeout=30).json()
    chameleon = server.arm == "chameleon"
    assert info["chameleon"] is chameleon
    status = info.get("chameleon_status")
    assert status is not None
    assert status["enabled"] is chameleon
    assert set(status["components"]) == {"scheduler", "adapter_cache"}
    assert status["components"]["scheduler"]["active"] is chameleon
    assert status["components"]["adapter_cache"]["active"] is chameleon
    assert all(c["detail"] for c in status["components"].values())
    stats = requests.get(server.url + "/chameleon/stats", timeout=30).json()
    assert stats["enabled"] is chameleon
    scheduler = stats["ranks"][0]["scheduler"]
    cache = stats["ranks"][0]["adapter_cache"]
    if chameleon:
        assert scheduler["num_arrivals"] > 0 and scheduler["num_passes"] > 0
        assert cache["misses"] > 0 and cache["bytes_loaded"] > 0 and cache["num_resident"] > 0
    else:
        assert cache is None and scheduler is None
