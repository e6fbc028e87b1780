"""Latency and throughput metrics of one run, and their medians over repetitions.

Contracts:
* Percentiles use ``numpy.percentile(..., method="linear")``: for sorted values ``v[0..n-1]`` the
  q-th percentile is ``v[i] + (v[i+1] - v[i]) * f`` with ``i + f = q/100 * (n-1)``; p50 of
  ``[1, 2, 3, 4]`` is 2.5. An empty sample gives ``None``.
* TTFT and e2e percentiles are over completed requests; TBT percentiles over every gap between
  streamed chunks of completed requests, pooled.
* Throughput = completed requests / (last completion - first send), seconds on the client clock.
* Client lag of a request: its send time minus its scheduled arrival. The load generator runs on
  the machine under test; a lag of tens of milliseconds or more means the client itself was
  waiting for a CPU, and its TTFTs of that moment are inflated by the same wait.
* Queueing time of a request: ``meta_info.queue_time`` when the server reports it (SGLang does with
  ``--enable-metrics``), otherwise ``max(0, TTFT - unloaded prefill(input_len))`` from the warm-up
  profile. The queueing share of a size class is sum(queueing) / sum(e2e) over its completed
  requests.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from eval.loadgen import RequestResult
from eval.warmup import UnloadedProfile
from eval.workload import SIZE_CLASSES

QUEUE_SOURCE_SERVER = "meta_info.queue_time"
QUEUE_SOURCE_ESTIMATE = "ttft_minus_unloaded_prefill"

ARM_KEYS: Tuple[str, ...] = (
    "ttft_p50",
    "ttft_p99",
    "tbt_p50",
    "tbt_p99",
    "e2e_p50",
    "e2e_p99",
    "throughput_rps",
    "completed",
    "failed",
    "retractions",
    "cache_hit_rate",
)
COUNT_KEYS: Tuple[str, ...] = ("completed", "failed", "retractions")


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100), numpy 'linear' interpolation; None when empty."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q, method="linear"))


def throughput_rps(results: Sequence[RequestResult]) -> Optional[float]:
    """Completed requests / (last completion - first send); None if nothing completed."""
    sent = [r.sent_s for r in results if r.sent_s is not None]
    done = [r.completion_s for r in results if r.is_ok and r.completion_s is not None]
    if not sent or not done:
        return None
    span = max(done) - min(sent)
    return len(done) / span if span > 0 else None


def run_metrics(
    results: Sequence[RequestResult], cache_hit_rate: Optional[float] = None
) -> Dict[str, Optional[float]]:
    """The per-arm summary keys (:data:`ARM_KEYS`) for one run."""
    ok = [r for r in results if r.is_ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    tbt = [g for r in ok for g in r.tbt_s]
    return {
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "tbt_p50": percentile(tbt, 50),
        "tbt_p99": percentile(tbt, 99),
        "e2e_p50": percentile(e2e, 50),
        "e2e_p99": percentile(e2e, 99),
        "throughput_rps": throughput_rps(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "retractions": int(sum(r.num_retractions for r in results)),
        "cache_hit_rate": cache_hit_rate,
    }


def client_lag(results: Sequence[RequestResult]) -> Dict[str, Optional[float]]:
    """P99 and largest client lag (send minus scheduled arrival, seconds; module contract)."""
    lags = [r.sent_s - r.arrival_s for r in results if r.sent_s is not None]
    return {
        "client_lag_p99_s": percentile(lags, 99),
        "client_lag_max_s": max(lags) if lags else None,
    }


def median_metrics(runs: Sequence[Dict[str, Optional[float]]]) -> Dict[str, object]:
    """Median of each key over repetitions (counts rounded to int; None if any run lacks it)."""
    out: Dict[str, object] = {}
    for key in ARM_KEYS:
        vals = [r.get(key) for r in runs]
        if not vals or any(v is None for v in vals):
            out[key] = 0 if key in COUNT_KEYS and vals == [] else None
            continue
        med = float(np.median(np.asarray(vals, dtype=float)))
        out[key] = int(round(med)) if key in COUNT_KEYS else med
    return out


def queue_source(results: Sequence[RequestResult]) -> str:
    """Where queueing times come from for this run (server-reported or estimated)."""
    ok = [r for r in results if r.is_ok]
    if ok and all(r.queue_time_s is not None for r in ok):
        return QUEUE_SOURCE_SERVER
    return QUEUE_SOURCE_ESTIMATE


def queue_times(
    results: Sequence[RequestResult], profile: Optional[UnloadedProfile]
) -> List[Optional[float]]:
    """Queueing time per result (None when not completed or not estimable)."""
    source = queue_source(results)
    out: List[Optional[float]] = []
    for r in results:
        if not r.is_ok:
            out.append(None)
        elif source == QUEUE_SOURCE_SERVER:
            out.append(r.queue_time_s)
        elif profile is not None and profile.num_probes and r.ttft_s is not None:
            out.append(max(0.0, r.ttft_s - profile.prefill_s(r.input_len)))
        else:
            out.append(None)
    return out


def queueing_share(
    results: Sequence[RequestResult], profile: Optional[UnloadedProfile]
) -> Dict[str, Dict[str, object]]:
    """Per size class: n, mean queueing and e2e time, and queueing's share of e2e time."""
    return pooled_queueing_share([(results, profile)])


def pooled_queueing_share(
    runs: Sequence[Tuple[Sequence[RequestResult], Optional[UnloadedProfile]]],
) -> Dict[str, Dict[str, object]]:
    """:func:`queueing_share` over the requests of several runs together (each run's queueing
    times come from its own source and profile)."""
    triples: List[Tuple[str, float, float]] = []
    sources = set()
    for results, profile in runs:
        sources.add(queue_source(results))
        for q, r in zip(queue_times(results, profile), results):
            if q is not None and r.e2e_s is not None:
                triples.append((r.size_class, q, r.e2e_s))
    source = sources.pop() if len(sources) == 1 else "mixed"
    out: Dict[str, Dict[str, object]] = {}
    for cls in SIZE_CLASSES:
        qs = [q for c, q, _ in triples if c == cls]
        es = [e for c, _, e in triples if c == cls]
        out[cls] = {
            "n": len(qs),
            "mean_queue_s": float(np.mean(qs)) if qs else None,
            "mean_e2e_s": float(np.mean(es)) if es else None,
            "share": sum(qs) / sum(es) if es and sum(es) > 0 else None,
            "source": source,
        }
    return out


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """``num / den``, or None if either is missing or ``den`` is 0."""
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)
