"""Hostile input over the whole API, who may call what, and a quiet stop: a stock and a
``--chameleon`` server, both with ``--api-key`` and ``--admin-api-key``, receive the same fuzzed
requests (:mod:`eval.fuzz`, a fixed budget here; ``python -m eval.fuzz`` runs a larger one);
every endpoint we add follows SGLang's key rules; and ``make serve``'s command, which serves
as the chameleon arm, stops on Ctrl-C quickly and without crash reports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests
from conftest import start_servers, stop_server

from chameleon_sglang.dev.assets import PROJECT_ROOT, Assets
from chameleon_sglang.dev.serve import free_port
from eval.fuzz import ADMIN_KEY, USER_KEY, Target, launch_args, run

pytestmark = pytest.mark.slow

CATALOG_ONLY = "catalog-only"
"""An adapter in the chameleon server's directory that no launch line registers."""


@pytest.fixture(scope="module")
def catalog_dir(tiny_assets: Assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-catalog")
    shutil.copytree(tiny_assets.adapters[1].path, out / CATALOG_ONLY)
    return out


class ServeCommand:
    """``make serve``'s command (``python -m chameleon_sglang.dev.serve [-- sglang args]``) as a
    terminal runs a foreground job: in a process group of its own, which Ctrl-C signals whole."""

    def __init__(self, log: Path, extra_args: List[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "chameleon_sglang.dev.serve", "--port", str(self.port)]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--", *extra_args],
                cwd=PROJECT_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while "Server ready" not in self.output():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.2)

    def stop(self) -> None:
        """Whatever is left of it (a test may have stopped it already)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def arms(tiny_assets: Assets, catalog_dir: Path, tmp_path_factory) -> Iterator[Dict[str, Any]]:
    """The stock arm (a test server) and the chameleon arm: ``make serve``'s command with the
    keys and the directory, started side by side."""
    logs = tmp_path_factory.mktemp("fuzz-logs")
    chameleon = ServeCommand(logs / "chameleon.log", launch_args("chameleon", catalog_dir))
    try:
        spec = dict(
            assets=tiny_assets,
            log_dir=logs,
            name="stock",
            chameleon=False,
            extra_args=launch_args("stock", catalog_dir),
        )
        (stock,) = start_servers([spec])
        try:
            chameleon.wait_ready()
            yield {"stock": stock, "chameleon": chameleon}
        finally:
            stop_server(stock)
    finally:
        chameleon.stop()


def target(name: str, server: Any) -> Target:
    return Target(name, server.url, name == "chameleon", lambda: server.proc.poll() is None)


def test_fuzzed_requests_never_break_chameleon_where_stock_holds(arms, tiny_assets):
    """Schema-generated and near-valid requests, alike to both servers: chameleon fails (5xx,
    no answer) only where stock does, and afterwards both serve the probe unchanged and
    chameleon's invariants, quotas and references are clean."""
    report = run(
        target("stock", arms["stock"]),
        target("chameleon", arms["chameleon"]),
        tiny_assets,
        schema_examples=5,
        near_valid=120,
        seed=1,
    )
    assert report["num_chameleon_only_failures"] == 0, report["chameleon_only_failures"]
    assert report["checks"]["chameleon"] == {
        "alive": True,
        "probe_unchanged": True,
        "integrity_clean": True,
        "quota_usage_zero": True,
        "references_zero": True,
    }
    assert report["checks"]["stock"] == {"alive": True, "probe_unchanged": True}
    counts = report["counts"]["chameleon"]
    # the fuzz reached generation as well as validation
    assert counts.get("2xx", 0) >= 20 and counts.get("4xx", 0) >= 20, counts
    assert report["passed"]


def status(url: str, method: str, path: str, key: Optional[str], **kwargs) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, url + path, headers=headers, timeout=120, **kwargs).status_code


KEYS: List[Optional[str]] = [None, USER_KEY, ADMIN_KEY, "wrong"]


@pytest.mark.parametrize("arm", ["stock", "chameleon"])
def test_stats_endpoint_takes_the_keys_server_info_takes(arms, arm):
    """/chameleon/stats is a read-only status page: each credential gets what it gets from
    SGLang's /server_info (the user key only, when --api-key is set)."""
    url = arms[arm].url
    ours = [status(url, "GET", "/chameleon/stats", key) for key in KEYS]
    sglang = [status(url, "GET", "/server_info", key) for key in KEYS]
    assert ours == sglang == [401, 200, 401, 401]


@pytest.mark.parametrize("arm", ["stock", "chameleon"])
def test_adapter_loads_take_the_admin_key_only(arms, tiny_assets, arm):
    url = arms[arm].url
    body = {"lora_name": "auth-extra", "lora_path": str(tiny_assets.adapters[2].path)}
    for key in (None, USER_KEY, "wrong"):
        assert status(url, "POST", "/load_lora_adapter", key, json=body) == 401
    assert status(url, "POST", "/load_lora_adapter", ADMIN_KEY, json=body) == 200
    unload = {"lora_name": "auth-extra"}
    assert status(url, "POST", "/unload_lora_adapter", USER_KEY, json=unload) == 401
    assert status(url, "POST", "/unload_lora_adapter", ADMIN_KEY, json=unload) == 200


def test_a_directory_adapter_is_served_to_the_user_key_only(arms):
    """A request naming an adapter of --chameleon-adapter-dir loads it: without the user key it
    is refused before anything is read; with it, the adapter is served."""
    url = arms["chameleon"].url
    body = {
        "input_ids": [5, 6, 7],
        "lora_path": CATALOG_ONLY,
        "sampling_params": {"max_new_tokens": 2, "temperature": 0},
    }

    def registered() -> int:
        stats = requests.get(
            url + "/chameleon/stats", headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60
        ).json()
        return stats["host_tier"]["registered"]

    before = registered()
    for key in (None, ADMIN_KEY, "wrong"):
        assert status(url, "POST", "/generate", key, json=body) == 401
    assert registered() == before
    assert status(url, "POST", "/generate", USER_KEY, json=body) == 200
    assert registered() == before + 1


IDLE_S = 3.0
"""How long the server has had nothing to do when Ctrl-C comes: request handlers SGLang leaves
running in the background after the response (seen after fuzzing) end meanwhile; uvicorn would
wait for them at shutdown."""


def test_ctrl_c_stops_make_serve_quickly_and_quietly(arms):
    """Last in this module (file order): Ctrl-C (SIGINT to the foreground job's group) on
    ``make serve``'s command, idle: it returns within 2 s, its server's processes are gone, and
    nothing reads like a crash (no crashed-child report, no SIGQUIT, no crash-diagnostics sleep,
    no traceback)."""
    serve = arms["chameleon"]
    time.sleep(IDLE_S)
    before = len(serve.output())
    started = time.monotonic()
    os.killpg(serve.proc.pid, signal.SIGINT)
    returncode = serve.proc.wait(timeout=30)
    took = time.monotonic() - started
    tail = serve.output()[before:]
    assert took <= 2.0 and returncode == 0, (took, returncode, tail[-3000:])
    for crash in ("crashed", "SIGQUIT", "crash diagnostics", "Traceback"):
        assert crash not in tail, tail[-3000:]
    assert "Interrupted: the server and its processes are stopped" in tail
    with pytest.raises(requests.ConnectionError):
        requests.get(serve.url + "/health", timeout=5)
