"""Shared fixtures: the built-in tiny assets and real SGLang servers on loopback.

Servers are started by PID in their own process group and always stopped (also when a test
fails); at most five are up at once. A test that needs several servers starts them side by side
(:func:`start_servers`: start-up is mostly single-threaded imports, two fit on two cores) and
uses them one at a time, so a measurement never shares the CPU with a starting server.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from chameleon_sglang.dev.assets import Assets, build
from chameleon_sglang.dev.serve import ServerProcess, free_port, server_command
from chameleon_sglang.integration import integrity

MAX_SERVERS = 5
# every server the suite starts publishes the invariant checker's findings (/chameleon/stats)
os.environ[integrity.ENV_FLAG] = "1"
_servers_alive = threading.BoundedSemaphore(MAX_SERVERS)


@pytest.fixture(scope="session")
def tiny_assets() -> Assets:
    return build("tiny")


def start_server(
    assets: Assets, log_dir: Path, name: str, chameleon: bool, **kwargs
) -> ServerProcess:
    """Start a server (blocks until healthy). Callers must ``stop_server`` it."""
    return start_servers(
        [dict(assets=assets, log_dir=log_dir, name=name, chameleon=chameleon, **kwargs)]
    )[0]


def start_servers(
    specs: List[Dict[str, Any]], env: Optional[List[Dict[str, str]]] = None
) -> List[ServerProcess]:
    """Start one server per spec (``start_server``'s arguments) side by side and wait until all
    are healthy; ``env``: extra environment of each launch. Callers ``stop_server`` each."""
    launched: List[ServerProcess] = []
    try:
        for spec, extra in zip(specs, env or [{}] * len(specs)):
            launched.append(_launch(dict(spec), extra))
        for server in launched:
            server.wait_healthy(240.0)
        return launched
    except BaseException:
        for server in launched:
            stop_server(server)
        raise


def _launch(spec: Dict[str, Any], extra_env: Dict[str, str]) -> ServerProcess:
    if not _servers_alive.acquire(timeout=600):
        raise RuntimeError(f"more than {MAX_SERVERS} test servers requested at once")
    try:
        assets, log_dir, name = spec.pop("assets"), spec.pop("log_dir"), spec.pop("name")
        port = free_port()
        cmd = server_command(assets, port, chameleon=spec.pop("chameleon"), **spec)
        server = ServerProcess(cmd, port, log_path=log_dir / f"{name}.log")
        with _environment(extra_env):
            return server.launch()
    except BaseException:
        _servers_alive.release()
        raise


@contextlib.contextmanager
def _environment(extra: Dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def stop_server(server: ServerProcess) -> None:
    server.stop()
    _servers_alive.release()


@pytest.fixture(scope="session")
def eval_server_pool(tmp_path_factory) -> Iterator[Path]:
    """The eval harness's server pool (``eval.server_pool``) for this session: runs of the
    harness (in subprocesses too) with identical launch commands share one server, stopped at
    the end of the session."""
    from eval.server_pool import POOL_ENV, stop_pool

    pool = tmp_path_factory.mktemp("eval-server-pool")
    previous = os.environ.get(POOL_ENV)
    os.environ[POOL_ENV] = str(pool)
    try:
        yield pool
    finally:
        stop_pool(pool)
        if previous is None:
            os.environ.pop(POOL_ENV, None)
        else:
            os.environ[POOL_ENV] = previous


@pytest.fixture(scope="session")
def server_pair(tiny_assets: Assets, tmp_path_factory) -> Iterator[Dict[str, ServerProcess]]:
    """The two servers ``server`` hands out, started side by side at its first use (both idle
    while the other serves), stopped at the end of the session."""
    log_dir = tmp_path_factory.mktemp("server-logs")
    arms = ("stock", "chameleon")
    servers = start_servers(
        [
            dict(assets=tiny_assets, log_dir=log_dir, name=arm, chameleon=arm != "stock")
            for arm in arms
        ]
    )
    try:
        yield dict(zip(arms, servers))
    finally:
        for srv in servers:
            stop_server(srv)


@pytest.fixture(scope="session", params=["stock", "chameleon"])
def server(request, server_pair: Dict[str, ServerProcess]) -> ServerProcess:
    """A patched SGLang server with every tiny adapter, without and with ``--chameleon``."""
    srv = server_pair[request.param]
    srv.arm = request.param  # type: ignore[attr-defined]
    return srv
