"""Several Chameleon servers behind SGLang's model gateway (``smg``), routed by adapter.

Each server is ``make serve``'s server (:func:`~chameleon_sglang.dev.serve.server_command`) on a
port of its own; the gateway (``smg launch``) sends each request to one of them. With the
``prefix_hash`` policy and the adapter's name as the routing key (the client sends it in
:data:`ROUTING_HEADER`), the requests of one adapter go to one server, whose adapter cache then
holds it, until that server's in-flight count passes the gateway's load bound; then they spill
to the least loaded server (docs/design/gateway.md).

CLI: ``python -m chameleon_sglang.dev.gateway [--preset tiny] [--servers 2] [--port 30000]
[--policy prefix_hash] [--no-chameleon] [-- extra sglang args]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence

from chameleon_sglang.dev.assets import Assets, build
from chameleon_sglang.dev.serve import DEFAULT_HOST, ServerProcess, free_port, server_command

ROUTING_HEADER = "X-SMG-Routing-Key"
"""The header ``smg`` reads the routing key from by default (``--routing-key-headers`` names
others); the client puts the adapter's name there."""

ADAPTER_ROUTING = ("--policy", "prefix_hash")
"""Consistent hashing of the routing key over the servers, bounded by the gateway's in-flight
counts (``--prefix-hash-load-factor``, ``--prefix-hash-balance-abs-threshold``)."""


def smg_executable() -> Optional[str]:
    """The ``smg`` command beside this Python (its virtual environment), else on ``PATH``."""
    beside = Path(sys.executable).parent / "smg"
    return str(beside) if beside.exists() else shutil.which("smg")


def gateway_command(
    port: int, worker_urls: Sequence[str], gateway_args: Sequence[str] = ADAPTER_ROUTING
) -> List[str]:
    """``smg launch`` in front of ``worker_urls`` on ``port`` (loopback)."""
    smg = smg_executable()
    if smg is None:
        raise FileNotFoundError("smg (SGLang's model gateway) is not installed: pip install smg")
    return [
        smg,
        "launch",
        "--host",
        DEFAULT_HOST,
        "--port",
        str(port),
        "--worker-urls",
        *worker_urls,
        "--log-level",
        "warn",
        "--health-check-interval-secs",
        "1",
        "--health-failure-threshold",
        "1",
        *gateway_args,
    ]


def workers_ready(url: str, expected: int) -> bool:
    """Whether the gateway at ``url`` counts ``expected`` healthy workers."""
    try:
        with urllib.request.urlopen(url + "/readiness", timeout=5) as resp:
            body = json.loads(resp.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        return False
    return int(body.get("healthy_workers", 0)) >= expected


class Gateway:
    """``num_servers`` servers (started side by side) and ``smg`` in front; a context manager.
    ``servers`` are :class:`ServerProcess` es (``stop()`` one to take it away), ``url`` is the
    gateway's."""

    def __init__(
        self,
        assets: Assets,
        num_servers: int = 2,
        chameleon: bool = True,
        server_args: Sequence[str] = (),
        gateway_args: Sequence[str] = ADAPTER_ROUTING,
        log_dir: Optional[Path] = None,
        port: Optional[int] = None,
    ) -> None:
        self.servers = [
            ServerProcess(
                server_command(assets, p, chameleon=chameleon, extra_args=server_args),
                p,
                log_dir / f"server{i}.log" if log_dir else None,
            )
            for i, p in enumerate(free_port() for _ in range(num_servers))
        ]
        gateway_port = port or free_port()
        self.gateway = ServerProcess(
            gateway_command(gateway_port, [s.url for s in self.servers], gateway_args),
            gateway_port,
            log_dir / "gateway.log" if log_dir else None,
        )
        self.url = self.gateway.url

    def start(self, timeout_s: float = 300.0) -> Gateway:
        """Every server healthy, then the gateway up with every server registered."""
        try:
            for server in self.servers:
                server.launch()
            for server in self.servers:
                server.wait_healthy(timeout_s)
            self.gateway.launch()
            deadline = time.monotonic() + 60.0
            while not workers_ready(self.url, len(self.servers)):
                if self.gateway.proc is not None and self.gateway.proc.poll() is not None:
                    raise RuntimeError(f"smg exited with code {self.gateway.proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("smg did not register every server within 60 s")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for process in (self.gateway, *self.servers):
            with contextlib.suppress(Exception):
                process.stop()

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def example_curl(url: str, adapter: str) -> str:
    body = {
        "text": "Once upon a time",
        "sampling_params": {"max_new_tokens": 16, "temperature": 0},
        "lora_path": adapter,
    }
    return (
        f"curl -s {url}/generate -H 'Content-Type: application/json' "
        f"-H '{ROUTING_HEADER}: {adapter}' -d '{json.dumps(body)}'"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Chameleon servers behind smg, by adapter.")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--port", type=int, default=30000, help="the gateway's port")
    parser.add_argument("--policy", default="prefix_hash", help="smg's --policy")
    parser.add_argument("--no-chameleon", action="store_true")
    parser.add_argument("extra", nargs="*", help="extra sglang arguments (after --)")
    args = parser.parse_args(argv)
    assets = build(args.preset)
    gateway = Gateway(
        assets,
        args.servers,
        chameleon=not args.no_chameleon,
        server_args=args.extra,
        gateway_args=("--policy", args.policy),
        port=args.port,
    )
    for process in (*gateway.servers, gateway.gateway):
        print("+ " + " ".join(process.cmd), flush=True)
    try:
        gateway.start()
        adapter = assets.adapters[len(assets.adapters) // 2].name if assets.adapters else ""
        print(f"\nGateway ready on {gateway.url} (Ctrl-C stops everything). Try:\n", flush=True)
        print("  " + example_curl(gateway.url, adapter) + "\n", flush=True)
        while all(p.proc is not None and p.proc.poll() is None for p in gateway.servers):
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
