"""Unloaded latency with one adapter: TTFT and TBT of lone requests, stock SGLang vs --chameleon.

``python -m eval.bench_unloaded [--dtype auto] [--rounds 8] [--prompt-lens 32,128,512]
[--new-tokens 32] [--adapter a004r128]``

Both servers (``eval`` preset, 100 adapters, the eval's shared flags) are started once and stay
up side by side, idle (``--sleep-on-idle``) while the other is measured; each round sends one
streaming request per prompt length to each arm in turn, one request at a time, so the arms
see the same machine within seconds of each other. A request's TTFT is send -> first token, its
TBT the median gap between later tokens. Prints one JSON line per request, then the medians per
arm and prompt length and the ratios chameleon / stock (target: <= 1.05 for TTFT and TBT), with
the dtype and CPU flags they were measured with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import requests

from chameleon_sglang.dev.assets import build
from chameleon_sglang.dev.serve import ServerProcess, free_port, server_command
from eval.arms import auto_dtype
from eval.summary import machine_header

ARMS = {"stock": [], "chameleon": ["--chameleon"]}
SHARED_FLAGS = ["--max-loras-per-batch", "8"]
TARGET_RATIO = 1.05


def stream(url: str, ids: List[int], adapter: Optional[str], new: int) -> Tuple[float, float]:
    """``(ttft_s, median gap between later tokens in s)`` of one streaming /generate request."""
    body = {
        "input_ids": ids,
        "stream": True,
        "lora_path": adapter,
        "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True},
    }
    sent = time.perf_counter()
    stamps: List[float] = []
    with requests.post(url + "/generate", json=body, stream=True, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                stamps.append(time.perf_counter())
    if len(stamps) < 3:
        raise RuntimeError(f"stream gave {len(stamps)} chunks, expected {new}")
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return stamps[0] - sent, statistics.median(gaps)


def prompt(length: int, salt: int) -> List[int]:
    """Token ids of ``length`` that no earlier request shares a prefix with (no cache hits)."""
    return [(salt * 7919 + 13 * j) % 1900 + 5 for j in range(length)]


def summarize(records: Sequence[Dict]) -> Dict:
    """Medians per arm and prompt length, and chameleon / stock ratios."""
    medians: Dict[str, Dict[int, Dict[str, float]]] = {}
    for arm in sorted({r["arm"] for r in records}):
        for length in sorted({r["prompt_len"] for r in records}):
            mine = [r for r in records if r["arm"] == arm and r["prompt_len"] == length]
            medians.setdefault(arm, {})[length] = {
                "ttft_s": statistics.median(r["ttft_s"] for r in mine),
                "tbt_s": statistics.median(r["tbt_s"] for r in mine),
            }
    ratios: Dict[int, Dict[str, float]] = {}
    if "stock" in medians and "chameleon" in medians:
        for length, stock in medians["stock"].items():
            ours = medians["chameleon"][length]
            ratios[length] = {key: ours[key] / stock[key] for key in ("ttft_s", "tbt_s")}
    return {"medians": medians, "chameleon_over_stock": ratios, "target": TARGET_RATIO}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.bench_unloaded", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--prompt-lens", default="32,128,512")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--adapter", default=None, help="adapter name (default: a rank-128 one)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--log-dir", type=Path, default=Path("eval/results/unloaded"))
    args = p.parse_args(argv)
    dtype = auto_dtype() if args.dtype == "auto" else args.dtype
    header = machine_header(dtype)
    print(json.dumps(header), flush=True)
    assets = build("eval")
    adapter = args.adapter or next(a.name for a in assets.adapters if a.rank == assets.max_rank)
    lengths = [int(v) for v in args.prompt_lens.split(",")]
    arms = args.arms.split(",")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    records: List[Dict] = []
    with ExitStack() as stack:
        urls = {}
        for arm in arms:
            port = free_port()
            cmd = server_command(
                assets,
                port,
                chameleon=False,
                dtype=dtype,
                max_total_tokens=65536,
                extra_args=SHARED_FLAGS + ARMS[arm],
            )
            server = stack.enter_context(
                ServerProcess(cmd, port, log_path=args.log_dir / f"{arm}-{dtype}.log")
            )
            urls[arm] = server.url
        for arm in arms:  # warm up: first use of the adapter, compiled kernels, allocator
            for length in lengths:
                stream(urls[arm], prompt(length, 10_000 + length), adapter, 8)
        salt = 0
        for round_ in range(args.rounds):
            for length in lengths:
                salt += 1
                for arm in arms:
                    ttft, tbt = stream(urls[arm], prompt(length, salt), adapter, args.new_tokens)
                    record = {
                        "arm": arm,
                        "round": round_,
                        "prompt_len": length,
                        "ttft_s": ttft,
                        "tbt_s": tbt,
                    }
                    records.append(record)
                    print(json.dumps(record), flush=True)
    print(
        json.dumps(
            {
                "dtype": dtype,
                "cpu_flags": header["cpu_flags"],
                "adapter": adapter,
                **summarize(records),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
