"""Factories for the evaluation tests: adapters without a build, traces, request results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from chameleon_sglang.dev.assets import ADAPTER_RANKS, AdapterInfo, adapter_name
from eval.loadgen import STATUS_OK, RequestResult

REPO = Path(__file__).resolve().parents[2]


def run_eval_tool(module: str, *args: str, timeout: float = 900) -> None:
    """``python -m <module> <args>`` from the repository root, as a user runs it; fails the test
    with the end of its output unless it exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def make_adapters(n: int = 100) -> List[AdapterInfo]:
    """``n`` adapters named and ranked like the eval preset (ranks cycle 8..128)."""
    out = []
    for i in range(n):
        rank = ADAPTER_RANKS[i % len(ADAPTER_RANKS)]
        out.append(AdapterInfo(name=adapter_name(i, rank), rank=rank, path=f"/nowhere/{i}"))
    return out


def write_trace(
    path: Path, rows: Sequence[Tuple[object, int, int]], adapter_ids: Optional[Sequence[str]] = None
) -> Path:
    """A trace CSV with rows ``(timestamp, context_tokens, generated_tokens)``."""
    header = "TIMESTAMP,ContextTokens,GeneratedTokens" + (",AdapterId" if adapter_ids else "")
    lines = [header]
    for i, (ts, cin, cout) in enumerate(rows):
        line = f"{ts},{cin},{cout}"
        if adapter_ids:
            line += f",{adapter_ids[i]}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path


def result(
    index: int = 0,
    *,
    status: str = STATUS_OK,
    sent: Optional[float] = 0.0,
    ttft: Optional[float] = 0.1,
    e2e: Optional[float] = 1.0,
    tbt: Sequence[float] = (),
    size_class: str = "small",
    input_len: int = 100,
    queue: Optional[float] = None,
    retractions: int = 0,
) -> RequestResult:
    return RequestResult(
        index=index,
        adapter="a000r8",
        rank=8,
        size_class=size_class,
        input_len=input_len,
        output_len=8,
        arrival_s=sent or 0.0,
        status=status,
        sent_s=sent,
        ttft_s=ttft,
        e2e_s=e2e if status == STATUS_OK else None,
        tbt_s=tuple(tbt),
        num_output_tokens=8,
        num_retractions=retractions,
        queue_time_s=queue,
    )
