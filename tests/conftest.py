"""Shared fixtures: the built-in tiny assets and real SGLang servers on loopback.

Servers are started by PID in their own process group and always stopped (also when a test
fails); at most two run at once on our 2-core machines.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

import pytest

from chameleon_sglang.dev.assets import Assets, build
from chameleon_sglang.dev.serve import ServerProcess, free_port, server_command
from chameleon_sglang.integration import integrity

MAX_SERVERS = 2
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
    if not _servers_alive.acquire(timeout=600):
        raise RuntimeError(f"more than {MAX_SERVERS} test servers requested at once")
    port = free_port()
    cmd = server_command(assets, port, chameleon=chameleon, **kwargs)
    server = ServerProcess(cmd, port, log_path=log_dir / f"{name}.log")
    try:
        return server.start()
    except BaseException:
        _servers_alive.release()
        raise


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


@pytest.fixture(scope="session", params=["stock", "chameleon"])
def server(request, tiny_assets: Assets, tmp_path_factory) -> Iterator[ServerProcess]:
    """A patched SGLang server with every tiny adapter, without and with ``--chameleon``."""
    log_dir = tmp_path_factory.mktemp("server-logs")
    srv = start_server(tiny_assets, log_dir, request.param, chameleon=request.param == "chameleon")
    srv.arm = request.param  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        stop_server(srv)
