"""The patch tool: apply / revert / idempotence / version check / failed hunks, on a scratch copy
of the pinned wheel's files, and the real environment's state."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "patchset.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("patchset", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["patchset"] = module
    spec.loader.exec_module(module)
    return module


patchset = _load_tool()
PIN = patchset.Pin.read()
SERIES = patchset.read_series(ROOT / "patches")
TOUCHED = sorted({f for p in SERIES for f in p.files})
CREATED = sorted({f for p in SERIES for f in p.created})
WHEEL = ROOT / ".cache" / "wheels" / PIN.wheel


def run_tool(*args: str, site: Path, patches: Path = ROOT / "patches"):
    cmd = [
        sys.executable,
        str(TOOL),
        *args,
        "--site-packages",
        str(site),
        "--patches-dir",
        str(patches),
        "--wheel-dir",
        str(WHEEL.parent),
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


def snapshot(site: Path) -> Dict[str, bytes]:
    return {rel: (site / rel).read_bytes() for rel in TOUCHED if (site / rel).exists()}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site-packages holding the pinned wheel's dist-info and the stock files we patch."""
    assert WHEEL.is_file(), "run `make setup` first (it keeps the pinned wheel)"
    out = tmp_path / "site-packages"
    with zipfile.ZipFile(WHEEL) as whl:
        for name in whl.namelist():
            if name.startswith(f"sglang-{PIN.version}.dist-info/") or name in TOUCHED:
                whl.extract(name, out)
    return out


def stock_matches_record(site: Path) -> bool:
    installed = patchset.Installed.find(site)
    for rel in TOUCHED:
        if rel in CREATED:
            if (site / rel).exists():
                return False
            continue
        if patchset.record_hash((site / rel).read_bytes()) != installed.record[rel]:
            return False
    return True


def test_wheel_matches_pin():
    """The cached wheel is the pinned artifact (sha256 from sglang.pin)."""
    assert hashlib.sha256(WHEEL.read_bytes()).hexdigest() == PIN.sha256


def test_apply_then_status_patched(site):
    """apply turns stock files into patched files; status reports it."""
    assert stock_matches_record(site)
    res = run_tool("apply", site=site)
    assert res.returncode == 0, res.stderr
    assert "applied" in res.stdout
    assert not stock_matches_record(site)
    assert "chameleon_sglang" in (site / "sglang/srt/server_args.py").read_text()
    assert run_tool("status", site=site).stdout.strip().endswith("patched")


def test_apply_twice_is_a_no_op(site):
    """Applying twice changes nothing the second time and says so."""
    assert run_tool("apply", site=site).returncode == 0
    before = snapshot(site)
    res = run_tool("apply", site=site)
    assert res.returncode == 0
    assert "already applied" in res.stdout and "nothing changed" in res.stdout
    assert snapshot(site) == before


def test_revert_restores_stock_byte_for_byte(site):
    """revert restores every touched file to the wheel's bytes (RECORD hashes)."""
    stock = snapshot(site)
    assert run_tool("apply", site=site).returncode == 0
    res = run_tool("revert", site=site)
    assert res.returncode == 0, res.stderr
    assert "RECORD verified" in res.stdout
    assert snapshot(site) == stock
    assert stock_matches_record(site)
    again = run_tool("revert", site=site)
    assert again.returncode == 0 and "nothing changed" in again.stdout


def test_version_mismatch_is_refused(site):
    """Another installed sglang version is refused with both versions named; nothing written."""
    meta = site / f"sglang-{PIN.version}.dist-info" / "METADATA"
    meta.write_text(meta.read_text().replace(f"Version: {PIN.version}", "Version: 0.5.22", 1))
    before = snapshot(site)
    res = run_tool("apply", site=site)
    assert res.returncode == 1
    assert "0.5.22" in res.stderr and PIN.version in res.stderr
    assert snapshot(site) == before


def test_failed_hunk_leaves_tree_untouched(site, tmp_path):
    """A hunk that does not apply fails the whole apply, names the patch, writes nothing."""
    patches = tmp_path / "patches"
    shutil.copytree(ROOT / "patches", patches)
    last = SERIES[-1].path.name
    text = (patches / last).read_text()
    hunks = text[text.index("\n@@ ") :]
    context = next(line for line in hunks.splitlines() if line.startswith(" ") and line.strip())
    (patches / last).write_text(text.replace(context, context + "  # drifted", 1))
    before = snapshot(site)
    res = run_tool("apply", site=site, patches=patches)
    assert res.returncode == 1
    assert last in res.stderr and "nothing was written" in res.stderr
    assert snapshot(site) == before
    assert stock_matches_record(site)


def test_foreign_changes_are_not_patched_over(site):
    """Files changed by something else are refused by apply and restored by revert."""
    assert run_tool("apply", site=site).returncode == 0
    victim = site / "sglang/srt/server_args.py"
    victim.write_bytes(victim.read_bytes() + b"\n# local edit\n")
    res = run_tool("apply", site=site)
    assert res.returncode == 1
    assert "server_args.py" in res.stderr
    assert run_tool("revert", site=site).returncode == 0
    assert stock_matches_record(site)


def test_every_patch_has_a_header_and_a_readme_row():
    """Each patch states Description, Why, Upstream, Remove-when; patches/README.md lists it."""
    readme = (ROOT / "patches" / "README.md").read_text()
    for patch in SERIES:
        header = patch.path.read_text().split("\n--- ", 1)[0]
        for field in ("Description:", "Why:", "Upstream:", "Remove-when:"):
            assert field in header, f"{patch.path.name} lacks {field}"
        assert patch.path.name in readme


def test_installed_environment_is_patched_and_series_checks():
    """The test environment runs the patched pinned sglang; the series applies cleanly."""
    res = subprocess.run([sys.executable, str(TOOL), "check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "installed files are patched" in res.stdout


@pytest.mark.slow
def test_help_lists_chameleon_options():
    """`python -m sglang.launch_server --help` documents --chameleon and its sub-options."""
    res = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    for flag in (
        "--chameleon ",
        "--chameleon-max-queues",
        "--chameleon-ttft-slo",
        "--chameleon-eviction-policy",
        "--no-chameleon-cache",
        "--chameleon-scheduler",
    ):
        assert flag in res.stdout, flag
    assert "(default: 0.45 0.10 0.45)" in " ".join(res.stdout.split())
