"""Tensor parallelism on the CPU: ``--tp-size 2`` with ``--chameleon`` serves what TP=1 serves.

SGLang's CPU engine runs TP ranks as processes with gloo collectives; on a machine with fewer
NUMA nodes than ranks it needs ``SGLANG_CPU_OMP_THREADS_BIND`` (one core per rank here). Each
rank runs its own Chameleon scheduler and adapter cache; they stay in step because every policy
decision reads the clock rank 0 broadcasts once per pass. Ranks that decided differently would
run different batches and their collectives would mismatch (an error or a hang), so identical
greedy outputs under concurrent mixed traffic, with a clean integrity check, are the observable.
An adapter loaded at run time is read on a worker of each rank and installed in the pass every
rank has it (one all-reduce of flags): it serves TP=1's outputs too.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import pytest
from client import generate, healthy, integrity_problems
from conftest import start_servers, stop_server

from chameleon_sglang.dev.assets import Assets, build

pytestmark = pytest.mark.slow

NUM_REQUESTS = 32
NEW_TOKENS = 10


def _workload(assets: Assets) -> List[Tuple[List[int], Optional[str]]]:
    rng = random.Random(3)
    names: List[Optional[str]] = [a.name for a in assets.adapters] + [None]
    return [
        ([rng.randrange(5, 2000) for _ in range(rng.randrange(4, 80))], rng.choice(names))
        for _ in range(NUM_REQUESTS)
    ]


def _outputs(srv, assets: Assets, tp: int) -> List[List[int]]:
    with ThreadPoolExecutor(8) as pool:
        outs = list(
            pool.map(
                lambda w: generate(srv.url, w[0], w[1], NEW_TOKENS)["output_ids"], _workload(assets)
            )
        )
    assert healthy(srv.url)
    assert integrity_problems(srv.url) == []
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    if tp > 1:
        assert "TP1" in log  # the second rank really ran
    return outs


def _load_at_runtime(srv, assets: Assets) -> List[List[int]]:
    """An adapter loaded while the server runs (read on a worker of every rank, installed when
    all ranks have it), then served: its outputs, with the same adapter's under its own name."""
    import requests

    source = assets.adapters[1]
    body = {"lora_name": "runtime-copy", "lora_path": source.path}
    resp = requests.post(srv.url + "/load_lora_adapter", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    assert "Reading LoRA adapter runtime-copy" in srv.log_path.read_text(errors="replace")
    prompt = [11, 12, 13, 14, 15]
    return [
        generate(srv.url, prompt, name, NEW_TOKENS)["output_ids"]
        for name in ("runtime-copy", source.name)
    ]


def test_tp2_serves_the_greedy_outputs_of_tp1(tmp_path):
    assets = build("tiny-tp")  # sizes TP=2 divides: SGLang's CPU engine pads nothing
    specs = [
        dict(assets=assets, log_dir=tmp_path, name=f"tp{tp}", chameleon=True,
             extra_args=["--tp-size", str(tp)])
        for tp in (1, 2)
    ]  # fmt: skip
    # started side by side, used one at a time; TP=2 ranks get a core each; adapter reads take
    # 0.3 s longer (several scheduler passes see the read pending)
    slow = {"CHAMELEON_ADAPTER_READ_DELAY_S": "0.3"}
    servers = start_servers(specs, env=[slow, {**slow, "SGLANG_CPU_OMP_THREADS_BIND": "0|1"}])
    try:
        tp1 = _outputs(servers[0], assets, 1)
        tp2 = _outputs(servers[1], assets, 2)
        loaded_tp1 = _load_at_runtime(servers[0], assets)
        loaded_tp2 = _load_at_runtime(servers[1], assets)
    finally:
        for srv in servers:
            stop_server(srv)
    assert loaded_tp1[0] == loaded_tp1[1] and loaded_tp2 == loaded_tp1
    assert all(len(o) == NEW_TOKENS for o in tp2)
    mismatches = [i for i, (a, b) in enumerate(zip(tp1, tp2)) if a != b]
    assert not mismatches, mismatches
