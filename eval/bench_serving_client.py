"""SGLang's own benchmark client (``python -m sglang.bench_serving``) driving each arm.

Contract: :func:`bench_command` is the client's command line against one arm's running server;
:func:`run_bench` runs it to completion (a subprocess; the server already warmed up by
``eval.warmup``) and returns the result record it appends to ``--output-file``;
:func:`run_arms` starts each arm's server in turn (the comparison's memory budget and flags, never
two at once), runs the client ``repeats`` times interleaved and writes ``OUT/bench_serving.json``
and ``OUT/bench_serving.md`` (per-arm medians over repeats, the candidate's ratios over the
reference). Requests: the ``random-ids`` dataset (token ids, nothing downloaded), every served
adapter in ``--lora-name`` picked per request by ``--lora-request-distribution``, Poisson arrivals
at the spec's rate. bench_serving cannot take each request's adapter from a trace (its ``custom``
dataset carries prompts only), so the workload is its own, not the trace replay of
``eval.compare``'s own client.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from chameleon_sglang.dev.serve import server_env
from eval.report import fmt, md_table
from eval.runner import RunConfig, arm_server, warm
from eval.summary import pick_pair

METRICS = {  # bench_serving's key -> ours (seconds; throughput in req/s)
    "median_ttft_ms": "ttft_p50",
    "p99_ttft_ms": "ttft_p99",
    "median_tpot_ms": "tpot_p50",
    "p99_tpot_ms": "tpot_p99",
    "p99_itl_ms": "itl_p99",
    "median_e2e_latency_ms": "e2e_p50",
    "p99_e2e_latency_ms": "e2e_p99",
    "request_throughput": "throughput_rps",
    "completed": "completed",
}
RATIO_KEYS = ("ttft_p50", "ttft_p99", "tpot_p99", "itl_p99", "e2e_p99", "throughput_rps")
DISTRIBUTIONS = ("uniform", "distinct", "skewed")


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """What bench_serving sends: ``num_prompts`` random-ids requests at ``rps``."""

    num_prompts: int
    rps: float
    input_len: int = 256
    output_len: int = 48
    range_ratio: float = 0.5
    distribution: str = "uniform"
    zipf_alpha: float = 1.5
    seed: int = 0


def bench_command(
    url: str, tokenizer: Path, adapters: Sequence[str], spec: BenchSpec, output_file: Path
) -> List[str]:
    """``python -m sglang.bench_serving`` against the server at ``url`` (native ``/generate``,
    ``lora_path`` per request)."""
    cmd = [
        sys.executable,
        "-m",
        "sglang.bench_serving",
        "--backend",
        "sglang",
        "--base-url",
        url,
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random-ids",
        "--random-input-len",
        str(spec.input_len),
        "--random-output-len",
        str(spec.output_len),
        "--random-range-ratio",
        str(spec.range_ratio),
        "--num-prompts",
        str(spec.num_prompts),
        "--request-rate",
        str(spec.rps),
        "--seed",
        str(spec.seed),
        "--output-file",
        str(output_file),
        "--disable-tqdm",
    ]
    if adapters:
        cmd += ["--lora-name", *adapters, "--lora-request-distribution", spec.distribution]
        if spec.distribution == "skewed":
            cmd += ["--lora-zipf-alpha", str(spec.zipf_alpha)]
    return cmd


def run_bench(cmd: Sequence[str], output_file: Path, log_file: Path) -> Dict[str, Any]:
    """Run the client (offline: it would otherwise look the served model name up on the model
    hub); its result record (the last line of ``output_file``). Raises with the client's last
    output when it fails or writes nothing."""
    with open(log_file, "w") as log:
        proc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, timeout=3600, env=server_env()
        )
    lines = output_file.read_text().splitlines() if output_file.exists() else []
    if proc.returncode != 0 or not lines:
        tail = log_file.read_text()[-2000:]
        raise RuntimeError(f"sglang.bench_serving exited {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def bench_metrics(record: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """Our keys from a bench_serving record: latencies in seconds."""
    out: Dict[str, Optional[float]] = {}
    for theirs, ours in METRICS.items():
        value = record.get(theirs)
        if value is not None and theirs.endswith("_ms"):
            value = value / 1000.0
        out[ours] = value
    return out


def run_arms(
    arms: Sequence[str],
    repeats: int,
    cfg: RunConfig,
    spec: BenchSpec,
    out: Path,
    log: Callable[[str], None] = print,
    meta: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Every arm ``repeats`` times, interleaved (module contract); the record written, with
    ``meta`` (budget, cost profile, command line) under ``"meta"``."""
    names = [a.name for a in cfg.adapters]
    runs: Dict[str, List[Dict[str, Any]]] = {arm: [] for arm in arms}
    for k in range(repeats):
        for arm in arms:
            run_dir = out / "bench_serving" / f"{arm}-r{k}"
            run_dir.mkdir(parents=True, exist_ok=True)
            with arm_server(arm, cfg, run_dir) as server:
                warm(server, cfg, spec.input_len)
                result = run_dir / "result.jsonl"
                cmd = bench_command(server.url, cfg.assets.model_path, names, spec, result)
                record = run_bench(cmd, result, run_dir / "client.log")
            metrics = bench_metrics(record)
            runs[arm].append(
                {"metrics": metrics, "memory": server.memory, "command": server.command}
            )
            log(f"[{arm} #{k}] bench_serving: {_line(metrics)}")
    summary = summarize(runs, spec) | {"meta": meta or {}}
    (out / "bench_serving.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "bench_serving.md").write_text("\n".join(report_lines(summary)) + "\n")
    return summary


def summarize(runs: Dict[str, List[Dict[str, Any]]], spec: BenchSpec) -> Dict[str, Any]:
    """Per-arm medians over repeats and the candidate's ratios over the reference (and over
    ``stock-tuned`` when it ran)."""
    arms = {
        arm: {key: _median([r["metrics"][key] for r in rs]) for key in METRICS.values()}
        for arm, rs in runs.items()
    }
    ref, cand = pick_pair(list(arms))
    ratios = {"reference": ref, "candidate": cand, "vs_reference": _ratios(arms, ref, cand)}
    if "stock-tuned" in arms and cand:
        ratios["vs_stock_tuned"] = _ratios(arms, "stock-tuned", cand)
    return {
        "client": "sglang.bench_serving",
        "spec": dataclasses.asdict(spec),
        "arms": arms,
        "ratios": ratios,
        "runs": runs,
    }


def report_lines(summary: Dict[str, Any]) -> List[str]:
    """``bench_serving.md``: the per-arm table and the ratios."""
    keys = list(METRICS.values())
    spec = summary["spec"]
    lines = [
        "# SGLang's own benchmark client against each arm",
        "",
        f"`python -m sglang.bench_serving --dataset-name random-ids`: {spec['num_prompts']} "
        f"requests at {spec['rps']} req/s, input {spec['input_len']} / output "
        f"{spec['output_len']} tokens (range ratio {spec['range_ratio']}), adapters "
        f"{spec['distribution']}. Latencies in seconds (medians over repeats).",
        "",
    ]
    lines += md_table(
        ["arm", *keys], [[a, *(m[k] for k in keys)] for a, m in summary["arms"].items()]
    )
    ratios = summary["ratios"]
    for name, values in ratios.items():
        if name.startswith("vs_") and values:
            other = ratios["reference"] if name == "vs_reference" else "stock-tuned"
            lines += ["", f"Ratios `{ratios['candidate']}` / `{other}`: " + _line(values)]
    return lines


def _ratios(arms: Dict[str, Dict[str, Any]], ref: Optional[str], cand: Optional[str]):
    if not ref or not cand or ref == cand:
        return {}
    out = {}
    for key in RATIO_KEYS:
        a, b = arms[cand].get(key), arms[ref].get(key)
        out[key] = a / b if a is not None and b else None
    return out


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _line(values: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {fmt(v)}" for k, v in values.items())
