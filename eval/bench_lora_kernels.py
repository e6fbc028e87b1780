"""LoRA kernel sweep: a decode step's LoRA layers, ours (over the cache layout) vs SGLang's
``torch_native`` backend on the same inputs, on this CPU.

``python -m eval.bench_lora_kernels [--tokens 64] [--adapters 1,8,32,64] [--reps 20]``

A "step" is what one decode step does in the linear layers of the ``eval`` preset's model
(hidden 512, 8 heads / 4 KV heads of 64, intermediate 1376, 4 layers, fp32): per layer the base
``qkv_proj``, ``o_proj``, ``gate_up_proj`` and ``down_proj`` plus their LoRA, for ``--tokens``
requests (one token each) spread round-robin over N distinct adapters (interleaved, as a decode
batch is) with ranks cycling 8, 16, 32, 64, 128. Ours reads each adapter's rank-exact matrices
(views into one flat buffer, laid out and located as the cache does on CPU); ``torch_native``
reads SGLang's stacked, max-rank-padded slots. Prints one JSON line per point (median seconds
per step) and, at the end, the ratios the kernels issue sets: ours with 32 adapters over ours
with 1, and ours over ``torch_native`` with 32 adapters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from chameleon_kernels.lora_cached import expand, group_tokens, shrink
from chameleon_kernels.lora_cached_numba import storage_array
from chameleon_kernels.lora_locations import MatrixLocations
from eval.summary import machine_info

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

HIDDEN, Q_OUT, KV_OUT, INTER, LAYERS = 512, 512, 256, 1376, 4
RANK_CYCLE = (8, 16, 32, 64, 128)
MAX_RANK = 128
# module: (in, slice offsets, stack)
MODULES = {
    "qkv_proj": (HIDDEN, [0, Q_OUT, Q_OUT + KV_OUT, Q_OUT + 2 * KV_OUT], 3),
    "o_proj": (HIDDEN, [0, HIDDEN], 1),
    "gate_up_proj": (HIDDEN, [0, INTER, 2 * INTER], 2),
    "down_proj": (INTER, [0, HIDDEN], 1),
}


def _adapters(
    n: int, gen: torch.Generator, dtype: torch.dtype = torch.float32
) -> Tuple[List[Dict[int, Dict[str, Dict[str, torch.Tensor]]]], MatrixLocations]:
    """Per layer, per adapter id (1..n), per module: rank-exact A and B as views of one buffer,
    laid out as the adapter cache lays them out on CPU (A ``[stack * r, in]`` rows, B stored as
    an ``[r, out]`` block and viewed as ``[out, r]``), and the location table the server keeps."""
    shapes = []
    for i in range(n):
        r = RANK_CYCLE[i % len(RANK_CYCLE)]
        for _ in range(LAYERS):
            for module, (din, offs, stack) in MODULES.items():
                shapes += [(i, module, "A", (stack * r, din)), (i, module, "B", (r, offs[-1]))]
    flat = (torch.randn(sum(a * b for *_, (a, b) in shapes), generator=gen) * 0.02).to(dtype)
    storage = storage_array(flat)
    table = MatrixLocations(
        [(storage, storage)] * LAYERS, [(m, kind) for m in MODULES for kind in "AB"], capacity=n + 1
    )
    views: List[Dict] = [dict() for _ in range(LAYERS)]
    pos = 0
    counters: Dict[Tuple[int, str, str], int] = {}
    for i, module, kind, (a, b) in shapes:
        layer = counters.get((i, module, kind), 0)
        counters[(i, module, kind)] = layer + 1
        block = flat[pos : pos + a * b].view(a, b)
        views[layer].setdefault(i + 1, {}).setdefault(module, {})[kind] = (
            block if kind == "A" else block.t()
        )
        table.set(i + 1, (module, kind), layer, 0, pos, a)
        pos += a * b
    return views, table


def _base_weights(
    gen: torch.Generator, dtype: torch.dtype = torch.float32
) -> List[Dict[str, torch.Tensor]]:
    return [
        {
            m: (torch.randn(offs[-1], din, generator=gen) * 0.02).to(dtype)
            for m, (din, offs, _) in MODULES.items()
        }
        for _ in range(LAYERS)
    ]


def _time(fn: Callable[[], None], reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def ours_step(x: torch.Tensor, xd: torch.Tensor, base, views, table, groups) -> None:
    """As the server's backend calls the kernels (plans from the location table)."""
    for layer in range(LAYERS):
        for module, (_din, offs, stack) in MODULES.items():
            inp = xd if module == "down_proj" else x
            out = inp @ base[layer][module].t()
            a = shrink(
                inp,
                groups,
                lambda i: views[layer][i][module]["A"],
                stack,
                MAX_RANK,
                lambda batch: table.plan((module, "A"), layer, batch),
            )
            expand(
                a,
                groups,
                lambda i: views[layer][i][module]["B"],
                offs,
                out,
                lambda batch: table.plan((module, "B"), layer, batch),
            )


def base_step(x: torch.Tensor, xd: torch.Tensor, base) -> None:
    for layer in range(LAYERS):
        for module in MODULES:
            _ = (xd if module == "down_proj" else x) @ base[layer][module].t()


def _torch_native(
    n: int, tokens: int, views, scalings: Dict[int, float], dtype: torch.dtype = torch.float32
):
    """SGLang's torch_native backend with n+1 padded slots (slot 0 = base) holding the same
    adapters, and a batch of ``tokens`` decode requests mapped round-robin."""
    from sglang.srt.lora.backend.torch_backend import TorchNativeLoRABackend

    backend = TorchNativeLoRABackend(max_loras_per_batch=n + 1, device=torch.device("cpu"))
    buffers = []
    for layer in range(LAYERS):
        per = {}
        for module, (din, offs, stack) in MODULES.items():
            A = torch.zeros(n + 1, stack * MAX_RANK, din, dtype=dtype)
            B = torch.zeros(n + 1, offs[-1], MAX_RANK, dtype=dtype)
            for i in range(1, n + 1):
                a, b = views[layer][i][module]["A"], views[layer][i][module]["B"]
                A[i, : a.shape[0]] = a
                B[i, :, : b.shape[1]] = b
            per[module] = (A, B, torch.tensor(offs, dtype=torch.int32))
        buffers.append(per)
    mode = SimpleNamespace(
        is_idle=lambda: False,
        is_decode=lambda: True,
        is_target_verify=lambda: False,
        is_extend=lambda: False,
    )
    batch = SimpleNamespace(forward_mode=mode, batch_size=tokens)
    ranks = [0] + [RANK_CYCLE[(i - 1) % len(RANK_CYCLE)] for i in range(1, n + 1)]
    scale = [0.0] + [scalings[i] for i in range(1, n + 1)]
    backend.prepare_lora_batch(batch, [1 + t % n for t in range(tokens)], ranks, scale, False)
    return backend, buffers


def native_step(x, xd, base, backend, buffers) -> None:
    for layer in range(LAYERS):
        for module, (_din, offs, stack) in MODULES.items():
            inp = xd if module == "down_proj" else x
            out = inp @ base[layer][module].t()
            A, B, off = buffers[layer][module]
            if module == "qkv_proj":
                backend.run_qkv_lora(inp, A, B, None, off, offs[-1], base_output=out)
            elif module == "gate_up_proj":
                backend.run_gate_up_lora(inp, A, B, off, base_output=out)
            else:
                a = backend.run_lora_a_sgemm(inp, A, stack)
                backend.run_lora_b_sgemm(a, B, off, base_output=out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.bench_lora_kernels", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--adapters", default="1,8,32,64")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    machine = machine_info()
    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "cpu_model": machine["cpu_model"],
                "cpu_flags": machine["cpu_flags"],
                "threads": torch.get_num_threads(),
            }
        )
    )
    gen = torch.Generator().manual_seed(0)
    base = _base_weights(gen, dtype)
    x = torch.randn(args.tokens, HIDDEN, generator=gen).to(dtype)
    xd = torch.randn(args.tokens, INTER, generator=gen).to(dtype)
    base_s = _time(lambda: base_step(x, xd, base), args.reps)
    print(json.dumps({"point": "base-only", "tokens": args.tokens, "step_s": base_s}))
    results: Dict[int, Dict[str, float]] = {}
    for n in [int(v) for v in args.adapters.split(",")]:
        views, table = _adapters(n, gen, dtype)
        scalings = {i: 2.0 for i in range(1, n + 1)}
        groups = group_tokens([1 + t % n for t in range(args.tokens)], [1] * args.tokens, scalings)
        ours = _time(lambda: ours_step(x, xd, base, views, table, groups), args.reps)
        backend, buffers = _torch_native(n, args.tokens, views, scalings, dtype)
        native = _time(lambda: native_step(x, xd, base, backend, buffers), args.reps)
        results[n] = {"ours": ours, "torch_native": native}
        print(
            json.dumps(
                {
                    "point": f"adapters-{n}",
                    "dtype": args.dtype,
                    "tokens": args.tokens,
                    "adapters": n,
                    "ranks": [RANK_CYCLE[i % len(RANK_CYCLE)] for i in range(n)],
                    "layers": LAYERS,
                    "hidden": HIDDEN,
                    "ours_step_s": ours,
                    "torch_native_step_s": native,
                    "base_only_step_s": base_s,
                }
            )
        )
    if 1 in results and 32 in results:
        print(
            json.dumps(
                {
                    "ours_32_over_ours_1": results[32]["ours"] / results[1]["ours"],
                    "ours_over_torch_native_at_32": results[32]["ours"]
                    / results[32]["torch_native"],
                    "targets": {"ours_32_over_ours_1": 1.3, "ours_over_torch_native_at_32": 0.5},
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
