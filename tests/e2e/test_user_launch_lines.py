"""Launch lines a user types (not the ones our launcher builds) start and serve.

Each line is run as typed: ``python -m sglang.launch_server`` with the user's flags only (plus
host, port and a KV size, which every CPU line needs); SGLang infers the rest. The server must
come up healthy, publish which Chameleon components are active, and serve every adapter on the
native and the OpenAI API, greedy outputs reproducible.
"""

from __future__ import annotations

import sys
from typing import List

import pytest
import requests
from client import generate, integrity_problems

from chameleon_sglang.assets import Assets
from chameleon_sglang.serve import ServerProcess, free_port

pytestmark = pytest.mark.slow

PROMPT = [21, 22, 23, 24, 25, 26, 27]


def user_line(assets: Assets, port: int, flags: List[str]) -> List[str]:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(assets.model_path),
            "--host", "127.0.0.1", "--port", str(port), "--max-total-tokens", "16384", *flags]


def _adapters(assets: Assets) -> List[str]:
    return [f"{a.name}={a.path}" for a in assets.adapters[:3]]


LINES = {
    # no --max-lora-rank, --lora-target-modules, --dtype or --device: SGLang infers them
    "inferred-rank-and-modules": lambda assets: [
        "--chameleon", "--enable-lora", "--lora-paths", *_adapters(assets)],
    "explicit-fp32-cpu": lambda assets: [
        "--chameleon", "--device", "cpu", "--dtype", "float32", "--enable-lora",
        "--lora-paths", *_adapters(assets)],
}


@pytest.mark.parametrize("name", sorted(LINES))
def test_user_launch_line_serves_every_adapter(name, tiny_assets, tmp_path):
    port = free_port()
    server = ServerProcess(user_line(tiny_assets, port, LINES[name](tiny_assets)), port,
                           log_path=tmp_path / f"{name}.log")
    with server:  # started here, always stopped
        info = requests.get(server.url + "/server_info", timeout=30).json()
        status = info["chameleon_status"]
        assert set(status["active_components"]) == {"scheduler", "adapter_cache"}, status
        model = info.get("served_model_name") or str(tiny_assets.model_path)
        for adapter in tiny_assets.adapters[:3]:
            first = generate(server.url, PROMPT, adapter.name, 6)["output_ids"]
            assert len(first) == 6
            assert generate(server.url, PROMPT, adapter.name, 6)["output_ids"] == first
            resp = requests.post(server.url + "/v1/completions", timeout=120, json={
                "model": f"{model}:{adapter.name}", "prompt": PROMPT, "max_tokens": 6,
                "temperature": 0})
            assert resp.status_code == 200, resp.text
        assert integrity_problems(server.url) == []
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert "Traceback" not in log
