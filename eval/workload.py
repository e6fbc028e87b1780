"""A replayable request workload built from a trace, with adapters assigned as in the paper.

Contract:
* ``build_workload(spec, adapters, vocab_size)`` is a pure function of its arguments: the same
  spec (seed included), adapters and vocabulary give the same list of :class:`WorkloadRequest`.
* Lengths: ``input = clamp(trace_in // divisor, 1, max_input)``,
  ``output = clamp(trace_out // divisor, min_output, max_output)``.
* Arrivals: the trace's timestamps times ``time_scale``, or, when ``rps`` is set, a seeded
  Poisson process at that rate (first request at 0 s). ``duration_s`` drops later arrivals,
  ``max_requests`` keeps the first N. Trace rows are reused cyclically if more are needed.
* Adapters: the trace's ``AdapterId`` when present (see :func:`map_adapter_ids`); otherwise a rank
  drawn uniformly from the ranks present, then an adapter of that rank with Zipf(``zipf_s``)
  popularity over the adapters of that rank in the given order (the first is the most popular).
* Prompts: ``input_len`` random token ids in ``[10, vocab_size)``, stored in the record, so a
  workload file replays exactly.
* Size class: tertiles (small / medium / large) of the Weighted Request Size
  ``(0.4 in/max_in + 0.6 out/max_out) * rank/max_rank`` over the workload.
Independent random streams (arrivals, adapters, prompts) are derived from ``seed``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from chameleon_sglang.dev.assets import AdapterInfo
from eval.trace import DEFAULT_TRACE, TraceRow, read_trace

MIN_TOKEN_ID = 10
SPEC_FILE = "workload_spec.json"
SIZE_CLASSES: Tuple[str, ...] = ("small", "medium", "large")
WRS_INPUT_WEIGHT = 0.4
WRS_OUTPUT_WEIGHT = 0.6

_STREAM_ARRIVALS = 1
_STREAM_ADAPTERS = 2
_STREAM_PROMPTS = 3


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """How to turn a trace into a workload. Defaults follow the measured stock baseline."""

    trace: str = str(DEFAULT_TRACE)
    seed: int = 0
    zipf_s: float = 1.0
    rank_zipf_s: float = 0.0  # 0: ranks equally likely; > 0: Zipf over ranks, smallest first
    length_divisor: float = 8.0
    max_input: int = 512
    max_output: int = 64
    min_output: int = 4
    time_scale: float = 1.0
    rps: Optional[float] = None
    max_requests: Optional[int] = None
    duration_s: Optional[float] = None
    start_row: int = 0
    prompt_salt: int = 0


@dataclasses.dataclass(frozen=True)
class WorkloadRequest:
    """One request to send: when (offset from the run start), to which adapter, how large."""

    index: int
    arrival_s: float
    adapter: str
    rank: int
    input_len: int
    output_len: int
    size_class: str
    wrs: float
    trace_row: int
    trace_input: int
    trace_output: int
    input_ids: Tuple[int, ...]

    def to_json(self) -> Dict[str, object]:
        d = dataclasses.asdict(self)
        d["input_ids"] = list(self.input_ids)
        return d

    @classmethod
    def from_json(cls, d: Dict[str, object]) -> WorkloadRequest:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        kwargs["input_ids"] = tuple(int(t) for t in d["input_ids"])  # type: ignore[union-attr]
        return cls(**kwargs)  # type: ignore[arg-type]


def scale_length(tokens: int, divisor: float, minimum: int, maximum: int) -> int:
    """``clamp(floor(tokens / divisor), minimum, maximum)``."""
    return int(min(maximum, max(minimum, int(tokens // divisor))))


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    """Normalised finite Zipf weights ``1/k^exponent`` for k = 1..n."""
    w = 1.0 / np.arange(1, n + 1, dtype=float) ** exponent
    return w / w.sum()


def poisson_arrivals(n: int, rps: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival offsets of a Poisson process of rate ``rps``; the first at 0 s."""
    if rps <= 0:
        raise ValueError("rps must be > 0")
    gaps = rng.exponential(1.0 / rps, size=max(0, n - 1))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:n]


def poisson_arrivals_until(duration_s: float, rps: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson arrival offsets (first at 0 s) up to and including ``duration_s``."""
    out = [0.0]
    while True:
        t = out[-1] + float(rng.exponential(1.0 / rps))
        if t > duration_s:
            return np.asarray(out)
        out.append(t)


def assign_adapters(
    n: int,
    adapters: Sequence[AdapterInfo],
    zipf_s: float,
    rng: np.random.Generator,
    rank_zipf_s: float = 0.0,
) -> List[AdapterInfo]:
    """Rank uniform over the ranks present (``rank_zipf_s`` > 0: Zipf over them, the smallest
    rank the most popular), then Zipf popularity within the rank."""
    if not adapters:
        raise ValueError("no adapters to assign")
    by_rank: Dict[int, List[AdapterInfo]] = {}
    for a in adapters:
        by_rank.setdefault(a.rank, []).append(a)
    ranks = sorted(by_rank)
    weights = {r: zipf_weights(len(by_rank[r]), zipf_s) for r in ranks}
    if rank_zipf_s > 0:
        rank_draws = rng.choice(len(ranks), size=n, p=zipf_weights(len(ranks), rank_zipf_s))
    else:
        rank_draws = rng.integers(0, len(ranks), size=n)
    out = []
    for k in rank_draws:
        group = by_rank[ranks[int(k)]]
        out.append(group[int(rng.choice(len(group), p=weights[ranks[int(k)]]))])
    return out


def map_adapter_ids(ids: Sequence[str], adapters: Sequence[AdapterInfo]) -> List[AdapterInfo]:
    """Trace adapter ids onto ``adapters``: an exact name, else an integer id modulo N, else the
    order of first appearance modulo N."""
    by_name = {a.name: a for a in adapters}
    first_seen: Dict[str, int] = {}
    out = []
    for raw in ids:
        if raw in by_name:
            out.append(by_name[raw])
            continue
        try:
            k = int(raw)
        except ValueError:
            k = first_seen.setdefault(raw, len(first_seen))
        out.append(adapters[k % len(adapters)])
    return out


def wrs_scores(inputs: np.ndarray, outputs: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Weighted Request Size, each term normalised by the workload's maximum."""
    i = inputs / max(1, inputs.max())
    o = outputs / max(1, outputs.max())
    return (WRS_INPUT_WEIGHT * i + WRS_OUTPUT_WEIGHT * o) * ranks / max(1, ranks.max())


def size_classes(wrs: np.ndarray) -> List[str]:
    """Tertiles of ``wrs``: ``<= q1/3`` small, ``<= q2/3`` medium, else large."""
    if len(wrs) == 0:
        return []
    lo, hi = np.quantile(wrs, [1 / 3, 2 / 3])
    return [
        SIZE_CLASSES[0] if w <= lo else SIZE_CLASSES[1] if w <= hi else SIZE_CLASSES[2] for w in wrs
    ]


def _rng(spec: WorkloadSpec, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, stream])


def _arrivals(spec: WorkloadSpec, rows: List[TraceRow]) -> np.ndarray:
    if spec.rps is not None:
        rng = _rng(spec, _STREAM_ARRIVALS)
        if spec.max_requests is None and spec.duration_s is not None:
            return poisson_arrivals_until(spec.duration_s, spec.rps, rng)
        t = poisson_arrivals(spec.max_requests or len(rows), spec.rps, rng)
    else:
        t = np.asarray([r.offset_s for r in rows]) * spec.time_scale
    if spec.duration_s is not None:
        t = t[t <= spec.duration_s]
    return t[: spec.max_requests] if spec.max_requests is not None else t


def _prompt(spec: WorkloadSpec, index: int, length: int, vocab_size: int) -> Tuple[int, ...]:
    rng = np.random.default_rng([spec.seed, _STREAM_PROMPTS, spec.prompt_salt, index])
    return tuple(int(t) for t in rng.integers(MIN_TOKEN_ID, vocab_size, size=length))


def build_workload(
    spec: WorkloadSpec, adapters: Sequence[AdapterInfo], vocab_size: int
) -> List[WorkloadRequest]:
    """The workload for ``spec`` over ``adapters`` (see the module contract)."""
    if vocab_size <= MIN_TOKEN_ID:
        raise ValueError(f"vocab_size must be > {MIN_TOKEN_ID}")
    bounded = spec.rps is not None and spec.max_requests is not None
    rows = read_trace(Path(spec.trace), spec.start_row, spec.max_requests if bounded else None)
    arrivals = _arrivals(spec, rows)
    n = len(arrivals)
    picked = [rows[i % len(rows)] for i in range(n)]
    if all(r.adapter_id is not None for r in picked):
        chosen = map_adapter_ids([str(r.adapter_id) for r in picked], adapters)
    else:
        chosen = assign_adapters(
            n, adapters, spec.zipf_s, _rng(spec, _STREAM_ADAPTERS), spec.rank_zipf_s
        )
    ins = np.asarray(
        [scale_length(r.input_tokens, spec.length_divisor, 1, spec.max_input) for r in picked],
        dtype=float,
    )
    outs = np.asarray(
        [
            scale_length(r.output_tokens, spec.length_divisor, spec.min_output, spec.max_output)
            for r in picked
        ],
        dtype=float,
    )
    ranks = np.asarray([a.rank for a in chosen], dtype=float)
    wrs = wrs_scores(ins, outs, ranks) if n else np.zeros(0)
    classes = size_classes(wrs)
    return [
        WorkloadRequest(
            index=i,
            arrival_s=float(arrivals[i]),
            adapter=chosen[i].name,
            rank=chosen[i].rank,
            input_len=int(ins[i]),
            output_len=int(outs[i]),
            size_class=classes[i],
            wrs=float(wrs[i]),
            trace_row=spec.start_row + (i % len(rows)),
            trace_input=picked[i].input_tokens,
            trace_output=picked[i].output_tokens,
            input_ids=_prompt(spec, i, int(ins[i]), vocab_size),
        )
        for i in range(n)
    ]


def save_workload(path: Path, requests: Sequence[WorkloadRequest]) -> None:
    """One JSON object per line, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps(r.to_json()) + "\n")


def load_workload(path: Path) -> List[WorkloadRequest]:
    """The requests written by :func:`save_workload`."""
    with open(path) as f:
        return [WorkloadRequest.from_json(json.loads(line)) for line in f if line.strip()]


def save_spec(path: Path, spec: WorkloadSpec) -> None:
    """The spec a workload file was built from, as JSON (written beside it)."""
    path.write_text(json.dumps(dataclasses.asdict(spec), indent=1) + "\n")


def load_spec(path: Path) -> Optional[WorkloadSpec]:
    """The spec saved by :func:`save_spec`, or None if there is none."""
    if not path.is_file():
        return None
    fields = {f.name for f in dataclasses.fields(WorkloadSpec)}
    data = json.loads(path.read_text())
    return WorkloadSpec(**{k: v for k, v in data.items() if k in fields})


def describe(requests: Sequence[WorkloadRequest]) -> Dict[str, object]:
    """Counts, span, offered rate, mean lengths and rank / size-class mix of a workload."""
    if not requests:
        return {"requests": 0}
    span = max(r.arrival_s for r in requests) - min(r.arrival_s for r in requests)
    n = len(requests)
    return {
        "requests": n,
        "span_s": span,
        "offered_rps": (n - 1) / span if span > 0 else None,
        "mean_input_tokens": float(np.mean([r.input_len for r in requests])),
        "mean_output_tokens": float(np.mean([r.output_len for r in requests])),
        "distinct_adapters": len({r.adapter for r in requests}),
        "rank_mix": _counts(str(r.rank) for r in requests),
        "size_class_mix": _counts(r.size_class for r in requests),
    }


def _counts(items) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for k in items:
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (len(kv[0]), kv[0])))
