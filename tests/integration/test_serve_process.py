"""``ServerProcess``: its own process group in the caller's session, stopped as a whole group."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from chameleon_sglang.dev.serve import ServerProcess, free_port

# A stand-in server: records its session, group and a child's PID, then answers /health.
FAKE_SERVER = r"""
import http.server, json, os, subprocess, sys
port, out = int(sys.argv[1]), sys.argv[2]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(out, "w") as f:
    json.dump({"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
               "child": child.pid}, f)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_server_runs_in_own_group_of_callers_session_and_stops_whole_group(tmp_path: Path):
    port = free_port()
    out = tmp_path / "ids.json"
    with ServerProcess([sys.executable, "-c", FAKE_SERVER, str(port), str(out)], port) as server:
        ids = json.loads(out.read_text())
        assert ids["pid"] == server.proc.pid
        assert ids["pgid"] == ids["pid"] != os.getpgid(0)  # its own group: killed as one
        assert ids["sid"] == os.getsid(0)  # same session: same scheduling autogroup
        assert _alive(ids["child"])
    deadline = time.monotonic() + 10
    while _alive(ids["child"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(ids["pid"]) and not _alive(ids["child"])


# A stand-in launcher that records the signals it and its child receive; with ``ignore`` it
# ignores SIGINT (a launcher that does not stop on its own).
SIGNAL_RECORDER = r"""
import http.server, os, signal, subprocess, sys, threading
port, out, ignore = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "ignore"
def record(who):
    def handler(sig, frame):
        with open(out, "a") as f:
            f.write(f"{who}:{signal.Signals(sig).name}\n")
        if who == "launcher" and not (ignore and sig == signal.SIGINT):
            os._exit(0)
    return handler
child = subprocess.Popen([sys.executable, "-c", (
    "import signal, sys, time\n"
    "def h(s, f):\n"
    f"    open({out!r}, 'a').write('child:' + signal.Signals(s).name + '\\n'); sys.exit(0)\n"
    "signal.signal(signal.SIGINT, h); signal.signal(signal.SIGTERM, h)\n"
    "time.sleep(600)\n")])
signal.signal(signal.SIGINT, record("launcher"))
signal.signal(signal.SIGTERM, record("launcher"))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _stop_recording(tmp_path: Path, mode: str, grace_s: float) -> tuple:
    port, out = free_port(), tmp_path / f"signals-{mode}.txt"
    server = ServerProcess([sys.executable, "-c", SIGNAL_RECORDER, str(port), str(out), mode], port)
    server.start()
    time.sleep(0.5)  # the child has installed its handlers
    started = time.monotonic()
    server.stop(grace_s=grace_s)
    took = time.monotonic() - started
    return out.read_text().split(), took


def test_stop_interrupts_the_launcher_alone_first(tmp_path: Path):
    """As Ctrl-C would: SIGINT to the launcher only (SGLang's launcher stops its own children;
    a group-wide signal makes it report a crashed child), and no waiting when it exits."""
    signals, took = _stop_recording(tmp_path, "obey", grace_s=10)
    assert signals == ["launcher:SIGINT"]
    assert took < 5


def test_a_launcher_that_does_not_stop_gets_the_group_terminated(tmp_path: Path):
    signals, _ = _stop_recording(tmp_path, "ignore", grace_s=1)
    assert signals[0] == "launcher:SIGINT"
    assert sorted(signals[1:]) == ["child:SIGTERM", "launcher:SIGTERM"]


def test_free_ports_lie_below_the_ephemeral_range_and_are_not_handed_out_twice():
    """A server binds its port tens of seconds after it was chosen; a port from the ephemeral
    range could meanwhile become some outgoing connection's local port (address in use)."""
    from chameleon_sglang.dev.serve import SERVER_PORTS

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(SERVER_PORTS[0] <= p <= SERVER_PORTS[1] < low for p in ports)
