#!/usr/bin/env python3
"""Apply, revert and check the patch set (``patches/series``) on the installed SGLang.

Standard library only; run it with the interpreter of the environment whose SGLang it should
touch (``make apply-patches`` uses ``.venv/bin/python``).

Contract:
- Works only on the pinned SGLang release (``sglang.pin``); any other installed version is
  refused before anything is read or written.
- Every touched file has exactly one of three states: *stock* (the wheel's bytes, checked against
  the wheel's RECORD sha256), *patched* (stock + every patch of the series, in order, no fuzz),
  or *foreign* (anything else). Files that a patch creates are absent when stock.
- ``apply``: stock -> patched; already patched -> says so, changes nothing. The patched bytes are
  computed in a scratch directory first; if any hunk fails nothing is written.
- ``revert``: patched (or foreign) -> stock, byte for byte, verified against RECORD afterwards.
- ``check``: the series applies with no fuzz to stock bytes and every patched file compiles;
  reports the state of the installed files. Exit status 0 only when all of that holds.
- A foreign tree is never patched over: revert first (or reinstall SGLang).

Stock bytes come from the installed file when it still matches RECORD, else from the pinned wheel
(downloaded into ``.cache/wheels`` and checked against the pinned sha256).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import importlib.metadata as md
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent


class PatchError(RuntimeError):
    """A refusal or failure, with a message meant for the user."""


@dataclasses.dataclass(frozen=True)
class Pin:
    version: str
    wheel: str
    sha256: str

    @staticmethod
    def read(path: Path = ROOT / "sglang.pin") -> Pin:
        values: Dict[str, str] = {}
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
        return Pin(values["SGLANG_VERSION"], values["SGLANG_WHEEL"], values["SGLANG_WHEEL_SHA256"])


@dataclasses.dataclass(frozen=True)
class Patch:
    path: Path
    files: List[str]  # paths relative to site-packages, e.g. "sglang/srt/utils/common.py"
    created: List[str]  # files this patch adds (absent in the stock wheel)


def read_series(patches_dir: Path) -> List[Patch]:
    series = patches_dir / "series"
    if not series.is_file():
        raise PatchError(f"{series} is missing")
    patches = []
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        path = patches_dir / name
        if not path.is_file():
            raise PatchError(f"patches/series lists {name}, which does not exist")
        patches.append(_parse_patch(path))
    return patches


def _parse_patch(path: Path) -> Patch:
    files: List[str] = []
    created: List[str] = []
    old = None
    for line in path.read_text().splitlines():
        if line.startswith("--- "):
            old = line[4:].split("\t", 1)[0].strip()
        elif line.startswith("+++ ") and old is not None:
            new = line[4:].split("\t", 1)[0].strip()
            rel = new.split("/", 1)[1]  # strip the b/ prefix (-p1)
            if rel not in files:
                files.append(rel)
            if old == "/dev/null":
                created.append(rel)
            old = None
    if not files:
        raise PatchError(f"{path.name} touches no file (not a unified diff?)")
    return Patch(path, files, created)


@dataclasses.dataclass
class Installed:
    """The installed SGLang distribution: where it lives and what its RECORD says."""

    site: Path
    version: str
    record: Dict[str, str]  # relative path -> urlsafe-b64 sha256 (RECORD format)

    @staticmethod
    def find(site_packages: Optional[Path]) -> Installed:
        if site_packages is not None:
            dists = list(md.distributions(name="sglang", path=[str(site_packages)]))
            dist = dists[0] if dists else None
        else:
            try:
                dist = md.distribution("sglang")
            except md.PackageNotFoundError:
                dist = None
        if dist is None:
            where = site_packages or sys.executable
            raise PatchError(f"sglang is not installed in {where}; run `make setup` first")
        record = {}
        for f in dist.files or []:
            if f.hash is not None and f.hash.mode == "sha256":
                record[str(f).replace(os.sep, "/")] = f.hash.value
        return Installed(Path(str(dist.locate_file(""))), dist.version, record)


def record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


class PatchSet:
    """The series, the installed tree and the pinned wheel, and the three operations on them."""

    def __init__(self, patches_dir: Path, site_packages: Optional[Path], wheel_dir: Path):
        self.pin = Pin.read()
        self.installed = Installed.find(site_packages)
        if self.installed.version != self.pin.version:
            raise PatchError(
                f"installed sglang is {self.installed.version}, but this patch set is for "
                f"sglang=={self.pin.version} (sglang.pin). Install the pinned release "
                f"(`make setup`) before applying patches."
            )
        self.patches = read_series(patches_dir)
        self.wheel_dir = wheel_dir
        self.files = sorted({f for p in self.patches for f in p.files})
        self.created = sorted({f for p in self.patches for f in p.created})
        for rel in self.files:
            if rel not in self.created and rel not in self.installed.record:
                raise PatchError(f"{rel} is not part of sglang {self.pin.version} (RECORD)")

    # -- states ---------------------------------------------------------------------------
    def current(self) -> Dict[str, Optional[bytes]]:
        return {rel: _read_or_none(self.installed.site / rel) for rel in self.files}

    def stock(self) -> Dict[str, Optional[bytes]]:
        out: Dict[str, Optional[bytes]] = {}
        missing = []
        for rel in self.files:
            if rel in self.created:
                out[rel] = None
                continue
            data = _read_or_none(self.installed.site / rel)
            if data is not None and record_hash(data) == self.installed.record[rel]:
                out[rel] = data
            else:
                missing.append(rel)
        if missing:
            with zipfile.ZipFile(self._wheel()) as whl:
                for rel in missing:
                    data = whl.read(rel)
                    if record_hash(data) != self.installed.record[rel]:
                        raise PatchError(f"{rel} in the pinned wheel does not match RECORD")
                    out[rel] = data
        return out

    def patched(self, stock: Dict[str, Optional[bytes]]) -> Dict[str, Optional[bytes]]:
        """Apply the whole series to ``stock`` in a scratch directory (no fuzz, all or nothing)."""
        with tempfile.TemporaryDirectory(prefix="chameleon-patch-") as tmp:
            scratch = Path(tmp)
            for rel, data in stock.items():
                if data is not None:
                    (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
                    (scratch / rel).write_bytes(data)
            for patch in self.patches:
                _run_patch(patch, scratch)
            return {rel: _read_or_none(scratch / rel) for rel in self.files}

    def state(self) -> str:
        current, stock = self.current(), self.stock()
        if current == stock:
            return "stock"
        if current == self.patched(stock):
            return "patched"
        return "foreign"

    # -- operations -----------------------------------------------------------------------
    def apply(self) -> str:
        current, stock = self.current(), self.stock()
        target = self.patched(stock)
        if current == target:
            num = f"{len(self.patches)} patches, {len(self.files)} files"
            return f"already applied ({num}): nothing changed"
        if current != stock:
            changed = [r for r in self.files if current[r] != stock[r] and current[r] != target[r]]
            raise PatchError(
                "installed sglang files differ from both the stock release and the patch set: "
                + ", ".join(changed)
                + ". Run `make revert-patches` (or reinstall sglang) and apply again."
            )
        self._write(target, current)
        num = f"{len(self.patches)} patches to {len(self.files)} files"
        return f"applied {num} in {self.installed.site}"

    def revert(self) -> str:
        current, stock = self.current(), self.stock()
        if current == stock:
            return "already stock: nothing changed"
        self._write(stock, current)
        bad = [
            rel
            for rel, data in self.current().items()
            if rel not in self.created and record_hash(data or b"") != self.installed.record[rel]
        ]
        bad += [rel for rel in self.created if (self.installed.site / rel).exists()]
        if bad:
            raise PatchError("revert left files that do not match RECORD: " + ", ".join(bad))
        return f"reverted {len(self.files)} files to sglang {self.pin.version} (RECORD verified)"

    def check(self) -> str:
        target = self.patched(self.stock())
        with tempfile.TemporaryDirectory(prefix="chameleon-compile-") as tmp:
            for rel, data in target.items():
                if rel.endswith(".py") and data is not None:
                    src = Path(tmp) / rel
                    src.parent.mkdir(parents=True, exist_ok=True)
                    src.write_bytes(data)
                    try:
                        py_compile.compile(str(src), doraise=True)
                    except py_compile.PyCompileError as exc:
                        raise PatchError(f"{rel} does not compile once patched: {exc.msg}") from exc
        state = self.state()
        return (
            f"series OK: {len(self.patches)} patches apply with no fuzz to sglang "
            f"{self.pin.version} and compile; installed files are {state}"
        )

    # -- helpers --------------------------------------------------------------------------
    def _write(
        self, target: Dict[str, Optional[bytes]], before: Dict[str, Optional[bytes]]
    ) -> None:
        """Write ``target`` over the installed files; on any error put ``before`` back."""
        written: List[str] = []
        try:
            for rel in self.files:
                if target[rel] != before[rel]:
                    _put(self.installed.site / rel, target[rel])
                    written.append(rel)
        except BaseException:
            for rel in written:
                _put(self.installed.site / rel, before[rel])
            raise

    def _wheel(self) -> Path:
        path = self.wheel_dir / self.pin.wheel
        if not path.is_file():
            self.wheel_dir.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(self.wheel_dir),
                f"sglang=={self.pin.version}",
            ]
            if subprocess.run(cmd).returncode != 0 or not path.is_file():
                raise PatchError(f"could not obtain {self.pin.wheel} (needed for stock bytes)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != self.pin.sha256:
            raise PatchError(f"{path} has sha256 {digest}, pinned {self.pin.sha256}")
        return path


def _read_or_none(path: Path) -> Optional[bytes]:
    return path.read_bytes() if path.is_file() else None


def _put(path: Path, data: Optional[bytes]) -> None:
    """Replace ``path`` atomically with ``data`` (delete it for None); drop stale bytecode."""
    if data is None:
        if path.exists():
            path.unlink()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.chameleon-tmp")
        tmp.write_bytes(data)
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    cache = path.parent / "__pycache__"
    if cache.is_dir():
        for pyc in cache.glob(f"{path.stem}.*.pyc"):
            pyc.unlink()


def _run_patch(patch: Patch, scratch: Path) -> None:
    cmd = [
        "patch",
        "-p1",
        "--batch",
        "--forward",
        "--fuzz=0",
        "--no-backup-if-mismatch",
        "--reject-file=-",
        "-d",
        str(scratch),
        "-i",
        str(patch.path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = "\n    ".join((proc.stdout + proc.stderr).strip().splitlines())
        raise PatchError(
            f"{patch.path.name} does not apply to sglang's stock files (nothing was written):\n"
            f"    {detail}"
        )
    if re.search(r"(fuzz|offset)", proc.stdout, re.IGNORECASE):
        raise PatchError(f"{patch.path.name} applies only with offset or fuzz:\n{proc.stdout}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Apply/revert/check the SGLang patch set.")
    parser.add_argument("command", choices=["apply", "revert", "check", "status"])
    parser.add_argument("--patches-dir", type=Path, default=ROOT / "patches")
    parser.add_argument(
        "--site-packages",
        type=Path,
        default=None,
        help="site-packages holding sglang (default: this interpreter's environment)",
    )
    parser.add_argument("--wheel-dir", type=Path, default=ROOT / ".cache" / "wheels")
    args = parser.parse_args(argv)
    try:
        ps = PatchSet(args.patches_dir, args.site_packages, args.wheel_dir)
        if args.command == "apply":
            msg = ps.apply()
        elif args.command == "revert":
            msg = ps.revert()
        elif args.command == "check":
            msg = ps.check()
        else:
            msg = ps.state()
    except PatchError as exc:
        print(f"patchset: error: {exc}", file=sys.stderr)
        return 1
    print(f"patchset: {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
