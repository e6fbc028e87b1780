"""Launch lines a user types (not the ones our launcher builds) start and serve.

Each line is run as typed: ``python -m sglang.launch_server`` with the user's flags only (plus
host, port and a KV size, which every CPU line needs); SGLang infers the rest. The server must
come up healthy, publish which Chameleon components are active, and serve every adapter on the
native and the OpenAI API, greedy outputs reproducible.
"""

from __future__ import annotations

import sys
from typing import Dict, Iterator, List

import pytest
import requests
from client import generate, integrity_problems

from chameleon_sglang.dev.assets import Assets
from chameleon_sglang.dev.serve import ServerProcess, free_port

pytestmark = pytest.mark.slow

PROMPT = [21, 22, 23, 24, 25, 26, 27]


def user_line(assets: Assets, port: int, flags: List[str]) -> List[str]:
    return [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(assets.model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-total-tokens",
        "16384",
        *flags,
    ]


def _adapters(assets: Assets) -> List[str]:
    return [f"{a.name}={a.path}" for a in assets.adapters[:3]]


LINES = {
    # no --max-lora-rank, --lora-target-modules, --dtype or --device: SGLang infers them
    "inferred-rank-and-modules": lambda assets: [
        "--chameleon",
        "--enable-lora",
        "--lora-paths",
        *_adapters(assets),
    ],
    "explicit-fp32-cpu": lambda assets: [
        "--chameleon",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--enable-lora",
        "--lora-paths",
        *_adapters(assets),
    ],
}


# Settings the adapter cache does not serve: SGLang's LoRA pool serves instead, the scheduler
# stays, /server_info says why (the README's capability table). (flags, words of the reason,
# whether the model runner decided it: then the log says so once.)
FALLBACK_LINES = {
    "page-size-16": (["--page-size", "16"], "--page-size 1", False),
    "kv-dtype-differs-from-lora-dtype": (
        ["--dtype", "float32", "--kv-cache-dtype", "bf16"],
        "KV cache in the LoRA dtype",
        True,
    ),
    "no-chameleon-cache": (["--no-chameleon-cache"], "--no-chameleon-cache", False),
}


def _flags(name: str, assets: Assets) -> List[str]:
    if name in LINES:
        return LINES[name](assets)
    return ["--chameleon", "--enable-lora", "--lora-paths", *_adapters(assets),
            *FALLBACK_LINES[name][0]]  # fmt: skip


@pytest.fixture(scope="module")
def launched(tiny_assets, tmp_path_factory) -> Iterator[Dict[str, ServerProcess]]:
    """Every line of this module, launched side by side at once (start-up is mostly
    single-threaded imports); each test waits for its own server, the last ones stop them."""
    log_dir = tmp_path_factory.mktemp("user-lines")
    servers: Dict[str, ServerProcess] = {}
    try:
        for name in [*sorted(LINES), *sorted(FALLBACK_LINES)]:
            port = free_port()
            cmd = user_line(tiny_assets, port, _flags(name, tiny_assets))
            servers[name] = ServerProcess(cmd, port, log_path=log_dir / f"{name}.log").launch()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.mark.parametrize("name", sorted(LINES))
def test_user_launch_line_serves_every_adapter(name, tiny_assets, launched):
    assert_serves(tiny_assets, launched[name], {"scheduler", "adapter_cache"})


@pytest.mark.parametrize("name", sorted(FALLBACK_LINES))
def test_unsupported_setting_falls_back_to_sglangs_pool_and_serves(name, tiny_assets, launched):
    _, words, by_runner = FALLBACK_LINES[name]
    status = assert_serves(tiny_assets, launched[name], {"scheduler"})
    assert words in status["components"]["adapter_cache"]["detail"], status
    log = launched[name].log_path.read_text(errors="replace")
    assert ("Chameleon adapter cache off" in log) == by_runner


@pytest.mark.parametrize("name", [*sorted(LINES), *sorted(FALLBACK_LINES)])
def test_every_line_stops_with_a_clean_log(name, launched):
    """Run after the serving tests (file order): the server stops, and its log holds no
    traceback from start to stop."""
    server = launched[name]
    server.stop()
    assert "Traceback" not in server.log_path.read_text(errors="replace")


def assert_serves(assets: Assets, server: ServerProcess, active: set) -> dict:
    """Wait for the line's server, check the active components, serve every adapter on both
    APIs (greedy outputs reproducible), check integrity; the chameleon status."""
    server.wait_healthy(240.0)
    info = requests.get(server.url + "/server_info", timeout=30).json()
    status = info["chameleon_status"]
    assert set(status["active_components"]) == active, status
    model = info.get("served_model_name") or str(assets.model_path)
    for adapter in assets.adapters[:3]:
        first = generate(server.url, PROMPT, adapter.name, 6)["output_ids"]
        assert len(first) == 6
        assert generate(server.url, PROMPT, adapter.name, 6)["output_ids"] == first
        resp = requests.post(
            server.url + "/v1/completions",
            timeout=120,
            json={"model": f"{model}:{adapter.name}", "prompt": PROMPT, "max_tokens": 6,
                  "temperature": 0},
        )  # fmt: skip
        assert resp.status_code == 200, resp.text
    assert integrity_problems(server.url) == []
    return status
