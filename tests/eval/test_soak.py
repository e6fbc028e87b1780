"""The overload soak, short: a tiny-preset server at twice its measured capacity for 8 s (after
a warm-up as long) with faults (its adapter directory changed on disk under the traffic, bad
adapters among new ones, admin unload/load storms, clients hanging up at random points, a
burst); the soak's own verdict (nothing lost, bad adapters never served, invariants clean,
quotas and references back to zero, probe output unchanged, memory flat) must be PASSED."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_short_soak_loses_nothing(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.soak",
            "--preset",
            "tiny",
            "--dtype",
            "float32",
            "--duration",
            "8",
            "--capacity-seconds",
            "4",
            "--clients",
            "8",
            "--hangup",
            "0.2",
            "--faults",
            "--fault-every",
            "1",
            "--storm-every",
            "3",
            "--bursts",
            "1",
            "--burst-seconds",
            "1",
            "--burst-factor",
            "5",
            "--max-input",
            "128",
            "--max-output",
            "24",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads((tmp_path / "soak.json").read_text())
    assert proc.returncode == 0 and report["passed"], (
        report["checks"],
        report["lost"],
        proc.stdout[-3000:],
    )
    outcomes = report["outcomes"]
    assert outcomes["completed"] > 0 and outcomes["hung_up"] > 0 and outcomes["lost"] == 0
    assert report["reloads"] >= 4  # two storms of every spare adapter
    faults = report["faults"]
    assert faults["disk_faults"] >= 6 and faults["bad"] >= 1, faults
    # requests named bad adapters and got explicit errors, never a completion
    assert outcomes["error"] > 0 and report["checks"]["bad_adapters_never_served"]
    assert report["offered_rps"] >= 1.9 * report["capacity_rps"]
