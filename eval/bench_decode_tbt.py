"""End-to-end decode TBT with 1, 8, 32 and 64 distinct adapters in the batch, on real servers.

``python -m eval.bench_decode_tbt [--dtype auto] [--batch 64] [--adapters 1,8,32,64]
[--new-tokens 48] [--rounds 5]``

One server per arm (``eval`` preset, 100 adapters of ranks cycling 8-128; ``--dtype auto`` is
bf16 where the CPU has AVX512-BF16 or AMX, else fp32, as SGLang's ``auto`` serves there):

- ``chameleon``: ``--chameleon`` (adapter cache + the ``chameleon`` LoRA backend);
- ``stock-65-slots``: stock SGLang with ``--max-loras-per-batch 65`` so that every adapter of the
  batch fits its fixed slots (SGLang's ``torch_native`` LoRA backend on CPU).

For each N, ``--batch`` concurrent streaming requests (32-token prompts, ``ignore_eos``) use N
adapters round-robin, so the decode batch holds N distinct adapters of mixed ranks; the point
reports the median and P90 gap between streamed tokens (first token excluded). The points are
measured ``--rounds`` times in turn (1, 8, 32, 64, 1, 8, ...), so slow drifts of a shared machine
hit every point alike. Prints one JSON line per point and round, then per arm the median over
rounds of each point's TBT P50 and the ratio TBT(32 adapters) / TBT(1 adapter) (target <= 1.3):
the median of the per-round ratios, with their range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import requests

from chameleon_sglang.dev.assets import build
from chameleon_sglang.dev.serve import ServerProcess, free_port, server_command
from eval.arms import auto_dtype
from eval.summary import machine_header

ARMS = {"chameleon": ["--chameleon"], "stock-65-slots": ["--max-loras-per-batch", "65"]}


def _stream_gaps(url: str, ids: List[int], adapter: Optional[str], new: int) -> List[float]:
    body = {
        "input_ids": ids,
        "stream": True,
        "lora_path": adapter,
        "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True},
    }
    stamps: List[float] = []
    with requests.post(url + "/generate", json=body, stream=True, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def _point(url: str, adapters: Sequence[str], batch: int, n: int, new: int) -> Dict:
    chosen = list(adapters[:n])
    jobs = [([(7 * i + j) % 1900 + 5 for j in range(32)], chosen[i % n]) for i in range(batch)]
    with ThreadPoolExecutor(batch) as pool:
        gaps = [
            g
            for gs in pool.map(lambda job: _stream_gaps(url, job[0], job[1], new), jobs)
            for g in gs
        ]
    return {
        "adapters": n,
        "batch": batch,
        "tbt_p50_s": statistics.median(gaps),
        "tbt_p90_s": float(np.percentile(gaps, 90)),
        "gaps": len(gaps),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.bench_decode_tbt", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--adapters", default="1,8,32,64")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--log-dir", type=Path, default=Path("eval/results/decode-tbt"))
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    dtype = auto_dtype() if args.dtype == "auto" else args.dtype
    header = machine_header(dtype)
    print(json.dumps(header), flush=True)
    assets = build("eval")
    names = [a.name for a in assets.adapters]
    counts = [int(v) for v in args.adapters.split(",")]
    args.log_dir.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Dict[int, List[Dict]]] = {}
    for arm in args.arms.split(","):
        port = free_port()
        cmd = server_command(
            assets, port, chameleon=False, dtype=dtype, max_total_tokens=65536, extra_args=ARMS[arm]
        )
        with ServerProcess(cmd, port, log_path=args.log_dir / f"{arm}-{dtype}.log") as srv:
            most = max(counts)  # warm up: every adapter a point uses is loaded once
            _point(srv.url, names, max(most, min(args.batch, 8)), most, 8)
            for round_ in range(args.rounds):
                for n in counts:
                    point = {
                        "arm": arm,
                        "round": round_,
                        **_point(srv.url, names, args.batch, n, args.new_tokens),
                    }
                    results.setdefault(arm, {}).setdefault(n, []).append(point)
                    print(json.dumps(point), flush=True)
    for arm, points in results.items():
        summary: Dict = {
            "arm": arm,
            "dtype": dtype,
            "cpu_flags": header["cpu_flags"],
            "tbt_p50_s": {
                n: statistics.median(p["tbt_p50_s"] for p in rounds) for n, rounds in points.items()
            },
        }
        if 1 in points and 32 in points:
            ratios = [b["tbt_p50_s"] / a["tbt_p50_s"] for a, b in zip(points[1], points[32])]
            summary.update(
                tbt_p50_32_over_1=statistics.median(ratios), per_round=ratios, target=1.3
            )
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
