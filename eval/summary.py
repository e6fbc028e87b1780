"""``summary.json``: the fixed-shape result of a comparison, and a check of that shape.

Shape (seconds; per-arm values are medians over repetitions; ratios are candidate / reference,
the candidate being ``chameleon`` and the reference ``stock`` when both ran)::

    {"workload": {...}, "machine": {...},
     "arms": {"<arm>": {"ttft_p50": x, "ttft_p99": x, "tbt_p50": x, "tbt_p99": x,
                        "e2e_p50": x, "e2e_p99": x, "throughput_rps": x, "completed": n,
                        "failed": n, "retractions": n, "cache_hit_rate": x|null}},
     "ratios": {"ttft_p50": r, "ttft_p99": r, "tbt_p99": r, "throughput": r,
                "vs_tuned": {"ttft_p50": r, ...} | null}}

``ratios.vs_tuned``: the candidate over ``stock-tuned`` (stock SGLang with the flags
``eval.tune_stock`` found best for the workload), null when that arm did not run.

Any float may be null when it could not be measured (e.g. no request completed).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from eval.metrics import ARM_KEYS, COUNT_KEYS, median_metrics, ratio

TOP_KEYS: Tuple[str, ...] = ("workload", "machine", "arms", "ratios")
RATIO_KEYS: Tuple[str, ...] = ("ttft_p50", "ttft_p99", "tbt_p99", "throughput")
REFERENCE_ARM = "stock"
CANDIDATE_ARM = "chameleon"
TUNED_REFERENCE_ARM = "stock-tuned"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_flags() -> List[str]:
    """The SIMD flags of this CPU that decide its float speeds (of :data:`SIMD_FLAGS`)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in SIMD_FLAGS if f in flags]


def git_commit() -> Optional[str]:
    """``HEAD`` of the repository, with ``+dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_header(dtype: str) -> Dict[str, Any]:
    """The first line a benchmark prints: dtype, CPU model and flags, commit."""
    machine = machine_info()
    return {"dtype": dtype, **{k: machine[k] for k in ("cpu_model", "cpu_flags", "git_commit")}}


def machine_info() -> Dict[str, Any]:
    """CPU count, model and SIMD flags, memory, python / torch / sglang versions, git commit."""
    mem = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "memory_gib": round(mem, 1) if mem else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "sglang": _version("sglang"),
        "git_commit": git_commit(),
    }


def pick_pair(arms: Sequence[str]) -> Tuple[Optional[str], Optional[str]]:
    """(reference, candidate) for the ratios: stock and chameleon when present, else the first
    arm and the first other arm."""
    if not arms:
        return None, None
    ref = REFERENCE_ARM if REFERENCE_ARM in arms else arms[0]
    others = [a for a in arms if a != ref]
    cand = CANDIDATE_ARM if CANDIDATE_ARM in others else (others[0] if others else None)
    return ref, cand


def ratios(
    arms: Dict[str, Dict[str, Any]], ref: Optional[str], cand: Optional[str]
) -> Dict[str, Optional[float]]:
    """candidate / reference for :data:`RATIO_KEYS` (None where either is missing)."""
    a = arms.get(cand or "", {})
    b = arms.get(ref or "", {})
    return {
        "ttft_p50": ratio(a.get("ttft_p50"), b.get("ttft_p50")),
        "ttft_p99": ratio(a.get("ttft_p99"), b.get("ttft_p99")),
        "tbt_p99": ratio(a.get("tbt_p99"), b.get("tbt_p99")),
        "throughput": ratio(a.get("throughput_rps"), b.get("throughput_rps")),
    }


def build_summary(
    workload: Dict[str, Any], machine: Dict[str, Any], runs: Dict[str, List[Dict[str, Any]]]
) -> Dict[str, Any]:
    """The summary from per-arm lists of per-run metrics (:func:`eval.metrics.run_metrics`)."""
    arms = {arm: median_metrics(per_run) for arm, per_run in runs.items()}
    ref, cand = pick_pair(list(runs))
    result = ratios(arms, ref, cand)
    tuned = (
        cand is not None
        and cand != TUNED_REFERENCE_ARM
        and TUNED_REFERENCE_ARM in arms
        and ref != TUNED_REFERENCE_ARM
    )
    return {
        "workload": workload,
        "machine": machine,
        "arms": arms,
        "ratios": {
            **result,
            "vs_tuned": ratios(arms, TUNED_REFERENCE_ARM, cand) if tuned else None,
        },
    }


def _is_num_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def validate_summary(summary: Any) -> List[str]:
    """Every way ``summary`` departs from the shape above; empty when it conforms."""
    if not isinstance(summary, dict):
        return ["summary is not an object"]
    errors = []
    if set(summary) != set(TOP_KEYS):
        errors.append(f"top-level keys {sorted(summary)} != {sorted(TOP_KEYS)}")
    for key in ("workload", "machine", "arms", "ratios"):
        if not isinstance(summary.get(key), dict):
            errors.append(f"{key} is not an object")
    for arm, vals in (summary.get("arms") or {}).items():
        if not isinstance(vals, dict) or set(vals) != set(ARM_KEYS):
            errors.append(f"arms.{arm}: keys {sorted(vals or {})} != {sorted(ARM_KEYS)}")
            continue
        for k, v in vals.items():
            if k in COUNT_KEYS and not (isinstance(v, int) and not isinstance(v, bool)):
                errors.append(f"arms.{arm}.{k} is not an integer: {v!r}")
            elif k not in COUNT_KEYS and not _is_num_or_none(v):
                errors.append(f"arms.{arm}.{k} is not a number or null: {v!r}")
    ratios_ = dict(summary.get("ratios") or {})
    tuned = ratios_.pop("vs_tuned", None)
    if set(ratios_) != set(RATIO_KEYS):
        errors.append(f"ratios keys {sorted(ratios_)} != {sorted(RATIO_KEYS)}")
    errors += [
        f"ratios.{k} is not a number or null" for k, v in ratios_.items() if not _is_num_or_none(v)
    ]
    if tuned is not None:
        if not isinstance(tuned, dict) or set(tuned) != set(RATIO_KEYS):
            errors.append(f"ratios.vs_tuned is not an object of {sorted(RATIO_KEYS)}")
        else:
            errors += [
                f"ratios.vs_tuned.{k} is not a number or null"
                for k, v in tuned.items()
                if not _is_num_or_none(v)
            ]
    return errors
