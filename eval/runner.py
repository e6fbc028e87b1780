"""One measured run of one arm: start its server, warm it up, replay a workload, stop it.

Contract: :func:`arm_server` starts exactly one server (127.0.0.1, a free port, log in
``server.log``) and stops it by PID when its block exits, also on failure (under
``CHAMELEON_EVAL_SERVER_POOL``, a test setting, it reuses and leaves running servers of identical
commands instead: :mod:`eval.server_pool`). :func:`measure`
replays a workload on a running server and writes into ``run_dir``: ``requests.jsonl`` (one
:class:`RequestResult` per request), ``status.jsonl`` (sampled ``chameleon_status``),
``server_info.json`` (at the end of the run) and ``run.json`` (metrics, profile, queueing
shares). :func:`run_arm` is one fresh server, warm-up and measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from chameleon_sglang.dev.assets import AdapterInfo, Assets
from chameleon_sglang.dev.serve import ServerProcess, free_port
from eval import server_pool
from eval.arms import ARM_FLAGS, TUNED_STOCK_ARM, ServerFlags, arm_command
from eval.loadgen import RequestResult, run_load_sync
from eval.machine_load import foreign_share, snapshot, wait_until_quiet
from eval.memory_budget import arm_memory, max_feasible_slots, with_kv_tokens
from eval.metrics import client_lag, queue_source, queueing_share, run_metrics
from eval.server_status import StatusSampler, cache_hit_rate, chameleon_status, server_info
from eval.warmup import UnloadedProfile, warm_up
from eval.workload import WorkloadRequest

SERVER_SETTING_KEYS: Tuple[str, ...] = (
    "version",
    "dtype",
    "lora_backend",
    "attention_backend",
    "max_loras_per_batch",
    "max_loaded_loras",
    "max_lora_rank",
    "max_total_num_tokens",
    "schedule_policy",
    "lora_eviction_policy",
    "enable_metrics",
    "chameleon",
    "chameleon_scheduler",
    "chameleon_cache",
    "chameleon_eviction_policy",
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every run of a comparison shares."""

    assets: Assets
    adapters: Tuple[AdapterInfo, ...]
    flags: ServerFlags
    drain_s: float = 120.0
    status_interval_s: float = 5.0
    start_timeout_s: float = 600.0
    progress: bool = True
    seed: int = 0
    quiet_max_wait_s: float = 0.0
    quiet_threshold: float = 0.25
    arm_flags: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """Own flags of arms not in :data:`eval.arms.ARM_FLAGS` (``stock-tuned``), or overrides."""
    min_kv_tokens: int = 0
    """The fewest KV tokens an arm may be left with under the ``equal`` memory budget (the
    workload's longest request); fewer makes the arm infeasible."""

    def own_flags(self, arm: str) -> Tuple[str, ...]:
        if arm in self.arm_flags:
            return tuple(self.arm_flags[arm])
        if arm not in ARM_FLAGS:
            raise ValueError(f"no flags for arm {arm!r} (tune it first: eval.tune_stock)")
        return ARM_FLAGS[arm]


class InfeasibleArm(RuntimeError):
    """The arm's LoRA slot buffers leave too little of the memory budget for its KV cache."""


def planned_command(arm: str, cfg: RunConfig, port: int) -> Tuple[List[str], Dict[str, Any]]:
    """The launch command of ``arm`` under ``cfg``'s memory budget and the record of its share
    (``{"budget": "equal"|"as-is", ...}``, see :mod:`eval.memory_budget`); raises
    :class:`InfeasibleArm` when the arm does not fit the budget."""
    cmd = arm_command(
        arm, cfg.assets, port, [a.name for a in cfg.adapters], cfg.flags, cfg.own_flags(arm)
    )
    mode = cfg.flags.memory_budget
    if mode == "as-is":
        return cmd, {"budget": mode}
    memory = arm_memory(cmd, cfg.flags.max_total_tokens, cfg.min_kv_tokens)
    record = {"budget": mode, "budget_tokens": cfg.flags.max_total_tokens, **memory.record()}
    if not memory.feasible:
        raise InfeasibleArm(f"{arm}: {memory.reason}")
    return with_kv_tokens(cmd, memory.kv_tokens), record


def infeasible_arms(arms: Sequence[str], cfg: RunConfig) -> Dict[str, str]:
    """The arms of ``arms`` that do not fit ``cfg``'s memory budget, with the reason."""
    out: Dict[str, str] = {}
    for arm in arms:
        try:
            planned_command(arm, cfg, 0)
        except InfeasibleArm as exc:
            out[arm] = str(exc)
    return out


def max_slots(cfg: RunConfig, own: Sequence[str]) -> int:
    """The most ``--max-loras-per-batch`` a stock server with ``own`` flags may have within
    ``cfg``'s memory budget (``as-is``: one per adapter served)."""
    if cfg.flags.memory_budget == "as-is":
        return len(cfg.adapters)
    cmd = arm_command(
        TUNED_STOCK_ARM, cfg.assets, 0, [a.name for a in cfg.adapters], cfg.flags, own
    )
    return max_feasible_slots(cmd, cfg.flags.max_total_tokens, cfg.min_kv_tokens)


@dataclasses.dataclass(frozen=True)
class ArmServer:
    """A running server of one arm."""

    arm: str
    url: str
    command: List[str]
    start_s: float
    pgid: Optional[int] = None
    quiet: Optional[Dict[str, object]] = None
    memory: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunOutcome:
    """The results of one run of one arm."""

    arm: str
    repeat: int
    run_dir: Path
    results: List[RequestResult]
    profile: UnloadedProfile
    metrics: Dict[str, Any]
    queueing: Dict[str, Dict[str, object]]
    status_samples: List[Tuple[float, Optional[Dict[str, Any]]]]
    settings: Dict[str, Any]
    command: List[str]
    start_s: float
    load_s: float
    machine_load: Dict[str, object] = dataclasses.field(default_factory=dict)
    own_flags: Tuple[str, ...] = ()


@contextlib.contextmanager
def arm_server(arm: str, cfg: RunConfig, log_dir: Path) -> Iterator[ArmServer]:
    """A started (healthy) server of ``arm``; stopped by PID when the block exits. First waits
    (at most ``cfg.quiet_max_wait_s``) for other processes to leave the CPU mostly idle."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd, memory = planned_command(arm, cfg, port)
    pool = server_pool.pool_dir(arm)
    key = server_pool.command_key(cmd, port)
    pooled = server_pool.lookup(pool, key) if pool is not None else None
    if pooled is not None:  # a test run: the same server as an earlier run (eval.server_pool)
        url, command, pid = str(pooled["url"]), list(pooled["command"]), int(pooled["pid"])
        yield ArmServer(arm, url, command, 0.0, pid, memory=memory)
        return
    quiet = None
    if cfg.quiet_max_wait_s > 0:
        quiet = wait_until_quiet(cfg.quiet_max_wait_s, cfg.quiet_threshold)
    t0 = time.perf_counter()
    server = ServerProcess(cmd, port, log_path=log_dir / "server.log")
    server.start(timeout_s=cfg.start_timeout_s)
    pgid = server.proc.pid if server.proc is not None else None
    if pool is not None and pgid is not None:
        server_pool.record(pool, key, server.url, pgid, cmd)
    try:
        yield ArmServer(arm, server.url, cmd, time.perf_counter() - t0, pgid, quiet, memory)
    finally:
        if pool is None:
            server.stop()


def warm(server: ArmServer, cfg: RunConfig, max_input: int) -> UnloadedProfile:
    """Warm-up requests and the unloaded profile of ``server`` (see ``eval.warmup``)."""
    return warm_up(server.url, cfg.adapters, cfg.assets.recipe.vocab_size, max_input, seed=cfg.seed)


def measure(
    server: ArmServer,
    repeat: int,
    workload: Sequence[WorkloadRequest],
    cfg: RunConfig,
    profile: UnloadedProfile,
    run_dir: Path,
) -> RunOutcome:
    """Replay ``workload`` on a running server and write the run's files into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    deadline = max((r.arrival_s for r in workload), default=0.0) + cfg.drain_s
    t1 = time.perf_counter()
    before = snapshot(server.pgid)
    with StatusSampler(server.url, cfg.status_interval_s) as sampler:
        results = run_load_sync(
            server.url, workload, deadline, cfg.progress, desc=f"{server.arm} #{repeat}"
        )
    load_s = time.perf_counter() - t1
    machine = foreign_share(before, snapshot(server.pgid)) | client_lag(results)
    machine["before_server_start"] = server.quiet
    info = _safe_server_info(server.url)
    status = chameleon_status(info)
    outcome = RunOutcome(
        arm=server.arm,
        repeat=repeat,
        run_dir=run_dir,
        results=results,
        profile=profile,
        metrics=run_metrics(results, cache_hit_rate(status)),
        queueing=queueing_share(results, profile),
        status_samples=sampler.samples,
        settings={k: info.get(k) for k in SERVER_SETTING_KEYS}
        | {"chameleon_status": status, "memory": server.memory},
        command=server.command,
        start_s=server.start_s,
        load_s=load_s,
        machine_load=machine,
        own_flags=cfg.own_flags(server.arm),
    )
    _write(outcome, info)
    return outcome


def run_arm(
    arm: str, repeat: int, workload: Sequence[WorkloadRequest], cfg: RunConfig, run_dir: Path
) -> RunOutcome:
    """Run ``workload`` once against a fresh server of ``arm`` (see the module contract)."""
    with arm_server(arm, cfg, run_dir) as server:
        profile = warm(server, cfg, max((r.input_len for r in workload), default=64))
        return measure(server, repeat, workload, cfg, profile, run_dir)


def _safe_server_info(url: str) -> Dict[str, Any]:
    try:
        return server_info(url)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _write(o: RunOutcome, info: Dict[str, Any]) -> None:
    with open(o.run_dir / "requests.jsonl", "w") as f:
        for r in o.results:
            f.write(json.dumps(r.to_json()) + "\n")
    with open(o.run_dir / "status.jsonl", "w") as f:
        for t, s in o.status_samples:
            f.write(json.dumps({"t_s": t, "chameleon_status": s}) + "\n")
    (o.run_dir / "server_info.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    (o.run_dir / "run.json").write_text(json.dumps(run_record(o), indent=1) + "\n")


def run_record(o: RunOutcome) -> Dict[str, Any]:
    """The JSON-able record of a run (everything but the per-request results)."""
    return {
        "arm": o.arm,
        "repeat": o.repeat,
        "metrics": o.metrics,
        "queueing": o.queueing,
        "queue_source": queue_source(o.results),
        "profile": o.profile.to_json(),
        "settings": o.settings,
        "command": o.command,
        "server_start_s": o.start_s,
        "load_s": o.load_s,
        "machine_load": o.machine_load,
        "own_flags": list(o.own_flags),
    }
