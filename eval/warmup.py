"""Warm a server up and measure its unloaded latency, one request at a time.

Contract: :func:`warm_up` sends ``num_discard`` throw-away requests, then probe requests of
increasing prompt length over adapters of every rank, strictly sequentially, and returns an
:class:`UnloadedProfile`: a least-squares line ``ttft = intercept + per_token * input_len`` (the
unloaded prefill time, used to estimate queueing time when the server does not report it) and the
mean unloaded TTFT / TBT / e2e of the probes. Probe prompts use their own random stream, so they
never share a prefix with a workload's prompts.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Dict, List, Optional, Sequence

import aiohttp
import numpy as np

from chameleon_sglang.dev.assets import AdapterInfo
from eval.loadgen import RequestResult, check_loopback, send_one
from eval.workload import MIN_TOKEN_ID, WorkloadRequest

WARMUP_SALT = 7_777_777


@dataclasses.dataclass(frozen=True)
class UnloadedProfile:
    """Unloaded latency of one server, from sequential probes."""

    intercept_s: float
    per_token_s: float
    num_probes: int
    ttft_mean_s: Optional[float]
    tbt_mean_s: Optional[float]
    e2e_mean_s: Optional[float]

    def prefill_s(self, input_len: int) -> float:
        """Predicted unloaded TTFT for a prompt of ``input_len`` tokens (never negative)."""
        return max(0.0, self.intercept_s + self.per_token_s * input_len)

    def to_json(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


def probe_lengths(max_input: int, count: int = 6) -> List[int]:
    """``count`` prompt lengths spread evenly over ``[8, max_input]``."""
    hi = max(8, max_input)
    return sorted({int(x) for x in np.linspace(min(8, hi), hi, count)})


def probe_requests(
    adapters: Sequence[AdapterInfo],
    vocab_size: int,
    lengths: Sequence[int],
    output_len: int,
    repeats: int = 2,
    seed: int = 0,
) -> List[WorkloadRequest]:
    """Sequential probes: every length ``repeats`` times, adapters cycling over the ranks."""
    by_rank: Dict[int, AdapterInfo] = {}
    for a in adapters:
        by_rank.setdefault(a.rank, a)
    cycle = [by_rank[r] for r in sorted(by_rank)] or [None]
    rng = np.random.default_rng([seed, WARMUP_SALT])
    out: List[WorkloadRequest] = []
    for _ in range(repeats):
        for n in lengths:
            a = cycle[len(out) % len(cycle)]
            out.append(
                WorkloadRequest(
                    index=len(out),
                    arrival_s=0.0,
                    adapter=a.name if a else "",
                    rank=a.rank if a else 0,
                    input_len=n,
                    output_len=output_len,
                    size_class="probe",
                    wrs=0.0,
                    trace_row=-1,
                    trace_input=n,
                    trace_output=output_len,
                    input_ids=tuple(int(t) for t in rng.integers(MIN_TOKEN_ID, vocab_size, n)),
                )
            )
    return out


async def run_sequential(
    url: str, requests: Sequence[WorkloadRequest], timeout_s: float = 120.0
) -> List[RequestResult]:
    """Send ``requests`` one after another (each waits for the previous to finish)."""
    url = check_loopback(url)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    out = []
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for req in requests:
            out.append(await send_one(session, url, req, 0.0))
    return out


def fit_profile(results: Sequence[RequestResult]) -> UnloadedProfile:
    """Least-squares prefill line and unloaded means from completed probe results."""
    ok = [r for r in results if r.is_ok and r.ttft_s is not None]
    if not ok:
        return UnloadedProfile(0.0, 0.0, 0, None, None, None)
    x = np.asarray([r.input_len for r in ok], dtype=float)
    y = np.asarray([r.ttft_s for r in ok], dtype=float)
    if len(set(x)) > 1:
        slope, intercept = np.polyfit(x, y, 1)
    else:
        slope, intercept = 0.0, float(y.mean())
    gaps = [g for r in ok for g in r.tbt_s]
    return UnloadedProfile(
        intercept_s=float(intercept),
        per_token_s=float(slope),
        num_probes=len(ok),
        ttft_mean_s=float(y.mean()),
        tbt_mean_s=float(np.mean(gaps)) if gaps else None,
        e2e_mean_s=float(np.mean([r.e2e_s for r in ok if r.e2e_s is not None])),
    )


def warm_up(
    url: str,
    adapters: Sequence[AdapterInfo],
    vocab_size: int,
    max_input: int,
    num_discard: int = 3,
    output_len: int = 8,
    seed: int = 0,
) -> UnloadedProfile:
    """Warm the server, then probe it sequentially (see the module contract)."""
    lengths = probe_lengths(max_input)
    discard = probe_requests(adapters, vocab_size, [16], output_len, num_discard, seed + 1)
    probes = probe_requests(adapters, vocab_size, lengths, output_len, 2, seed)

    async def go() -> List[RequestResult]:
        await run_sequential(url, discard)
        return await run_sequential(url, probes)

    return fit_profile(asyncio.run(go()))
