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
