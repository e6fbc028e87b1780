"""Start the patched SGLang server on a built-in model preset, and stop it again.

``server_command`` builds the ``python -m sglang.launch_server`` command line used by
``make serve``, the tests and the evaluation, so every caller runs the same server.
``ServerProcess`` starts it in its own process group, waits for ``/health``, and always stops it
by PID (the whole group), also when the caller fails. The group stays in the caller's session:
with the kernel's session autogrouping a new session is a scheduling group of its own, and a
mostly idle group (a load generator beside the server) then waits up to a second for a CPU while
the server's group keeps both cores busy (measured: 0.95 s run-queue waits, which inflated the
client's TTFTs); in one session every process competes on its own.

CLI (``make serve``): ``python -m chameleon_sglang.dev.serve [--preset tiny] [--port 30000]
[--no-chameleon] [-- extra sglang args]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, List, Optional, Sequence

from chameleon_sglang.dev.assets import Assets, build

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_TOTAL_TOKENS = 16384


def server_command(
    assets: Assets,
    port: int,
    chameleon: bool = True,
    dtype: str = "float32",
    max_lora_rank: Optional[int] = None,
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS,
    adapters: Optional[Sequence[str]] = None,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
    warmup: bool = True,
) -> List[str]:
    """The launch command for ``assets`` (all its adapters unless ``adapters`` names some);
    ``warmup=False`` skips SGLang's own warm-up request (for callers that warm up themselves)."""
    chosen = assets.adapters if adapters is None else [assets.adapter(n) for n in adapters]
    cmd = [
        python,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(assets.model_path),
        "--host",
        DEFAULT_HOST,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-total-tokens",
        str(max_total_tokens),
        "--served-model-name",
        served_model_name(assets),
        "--sleep-on-idle",
    ]
    if chosen or max_lora_rank is not None:
        cmd += [
            "--enable-lora",
            "--max-lora-rank",
            str(max_lora_rank or assets.max_rank),
            "--lora-target-modules",
            "all",
        ]
    if chosen:
        cmd += ["--max-loaded-loras", str(max(8, len(chosen)))]
        cmd += ["--lora-paths", *[f"{a.name}={a.path}" for a in chosen]]
    if not warmup:
        cmd.append("--skip-server-warmup")
    if chameleon:
        cmd.append("--chameleon")
    cmd += list(extra_args)
    return cmd


def served_model_name(assets: Assets) -> str:
    """The model name clients use; the OpenAI API takes ``<name>:<adapter>``."""
    return f"chameleon-{assets.preset}"


SERVER_PORTS = (10000, 21999)
"""Where :func:`free_port` looks: below the kernel's ephemeral range (``bind(0)`` and outgoing
connections take ports from there) and below the range SGLang draws its own late-bound ports
from (22000-29999)."""
_handed_out: set = set()


def free_port() -> int:
    """A port free now that no other server started from this process was given, for a server
    that binds it only once it has started (tens of seconds later): a port the kernel would not
    hand to an outgoing connection or a ``bind(0)`` meanwhile."""
    low, high = SERVER_PORTS
    for port in random.sample(range(low, high + 1), 256):
        if port in _handed_out:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((DEFAULT_HOST, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((DEFAULT_HOST, 0))
        return s.getsockname()[1]


def server_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _own_group_with_default_sigint() -> None:
    """In the child before exec: a process group of its own in the caller's session (module
    docs), and SIGINT handled again where the caller ignores it (a background job of a
    non-interactive shell does, and children inherit it): :meth:`ServerProcess.stop` uses it."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ServerProcess:
    """One SGLang server process group. Use as a context manager; ``stop()`` is idempotent."""

    def __init__(self, cmd: List[str], port: int, log_path: Optional[Path] = None) -> None:
        self.cmd = cmd
        self.port = port
        self.url = f"http://{DEFAULT_HOST}:{port}"
        self.log_path = log_path
        self._log: Optional[IO[bytes]] = None
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout_s: float = 240.0) -> ServerProcess:
        """:meth:`launch`, then wait until it is healthy (stopped again if it does not get so)."""
        self.launch()
        try:
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> ServerProcess:
        """Start the process and return at once (several servers can start side by side)."""
        out = subprocess.DEVNULL
        if self.log_path is not None:
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs
            out = self._log
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=server_env(),
            preexec_fn=_own_group_with_default_sigint,
        )
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode} before it was ready"
                    + (f"; log: {self.log_path}" if self.log_path else "")
                )
            if self.is_healthy():
                return
            time.sleep(0.2)
        raise TimeoutError(f"server on port {self.port} not healthy after {timeout_s:.0f} s")

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGINT to the launcher alone, as Ctrl-C would: uvicorn shuts down and SGLang's
        launcher stops its own children, in about half a second (SIGTERM makes SGLang drain
        first, polled every 5 s; a signal to the whole group makes it report a crashed child and
        sleep 5 s for crash diagnostics). SIGTERM to the group only if the launcher has not
        exited within ``grace_s``; then SIGKILL to whatever of the group is left."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            launcher = lambda: proc.send_signal(signal.SIGINT)  # noqa: E731
            for send in (launcher, lambda: _signal_group(proc.pid, signal.SIGTERM)):
                send()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace_s)
                    break
        if proc is not None:
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def example_curl(url: str, adapter: str) -> str:
    body = {
        "text": "Once upon a time",
        "sampling_params": {"max_new_tokens": 16, "temperature": 0},
        "lora_path": adapter,
    }
    return f"curl -s {url}/generate -H 'Content-Type: application/json' -d '{json.dumps(body)}'"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the built-in model with its adapters.")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--adapters", type=int, default=None, help="number of adapters")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--no-chameleon", action="store_true")
    parser.add_argument("extra", nargs="*", help="extra sglang arguments (after --)")
    args = parser.parse_args(argv)
    assets = build(args.preset, args.adapters)
    cmd = server_command(assets, args.port, chameleon=not args.no_chameleon, extra_args=args.extra)
    print("+ " + " ".join(cmd), flush=True)
    server = ServerProcess(cmd, args.port)
    server.proc = subprocess.Popen(cmd, env=server_env(), start_new_session=True)
    try:
        server.wait_healthy(timeout_s=300)
        adapter = assets.adapters[len(assets.adapters) // 2].name if assets.adapters else ""
        print(f"\nServer ready on {server.url} (Ctrl-C stops it). Try:\n", flush=True)
        print("  " + example_curl(server.url, adapter) + "\n", flush=True)
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
