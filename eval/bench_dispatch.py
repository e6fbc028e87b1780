"""Cost of one adapter-affinity dispatch decision (chameleon_sglang.dp.affinity).

``python -m eval.bench_dispatch [--replicas 64] [--adapters 500] [--requests 200000]``

64 replicas each reporting 20 resident adapters of 500 (Zipf-popular requests), loads random;
prints the mean and P99 time of ``AffinityDispatcher.dispatch`` (target: ≤ 50 µs at 64
replicas) and how many decisions followed residency.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Optional, Sequence

import numpy as np

from chameleon_sglang.dp import AffinityDispatcher, ReplicaReport


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench_dispatch")
    p.add_argument("--replicas", type=int, default=64)
    p.add_argument("--adapters", type=int, default=500)
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--report-every", type=int, default=1000)
    args = p.parse_args(argv)
    rng = random.Random(0)
    d = AffinityDispatcher(range(args.replicas))
    names = [f"a{i}" for i in range(args.adapters)]
    weights = [1 / (i + 1) for i in range(args.adapters)]
    stream = rng.choices(names, weights, k=args.requests)
    times = np.empty(args.requests)
    clock = time.perf_counter_ns
    for i, name in enumerate(stream):
        if i % args.report_every == 0:
            for r in range(args.replicas):
                d.report(ReplicaReport(r, frozenset(rng.sample(names, 20)), rng.randint(0, 20_000)))
        t = clock()
        d.dispatch(name, 300)
        times[i] = clock() - t
    us = times / 1000
    print(
        f"{args.replicas} replicas, {args.adapters} adapters, {args.requests} requests: "
        f"dispatch mean {us.mean():.1f} us, p50 {np.percentile(us, 50):.1f} us, "
        f"p99 {np.percentile(us, 99):.1f} us; {d.num_affinity} by residency, "
        f"{d.num_missed} to a replica without the adapter"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
