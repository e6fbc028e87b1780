"""Adapters served from ``--chameleon-adapter-dir`` on their first request.

A real server started with the directory only (no ``--lora-paths``, ``--enable-lora`` or
``--lora-target-modules``; ``--max-lora-rank 64``) serves adapters it was never told about,
with HF + peft's greedy outputs; names and adapters it must not serve get a clear 400 naming the
reason, and nothing else is affected.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from client import generate, healthy, integrity_problems
from reference import NUM_NEW_TOKENS, prompt_ids, reference_outputs

from chameleon_sglang.dev.assets import Assets
from chameleon_sglang.dev.serve import ServerProcess, free_port, served_model_name

pytestmark = pytest.mark.slow

SERVED = ("a000r8", "a001r16", "a002r32", "a003r64")  # ranks 8-64: within --max-lora-rank 64


def _tamper(src: Path, dst: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    save_file(change(load_file(weights)), weights)


@pytest.fixture(scope="module")
def catalog_dir(tiny_assets: Assets, tmp_path_factory) -> Path:
    """Every tiny adapter, plus entries that must be refused."""
    root = tmp_path_factory.mktemp("catalog")
    for adapter in tiny_assets.adapters:
        shutil.copytree(adapter.path, root / adapter.name)
    source = tiny_assets.adapter("a000r8").path
    (root / "no-config").mkdir()
    (root / "not-lora").mkdir()
    (root / "not-lora" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    # an adapter of another base model: its A matrices read 16 fewer input features
    _tamper(
        source,
        root / "foreign",
        lambda d: {k: v[:, :-16].clone() if "lora_A" in k else v for k, v in d.items()},
    )
    shutil.copytree(source, root / "truncated")
    weights = root / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(source, outside / "secret")
    os.symlink(outside / "secret", root / "escape")
    return root


@pytest.fixture(scope="module")
def catalog_server(tiny_assets: Assets, catalog_dir: Path, tmp_path_factory):
    port = free_port()
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(tiny_assets.model_path),
        "--served-model-name", served_model_name(tiny_assets),
        "--host", "127.0.0.1", "--port", str(port),
        "--max-total-tokens", "16384",
        "--chameleon", "--chameleon-adapter-dir", str(catalog_dir),
        "--max-lora-rank", "64",
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("catalog-logs") / "server.log"
    with ServerProcess(cmd, port, log_path=log) as server:
        server.log = log  # type: ignore[attr-defined]
        yield server


@pytest.fixture(scope="module")
def expected(tiny_assets: Assets):
    prompts = prompt_ids(tiny_assets)[:2]
    paths = {name: str(tiny_assets.adapter(name).path) for name in SERVED}
    return prompts, reference_outputs(tiny_assets, paths, prompts)


def _post(url: str, adapter: str) -> requests.Response:
    body = {
        "input_ids": [11, 12, 13, 14],
        "lora_path": adapter,
        "sampling_params": {"max_new_tokens": 4, "temperature": 0},
    }
    return requests.post(url + "/generate", json=body, timeout=120)


def _models(url: str) -> set:
    return {m["id"] for m in requests.get(url + "/v1/models", timeout=30).json()["data"]}


def test_the_server_starts_with_no_adapter_registered_and_the_cache_on(catalog_server):
    info = requests.get(catalog_server.url + "/server_info", timeout=30).json()
    assert set(info["chameleon_status"]["active_components"]) == {"scheduler", "adapter_cache"}
    assert info["max_lora_rank"] == 64 and info["enable_lora"] is True
    assert not set(SERVED) & _models(catalog_server.url)  # /v1/models lists adapters by name


def test_adapters_never_registered_are_served_from_the_directory(catalog_server, expected):
    """Every adapter of ranks 8-64 serves HF + peft's greedy output on its first request and
    the next; afterwards it is registered (listed by /v1/models)."""
    prompts, reference = expected
    for name in SERVED[:3]:
        for i, ids in enumerate(prompts):
            for _ in range(2):
                out = generate(catalog_server.url, ids, name, NUM_NEW_TOKENS)["output_ids"]
                assert out == reference[(name, i)], name
    assert set(SERVED[:3]) <= _models(catalog_server.url)


def _served(server) -> str:
    return requests.get(server.url + "/server_info", timeout=30).json()["served_model_name"]


def test_the_openai_model_name_resolves_too(catalog_server, expected):
    prompts, reference = expected
    resp = requests.post(
        catalog_server.url + "/v1/completions",
        timeout=120,
        json={
            "model": f"{_served(catalog_server)}:a003r64",
            "prompt": prompts[0],
            "max_tokens": NUM_NEW_TOKENS,
            "temperature": 0,
        },
    )
    assert resp.status_code == 200, resp.text
    out = generate(catalog_server.url, prompts[0], "a003r64", NUM_NEW_TOKENS)["output_ids"]
    assert out == reference[("a003r64", 0)]


@pytest.mark.parametrize(
    "name, words",
    [
        ("../a000r8", "path component"),
        ("a000r8/..", "path component"),
        (".hidden", "starts with a dot"),
        ("absent", "in none of the adapter directories"),
        ("no-config", "no adapter_config.json"),
        ("not-lora", "peft_type is not LORA"),
        ("escape", "outside"),
        ("a004r128", "rank 128 is above"),
        ("truncated", "Failed"),
        ("foreign", "Failed"),
    ],
)
def test_what_must_not_be_served_is_refused_with_the_reason(catalog_server, name, words):
    """A clear 400 naming the reason; the server stays healthy and serves on."""
    resp = _post(catalog_server.url, name)
    assert resp.status_code == 400, resp.text
    assert re.search(re.escape(words), resp.text), resp.text
    assert healthy(catalog_server.url)
    assert _post(catalog_server.url, "a000r8").status_code == 200


def test_concurrent_first_requests_for_a_cold_adapter_load_it_once(catalog_server, tiny_assets):
    """Eight clients ask at once for an adapter nobody asked for before: all are served, and
    SGLang loads it once."""
    name = tiny_assets.adapters[5].name  # a005r8: untouched by the other tests
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: _post(catalog_server.url, name).status_code, range(8)))
    assert statuses == [200] * 8
    log = catalog_server.log.read_text(errors="replace")
    assert log.count(f"Start load Lora adapter. Lora name={name},") == 1
    assert integrity_problems(catalog_server.url) == []
