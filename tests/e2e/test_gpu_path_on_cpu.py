"""The GPU LoRA path through a whole forward, on a CPU: a real ``--chameleon`` server whose
adapters are kept as on a GPU (B matrices untransposed, a device location table) and whose LoRA
layers run the Triton table kernels, interpreted (``TRITON_INTERPRET=1`` and
``CHAMELEON_TABLE_PATH_ON_CPU=1``). A mixed batch -- the base model and adapters of ranks 8 to
128 at once -- must give the greedy tokens of the CPU path's server and of stock SGLang, token
for token (fp32; both are held to HF transformers + peft by ``test_serving.py``). What only a
GPU shows (bf16 kernels compiled, CUDA graphs replayed, speed) is ``make gpu-check``'s.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import pytest
from client import generate
from conftest import start_servers, stop_server
from reference import prompt_ids

from chameleon_sglang.dev.assets import Assets
from chameleon_sglang.integration.lora_pool import TABLE_PATH_ON_CPU_ENV

pytestmark = pytest.mark.slow

ADAPTERS: Tuple[Optional[str], ...] = (None, "a000r8", "a001r16", "a002r32", "a003r64", "a004r128")
TABLE_LOG = "device location table for"
NUM_NEW_TOKENS = 8  # every decode step runs every LoRA kernel interpreted: seconds each


@pytest.fixture(scope="module")
def table_path_server(tiny_assets: Assets, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("table-path")
    env = {"TRITON_INTERPRET": "1", TABLE_PATH_ON_CPU_ENV: "1"}
    (server,) = start_servers(
        [dict(assets=tiny_assets, log_dir=log_dir, name="table-path", chameleon=True)], [env]
    )
    try:
        yield server
    finally:
        stop_server(server)


def _mixed_batch(url: str, prompts: List[List[int]]) -> Dict[Tuple[Optional[str], int], List[int]]:
    """Every adapter (and the base model) on each prompt, all sent at once."""
    jobs = [(a, i) for i in range(len(prompts)) for a in ADAPTERS]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {
            job: pool.submit(generate, url, prompts[job[1]], job[0], NUM_NEW_TOKENS) for job in jobs
        }
        return {job: f.result()["output_ids"] for job, f in futures.items()}


def test_the_table_path_serves_the_greedy_tokens_of_stock_and_the_cpu_path(
    table_path_server, server_pair, tiny_assets
):
    prompts = prompt_ids(tiny_assets)[:2]
    log = table_path_server.log_path.read_text()
    assert TABLE_LOG in log, "the server did not keep a device location table"
    table = _mixed_batch(table_path_server.url, prompts)
    stock = _mixed_batch(server_pair["stock"].url, prompts)
    cpu_path = _mixed_batch(server_pair["chameleon"].url, prompts)
    assert len({tuple(stock[(a, 0)]) for a in ADAPTERS}) == len(ADAPTERS)  # adapters matter
    for job, tokens in table.items():
        assert tokens == cpu_path[job] == stock[job], f"adapter, prompt = {job}"
