"""Scheduling overhead of the Chameleon scheduler: per prefill pass, and per queue refit.

``python -m eval.bench_scheduler [--waiting 1000 10000] [--passes 2000] [--refit-samples 10000]``

The pass benchmark drives :class:`chameleon_sglang.integration.scheduler_bridge.SchedulerBridge`
(the code SGLang's prefill loop calls under ``--chameleon``) with a stand-in for SGLang's scheduler:
a waiting queue of N requests of mixed sizes and ranks (held at N by new arrivals), an adder that
admits ``--admit-per-pass`` requests per pass, and requests that finish after ``--run-passes``
passes (so about their product are running). The time counted is the bridge's own: reconciliation,
Algorithm 1, and handing candidates to the loop — not the model or SGLang's budget checks. The refit
benchmark times one K-means fit (K = 1..4, elbow) plus quota planning on ``--refit-samples`` recent
requests. Prints one JSON line per point.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from types import SimpleNamespace
from typing import Any, List

from chameleon_sglang.clock import SchedulerClock
from chameleon_sglang.config import ChameleonConfig
from chameleon_sglang.integration.scheduler_bridge import SchedulerBridge

RANKS = (8, 16, 32, 64, 128)


class FakeReq:
    def __init__(self, rid: str, rng: random.Random, run_passes: int) -> None:
        self.rid = rid
        self.lora_id = None if rng.random() < 0.1 else f"a{rng.randrange(100)}"
        self.origin_input_ids = [0] * rng.choice((16, 64, 256, 1024))
        self.sampling_params = SimpleNamespace(max_new_tokens=rng.choice((8, 32, 128)))
        self.output_ids: List[int] = []
        self.passes_left = run_passes

    def finished(self) -> bool:
        return self.passes_left <= 0


class FakeAdder:
    def __init__(self) -> None:
        self.can_run_list: List[Any] = []
        self.new_chunked_req = None

    def budget_state(self) -> Any:
        return None


def fake_scheduler(total_tokens: int) -> Any:
    lora_manager = SimpleNamespace(
        configs={f"a{i}": SimpleNamespace(r=RANKS[i % len(RANKS)]) for i in range(100)}, loras={}
    )
    return SimpleNamespace(
        waiting_queue=[],
        chunked_req=None,
        model_config=SimpleNamespace(context_len=4096),
        server_args=SimpleNamespace(max_lora_rank=128),
        max_total_num_tokens=total_tokens,
        tp_worker=SimpleNamespace(model_runner=SimpleNamespace(lora_manager=lora_manager)),
        token_to_kv_pool_allocator=SimpleNamespace(available_size=lambda: total_tokens),
        tree_cache=SimpleNamespace(evictable_size=lambda: 0),
    )


def bench_pass(
    num_waiting: int, passes: int, admit_per_pass: int, run_passes: int, seed: int = 0
) -> dict:
    rng = random.Random(seed)
    config = ChameleonConfig(enabled=True, scheduler="static")
    scheduler = fake_scheduler(total_tokens=10_000_000)
    fake_now = [0.0]
    bridge = SchedulerBridge(scheduler, config, clock=SchedulerClock(None, lambda: fake_now[0]))
    counter = 0

    def arrive() -> None:
        nonlocal counter
        req = FakeReq(f"r{counter}", rng, run_passes)
        counter += 1
        scheduler.waiting_queue.append(req)
        bridge.on_enqueue(req, is_retracted=False)

    for _ in range(num_waiting):
        arrive()
    running: List[FakeReq] = []
    timings = []
    for _ in range(passes):
        fake_now[0] += 0.01
        adder = FakeAdder()
        batch = SimpleNamespace(reqs=running, batch_is_full=False)
        t0 = time.perf_counter()
        bridge.begin_pass()
        for req in bridge.candidates(adder, batch):
            if len(adder.can_run_list) >= admit_per_pass:
                break
            adder.can_run_list.append(req)
        timings.append(time.perf_counter() - t0)
        # SGLang's side, not timed: the admitted leave the queue, run, finish; others arrive.
        admitted = set(map(id, adder.can_run_list))
        scheduler.waiting_queue = [r for r in scheduler.waiting_queue if id(r) not in admitted]
        for req in running:
            req.passes_left -= 1
            req.output_ids.append(1)
        running = [r for r in running if not r.finished()] + adder.can_run_list
        while len(scheduler.waiting_queue) < num_waiting:
            arrive()
    timings.sort()
    return {
        "bench": "prefill_pass",
        "waiting": num_waiting,
        "passes": passes,
        "median_us": round(statistics.median(timings) * 1e6, 1),
        "p99_us": round(timings[int(0.99 * (len(timings) - 1))] * 1e6, 1),
        "admitted_per_pass": admit_per_pass,
        "running": admit_per_pass * run_passes,
    }


def bench_refit(samples: int, repeats: int, seed: int = 0) -> dict:
    from chameleon_sglang.scheduler import ChameleonPolicy, SizeLimits

    rng = random.Random(seed)
    config = ChameleonConfig(enabled=True, warmup_requests=min(200, samples))
    policy = ChameleonPolicy(config, SizeLimits(4096, 4096, 128, 8), total_tokens=65536)
    for i in range(samples):
        policy.on_arrival(
            f"r{i}",
            adapter_id="a",
            input_len=rng.choice((16, 64, 256, 1024, 3000)),
            max_new_tokens=rng.choice((8, 32, 128, 512)),
            now=i * 0.01,
            rank=rng.choice(RANKS),
        )
    timings = []
    for k in range(repeats):
        t0 = time.perf_counter()
        policy.refresh(now=samples * 0.01 + k)
        timings.append(time.perf_counter() - t0)
    return {
        "bench": "refit",
        "samples": samples,
        "repeats": repeats,
        "median_ms": round(statistics.median(timings) * 1e3, 2),
        "max_ms": round(max(timings) * 1e3, 2),
        "num_queues": policy.queue.num_queues,
    }


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiting", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--passes", type=int, default=2000)
    parser.add_argument("--admit-per-pass", type=int, default=4)
    parser.add_argument(
        "--run-passes", type=int, default=32, help="passes a request runs before it finishes"
    )
    parser.add_argument("--refit-samples", type=int, default=10000)
    parser.add_argument("--refit-repeats", type=int, default=20)
    args = parser.parse_args(argv)
    for n in args.waiting:
        point = bench_pass(n, args.passes, args.admit_per_pass, args.run_passes)
        print(json.dumps(point), flush=True)
    print(json.dumps(bench_refit(args.refit_samples, args.refit_repeats)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
