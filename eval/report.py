"""``report.md``: a human-readable account of a comparison (results, setup, caveats).

Contract: :func:`write_report` renders the summary and the details written by ``eval.compare``
into Markdown at ``path``. It states how adapters were assigned, which Chameleon components the
server reported active, where queueing times came from and how percentiles are computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from eval.metrics import ARM_KEYS, QUEUE_SOURCE_SERVER
from eval.workload import SIZE_CLASSES


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: floats to `digits` decimals, None as a dash."""
    if v is None:
        return "–"
    if isinstance(v, (bool, int)):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return out


def results_table(arms: Mapping[str, Mapping[str, Any]]) -> List[str]:
    header = [
        "arm",
        "TTFT p50 (s)",
        "TTFT p99 (s)",
        "TBT p50 (s)",
        "TBT p99 (s)",
        "e2e p50 (s)",
        "e2e p99 (s)",
        "throughput (req/s)",
        "completed",
        "failed",
        "retractions",
        "cache hit rate",
    ]
    keys = list(ARM_KEYS)
    return md_table(header, [[arm] + [m.get(k) for k in keys] for arm, m in arms.items()])


def queueing_table(queueing: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> List[str]:
    header = ["arm"] + [f"{c}: share (n, mean queue s)" for c in SIZE_CLASSES]
    rows = []
    for arm, by_class in queueing.items():
        cells: List[Any] = [arm]
        for c in SIZE_CLASSES:
            d = by_class.get(c, {})
            share = d.get("share")
            cells.append(
                f"{100 * share:.1f}% ({d.get('n')}, {fmt(d.get('mean_queue_s'))})"
                if isinstance(share, float)
                else "–"
            )
        rows.append(cells)
    return md_table(header, rows)


def _caveats(details: Mapping[str, Any], synthetic_adapters: bool) -> List[str]:
    out = []
    if synthetic_adapters:
        out.append(
            "The trace has no adapter ids: adapters were assigned synthetically, as in the "
            "paper (rank uniform over {8,16,32,64,128}, Zipf popularity within a rank, "
            f"exponent {details['workload'].get('zipf_s')}, seed "
            f"{details['workload'].get('seed')})."
        )
    for arm, active in details.get("active_components", {}).items():
        if arm != "stock":
            out.append(
                f"`{arm}`: Chameleon components reported active by the server: "
                f"{', '.join(active) if active else 'none'} (from `/server_info` → "
                "`chameleon_status`)."
                + (
                    ""
                    if active
                    else " Its numbers therefore "
                    "measure SGLang's own scheduler and LoRA pool, like `stock`."
                )
            )
    source = details.get("queue_source")
    if source == QUEUE_SOURCE_SERVER:
        out.append(
            "Queueing time per request is SGLang's own `meta_info.queue_time` (reported "
            "because every arm runs with `--enable-metrics`)."
        )
    else:
        out.append(
            "Queueing time is estimated as TTFT minus the unloaded prefill time predicted "
            "from sequential warm-up probes (SGLang reports none by default)."
        )
    out.append(machine_load_line(details.get("runs", [])))
    out += [
        "Percentiles: numpy `linear` interpolation; per-arm values are medians over "
        f"{details.get('repeats')} repetition(s), arms interleaved (A B A B), one server at a "
        "time.",
        "TTFT, TBT and e2e are measured on the client (streaming `/generate`, loopback); TBT is "
        "the gap between streamed chunks.",
        "Model: a small random Llama (preset "
        f"`{details['workload'].get('preset')}`), not Llama-7B; "
        "prompts are random token ids with `ignore_eos`. Absolute numbers are CPU numbers.",
        f"Machine: {details['machine'].get('cpu_count')} CPU cores, shared with other work; "
        "the load generator runs on the same cores as the server.",
    ]
    return ["- " + c for c in out]


def machine_load_line(runs: Sequence[Mapping[str, Any]]) -> str:
    """One sentence: how much of the machine other processes used during each run."""
    parts = []
    for r in runs:
        ml = r.get("machine_load") or {}
        share = ml.get("foreign_cpu_share")
        before = (ml.get("before_server_start") or {}).get("foreign_cpu_share")
        parts.append(
            f"{r.get('arm')} #{r.get('repeat')}: "
            + (
                f"{100 * share:.0f}% (load average {fmt(ml.get('loadavg_1m_start'), 1)}"
                f" -> {fmt(ml.get('loadavg_1m_end'), 1)})"
                if share is not None
                else "not measured"
            )
            + (
                f", {100 * before:.0f}% just before its server started"
                if isinstance(before, float)
                else ""
            )
            + (
                f", client lag P99 {fmt(ml.get('client_lag_p99_s'), 3)} s, max "
                f"{fmt(ml.get('client_lag_max_s'), 3)} s"
                if ml.get("client_lag_max_s") is not None
                else ""
            )
        )
    return (
        "Other processes' share of all CPU time during each load phase (the machine is "
        "shared; large values mean contaminated timings), and the load generator's lag "
        "behind its schedule (tens of ms or more: the client waited for a CPU and its "
        "TTFTs then are inflated too): " + "; ".join(parts) + "."
    )


def memory_table(settings: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """One row per arm: its memory budget, KV tokens, LoRA slot bytes and their total."""
    rows = []
    for arm, s in settings.items():
        mem = s.get("memory") or {}
        mib = lambda b: None if b is None else b / 2**20  # noqa: E731
        rows.append(
            [
                arm,
                mem.get("budget"),
                s.get("max_total_num_tokens"),
                mib(mem.get("slot_bytes")),
                mib(mem.get("total_bytes")),
            ]
        )
    return md_table(
        ["arm", "memory budget", "KV tokens (server)", "LoRA slots (MiB)", "KV + slots (MiB)"], rows
    )


def tuning_table(tuning: Mapping[str, Any]) -> List[str]:
    """One row per stock candidate the tuning ran; the chosen one marked."""
    rows = []
    for c in tuning.get("candidates", []):
        rows.append(
            [
                ("**" if c.get("chosen") else "")
                + (" ".join(c["flags"]) or "(defaults)")
                + ("**" if c.get("chosen") else ""),
                c.get("ttft_p50"),
                c.get("ttft_p99"),
                c.get("tbt_p99"),
                c.get("throughput_rps"),
                c.get("failed"),
                c.get("error") or ("infeasible: " + c["infeasible"] if c.get("infeasible") else ""),
            ]
        )
    return md_table(
        [
            "stock flags",
            "TTFT p50 (s)",
            "TTFT p99 (s)",
            "TBT p99 (s)",
            "throughput (req/s)",
            "failed",
            "note",
        ],
        rows,
    )


def write_report(path: Path, summary: Mapping[str, Any], details: Mapping[str, Any]) -> Path:
    """Render ``report.md`` (see the module contract)."""
    wl, m = summary["workload"], summary["machine"]
    lines = ["# Chameleon vs stock SGLang — trace replay", ""]
    lines += [
        f"Run `{details.get('command_line')}` at {details.get('started')} "
        f"({fmt(details.get('wall_s'), 0)} s wall).",
        "",
    ]
    lines += ["## Results (medians over repetitions)", ""] + results_table(summary["arms"]) + [""]
    ref, cand = details.get("reference"), details.get("candidate")
    if ref and cand:
        r = summary["ratios"]
        lines += [
            f"Ratios `{cand}` / `{ref}`: TTFT p50 {fmt(r['ttft_p50'])}, TTFT p99 "
            f"{fmt(r['ttft_p99'])}, TBT p99 {fmt(r['tbt_p99'])}, throughput "
            f"{fmt(r['throughput'])} (below 1 is better for latency, above 1 for "
            "throughput).",
            "",
        ]
        t = r.get("vs_tuned")
        if t:
            lines += [
                f"Ratios `{cand}` / `stock-tuned`: TTFT p50 {fmt(t['ttft_p50'])}, TTFT "
                f"p99 {fmt(t['ttft_p99'])}, TBT p99 {fmt(t['tbt_p99'])}, throughput "
                f"{fmt(t['throughput'])}.",
                "",
            ]
    tuning = details.get("stock_tuning")
    if tuning:
        lines += ["## Tuning stock SGLang for this workload (`eval.tune_stock`)", ""]
        lines += tuning_table(tuning) + [""]
    lines += ["## Memory: KV cache and LoRA slot buffers per arm", ""]
    lines += memory_table(details.get("settings", {})) + [""]
    lines += ["## Queueing share of end-to-end time per size class", ""]
    lines += queueing_table(details.get("queueing", {})) + [""]
    lines += ["## Setup", ""] + _setup(wl, m, details) + [""]
    lines += ["## Caveats", ""] + _caveats(details, bool(wl.get("synthetic_adapters"))) + [""]
    lines += ["## Files", ""] + [f"- `{f}`" for f in details.get("files", [])] + [""]
    path.write_text("\n".join(lines))
    return path


def _setup(wl: Mapping[str, Any], m: Mapping[str, Any], details: Mapping[str, Any]) -> List[str]:
    arrivals = (
        f"Poisson at {wl.get('rps')} req/s (seeded)"
        if wl.get("rps")
        else f"trace timestamps x {wl.get('time_scale')}"
    )
    out = [
        f"- Trace: `{wl.get('trace')}` from row {wl.get('start_row')}; {wl.get('requests')} "
        f"requests over {fmt(wl.get('span_s'), 1)} s ({arrivals}; offered "
        f"{fmt(wl.get('offered_rps'), 2)} req/s).",
        f"- Lengths: input = trace / {wl.get('length_divisor')} capped at {wl.get('max_input')}, "
        f"output = trace / {wl.get('length_divisor')} capped at {wl.get('max_output')} "
        f"(min {wl.get('min_output')}); mean {fmt(wl.get('mean_input_tokens'), 1)} in / "
        f"{fmt(wl.get('mean_output_tokens'), 1)} out tokens.",
        f"- Adapters: {wl.get('num_adapters')} served, {wl.get('distinct_adapters')} used; rank "
        f"mix {wl.get('rank_mix')}; size classes {wl.get('size_class_mix')}.",
        f"- Workload file: `{wl.get('workload_file')}` (replay with `--replay`).",
        f"- Server dtype: {wl.get('dtype')} (`--dtype auto` picks bfloat16 only on CPUs with "
        "AVX512-BF16 or AMX; elsewhere bf16 GEMMs are emulated and slower than fp32).",
        f"- Server (all arms): `{' '.join(details.get('shared_command', []))}`",
        "- Arm flags: "
        + "; ".join(
            f"`{a}`: `{' '.join(f) or '(none)'}`" for a, f in details.get("arm_flags", {}).items()
        ),
        f"- Effective server settings: {details.get('settings')}",
        f"- Machine: {m.get('cpu_count')} x {m.get('cpu_model')}, {m.get('memory_gib')} GiB; "
        f"torch {m.get('torch')}, sglang {m.get('sglang')}, commit {m.get('git_commit')}.",
    ]
    profiles: Optional[Mapping[str, Any]] = details.get("profiles")
    if profiles:
        out.append(
            "- Unloaded (sequential warm-up probes), per arm: "
            + "; ".join(
                f"{a}: TTFT {fmt(p.get('ttft_mean_s'))} s, TBT {fmt(p.get('tbt_mean_s'))} s"
                for a, p in profiles.items()
            )
        )
    return out
