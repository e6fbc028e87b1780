"""Arms of a comparison: a name, the extra SGLang flags that define it, and the shared server flags.

Contract: every arm of one comparison runs the same launch command from
``chameleon_sglang.dev.serve.server_command`` (same assets, adapters, dtype and
:class:`ServerFlags`); arms differ only by their own flags: :data:`ARM_FLAGS`, where ``stock`` adds
nothing (no ``--chameleon``), and ``stock-tuned``, stock SGLang with the flags ``eval.tune_stock``
found best for the workload (more LoRA slots per batch, SGLang's drainer), set per comparison. An
arm's own flags come last, so they override the shared ones (e.g. ``--max-loras-per-batch``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from chameleon_sglang.dev.assets import Assets
from chameleon_sglang.dev.serve import server_command

ARM_FLAGS: Dict[str, Tuple[str, ...]] = {
    "stock": (),
    "chameleon": ("--chameleon",),
    "chameleon-static": ("--chameleon", "--chameleon-scheduler", "static"),
    "scheduler-only": ("--chameleon", "--no-chameleon-cache"),
    "cache-only": ("--chameleon", "--chameleon-scheduler", "off"),
    "evict-lru": ("--chameleon", "--chameleon-eviction-policy", "lru"),
    "evict-fairshare": ("--chameleon", "--chameleon-eviction-policy", "fairshare"),
    "evict-gdsf": ("--chameleon", "--chameleon-eviction-policy", "gdsf"),
    "chameleon-predictive": ("--chameleon", "--chameleon-prefetch-policy", "predictive"),
    "predictor-100": (
        "--chameleon",
        "--chameleon-predictor",
        "synthetic",
        "--chameleon-predictor-accuracy",
        "1.0",
    ),
    "predictor-80": (
        "--chameleon",
        "--chameleon-predictor",
        "synthetic",
        "--chameleon-predictor-accuracy",
        "0.8",
    ),
    "predictor-60": (
        "--chameleon",
        "--chameleon-predictor",
        "synthetic",
        "--chameleon-predictor-accuracy",
        "0.6",
    ),
    # Data parallelism: Chameleon on each of 2 replicas; only the controller's dispatch differs
    "dp-round-robin": ("--chameleon", "--dp-size", "2", "--load-balance-method", "round_robin"),
    "dp-shortest-queue": (
        "--chameleon",
        "--dp-size",
        "2",
        "--load-balance-method",
        "total_requests",
    ),
    "dp-affinity": ("--chameleon", "--dp-size", "2", "--load-balance-method", "chameleon"),
}
DP_ARMS: Tuple[str, ...] = ("dp-round-robin", "dp-shortest-queue", "dp-affinity")
TUNED_STOCK_ARM = "stock-tuned"
"""Stock SGLang with per-workload flags (``eval.tune_stock``): not in :data:`ARM_FLAGS`."""
ARM_NAMES: Tuple[str, ...] = (*ARM_FLAGS, TUNED_STOCK_ARM)


@dataclasses.dataclass(frozen=True)
class ServerFlags:
    """Flags shared by every arm; the defaults mirror the measured stock baseline."""

    dtype: str = "bfloat16"
    max_total_tokens: int = 65536
    max_lora_rank: int = 128
    max_loras_per_batch: int = 8
    enable_metrics: bool = True
    extra: Tuple[str, ...] = ()
    memory_budget: str = "equal"
    """``equal``: ``max_total_tokens`` is every arm's whole budget, and an arm with LoRA slot
    buffers runs with its KV pool cut by their bytes (:mod:`eval.memory_budget`); ``as-is``:
    every arm gets ``max_total_tokens`` of KV on top of whatever slots it has."""

    def extra_args(self) -> List[str]:
        args = ["--max-loras-per-batch", str(self.max_loras_per_batch)]
        if self.enable_metrics:
            args.append("--enable-metrics")
        return args + list(self.extra)


BF16_CPU_FLAGS: Tuple[str, ...] = ("avx512_bf16", "amx_bf16")


def auto_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """``bfloat16`` where the CPU computes it natively (AVX512-BF16 or AMX), else ``float32``:
    without those instructions bf16 GEMMs are emulated and several times slower than fp32."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return "float32"
    return "bfloat16" if flags & set(BF16_CPU_FLAGS) else "float32"


def parse_arms(text: str) -> List[str]:
    """Comma-separated arm names, validated against :data:`ARM_NAMES`, order kept."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {sorted(ARM_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"arm listed twice in {text!r}")
    return names


def arm_command(
    arm: str,
    assets: Assets,
    port: int,
    adapters: Sequence[str],
    flags: ServerFlags,
    own: Optional[Sequence[str]] = None,
) -> List[str]:
    """The launch command of ``arm``: the shared command plus the arm's own flags (``own``, by
    default :data:`ARM_FLAGS`; required for ``stock-tuned``)."""
    if own is None:
        if arm not in ARM_FLAGS:
            raise ValueError(f"arm {arm!r} has no fixed flags: pass them")
        own = ARM_FLAGS[arm]
    return server_command(
        assets,
        port,
        chameleon=False,
        dtype=flags.dtype,
        max_lora_rank=flags.max_lora_rank,
        max_total_tokens=flags.max_total_tokens,
        adapters=list(adapters),
        extra_args=flags.extra_args() + list(own),
        python=sys.executable,
        warmup=False,  # every run warms its server up itself (eval.warmup)
    )
