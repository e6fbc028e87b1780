"""The strongest stock SGLang a user would configure for a workload, found by a small sweep.

Contract: :func:`tune` runs stock SGLang (no ``--chameleon``) once per candidate on the
comparison's own workload, each a fresh server (never two at once), and returns a JSON-able
record of every candidate and the flags of the best one, which become the ``stock-tuned`` arm:

1. ``--max-loras-per-batch`` in :data:`SLOT_CANDIDATES` (8, 16, 32, 64, every adapter served,
   and ``max``: the most slots the memory budget allows, :mod:`eval.memory_budget`; those above
   the number of adapters dropped), each with ``--max-lora-rank`` the largest rank served and
   ``--lora-target-modules`` the served adapters' own (slots padded no wider than needed). A
   candidate that does not fit the memory budget is recorded as infeasible and not run;
2. the best of those plus SGLang's LoRA drainer (``--lora-drain-wait-threshold``): a request
   that waited longer than the threshold makes SGLang drain one running adapter for it;
3. the best so far plus overlap loading (``--enable-lora-overlap-loading``), which SGLang accepts
   only with ``--max-loaded-loras`` at most twice ``--max-loras-per-batch``; tried with enough
   slots for that. Where a candidate's server does not start (e.g. a GPU-only feature on this
   machine), the record says why and the tuning goes on.

Best: the lowest P99 TTFT among candidates that failed no request (else the fewest failures);
ties go to the earlier candidate. Tuning on the measured workload itself favours stock, which is
the conservative direction for our claims.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from eval.arms import TUNED_STOCK_ARM
from eval.runner import InfeasibleArm, RunConfig, max_slots, run_arm
from eval.workload import WorkloadRequest

SLOT_CANDIDATES: Tuple[Union[int, str], ...] = (8, 16, 32, 64, "all", "max")
DEFAULT_DRAIN_WAIT_S = 1.0
METRIC_KEYS = (
    "ttft_p50",
    "ttft_p99",
    "tbt_p50",
    "tbt_p99",
    "throughput_rps",
    "completed",
    "failed",
)


def slot_counts(
    num_adapters: int,
    wanted: Sequence[Union[int, str]] = SLOT_CANDIDATES,
    max_slots: Optional[int] = None,
) -> List[int]:
    """The distinct ``--max-loras-per-batch`` values to try, ascending: ``"all"`` is
    ``num_adapters``, ``"max"`` is ``max_slots`` (the budget's most; ``num_adapters`` when None);
    values above ``num_adapters`` are dropped."""
    named = {"all": num_adapters, "max": num_adapters if max_slots is None else max_slots}
    counts = {named[w] if isinstance(w, str) else int(w) for w in wanted}
    return sorted(c for c in counts if 1 <= c <= num_adapters)


def parse_slots(text: str) -> List[Union[int, str]]:
    """``"8,16,all"`` -> ``[8, 16, "all"]``."""
    out: List[Union[int, str]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        out.append(part if part in ("all", "max") else int(part))
    if not out:
        raise ValueError("no slot counts given")
    return out


def candidate_flags(
    slots: int, drain_wait_s: Optional[float] = None, overlap: bool = False, fit: Sequence[str] = ()
) -> Tuple[str, ...]:
    """Stock flags of one candidate (they override the shared ``--max-loras-per-batch``);
    ``fit``: :func:`fitted_slot_flags`, last."""
    flags: Tuple[str, ...] = ("--max-loras-per-batch", str(slots))
    if drain_wait_s:
        flags += ("--lora-drain-wait-threshold", f"{drain_wait_s:g}")
    if overlap:
        flags += ("--enable-lora-overlap-loading",)
    return flags + tuple(fit)


def fitted_slot_flags(adapter_dirs: Sequence[Path]) -> Tuple[str, ...]:
    """``--max-lora-rank`` the largest rank served, ``--lora-target-modules`` the union of the
    served adapters' modules: slots no wider than the adapters need (empty: none served)."""
    ranks, modules = [], set()
    for d in adapter_dirs:
        config = json.loads((Path(d) / "adapter_config.json").read_text())
        ranks.append(int(config["r"]))
        modules |= set(config["target_modules"])
    if not ranks:
        return ()
    return ("--max-lora-rank", str(max(ranks)), "--lora-target-modules", *sorted(modules))


def rank_key(record: Dict[str, Any]) -> Tuple[float, float]:
    """Sort key of a candidate record: (failures, P99 TTFT); infeasible or not started sorts
    last."""
    if record.get("error") or record.get("infeasible") or record.get("ttft_p99") is None:
        return (math.inf, math.inf)
    return (float(record["failed"]), float(record["ttft_p99"]))


def best(records: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The best candidate record (see the module contract), None when none started."""
    ranked = [r for r in records if rank_key(r)[0] != math.inf]
    return min(ranked, key=rank_key) if ranked else None


def tune(
    workload: Sequence[WorkloadRequest],
    cfg: RunConfig,
    out: Path,
    slots: Sequence[Union[int, str]] = SLOT_CANDIDATES,
    drain_wait_s: float = DEFAULT_DRAIN_WAIT_S,
    try_overlap: bool = True,
    log: Callable[[str], None] = print,
    fit_slots: bool = True,
) -> Dict[str, Any]:
    """Run the candidates (module contract); ``{"candidates": [...], "flags": [...]}``."""
    num_adapters = len(cfg.adapters)
    fit = fitted_slot_flags([a.path for a in cfg.adapters]) if fit_slots else ()
    records: List[Dict[str, Any]] = []

    def run(flags: Tuple[str, ...]) -> Dict[str, Any]:
        name = "tune-" + "-".join(f.lstrip("-") for f in flags[:6])
        record: Dict[str, Any] = {"flags": list(flags), "run_dir": str(out / "tune" / name)}
        tuned_cfg = dataclasses.replace(cfg, arm_flags={**cfg.arm_flags, TUNED_STOCK_ARM: flags})
        try:
            outcome = run_arm(TUNED_STOCK_ARM, 0, workload, tuned_cfg, out / "tune" / name)
            record.update({k: outcome.metrics.get(k) for k in METRIC_KEYS})
            record["memory"] = outcome.settings.get("memory")
        except InfeasibleArm as exc:
            record["infeasible"] = str(exc)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {str(exc)[-600:]}"
        outcome_text = record.get("error") or record.get("infeasible")
        log(
            f"[tune] {' '.join(flags)}: "
            + (outcome_text or f"TTFT p99 {record['ttft_p99']}, failed {record['failed']}")
        )
        records.append(record)
        return record

    most = max_slots(cfg, candidate_flags(1, fit=fit)) if "max" in slots else None
    for count in slot_counts(num_adapters, slots, most):
        run(candidate_flags(count, fit=fit))
    top = best(records)
    if top is not None and drain_wait_s > 0:
        count = int(top["flags"][1])
        run(candidate_flags(count, drain_wait_s, fit=fit))
    top = best(records)
    if top is not None and try_overlap:
        count = max(int(top["flags"][1]), -(-num_adapters // 2))
        drain = float(top["flags"][3]) if "--lora-drain-wait-threshold" in top["flags"] else None
        run(candidate_flags(count, drain, overlap=True, fit=fit))
    top = best(records)
    for r in records:
        r["chosen"] = r is top
    return {
        "candidates": records,
        "flags": list(top["flags"]) if top else None,
        "drain_wait_s": drain_wait_s,
        "slot_candidates": [str(s) for s in slots],
        "max_slots": most,
        "memory_budget": cfg.flags.memory_budget,
    }
