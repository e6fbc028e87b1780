"""Device check of the GPU LoRA path: correctness, speed and CUDA-graph replay, torch + triton only.

``python kernels/gpu_check.py --out gpu-check.json`` (``make gpu-check``) on one NVIDIA GPU, at
Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 layers, q/k/v/o/gate/up/down, ranks
8-128), bf16 by default. SGLang is not needed (part 4 uses it where present): adapters are
packed into per-layer K and V buffers as the adapter cache packs them (A in one, B in the other,
so offsets cross buffers) and found through a
:class:`~chameleon_kernels.lora_table.DeviceLocationTable`. Four parts, one JSON file:

1. **correctness**: the table kernels (:mod:`chameleon_kernels.lora_table_triton`) against a
   float32 reference per adapter segment, decode and prefill batches mixing every rank, on
   sampled layers; relative error per (module, layer);
2. **timing**: the LoRA part of a whole decode step (every module of every layer) and of a
   prefill, our kernels eager and CUDA-graph replayed, against two dense padded-adapter torch
   references (every adapter padded to the largest rank): per-token gathered ``bmm`` (graph
   safe, what a naive bgmv does) and a loop over adapter segments (SGLang's torch backend);
3. **graph**: one decode step captured once, replayed with changing adapter mixes and batch
   sizes while adapters are evicted (memory poisoned with NaN, table cleared) and others loaded
   into that memory with other ranks; each replay checked against the reference;
4. **sglang**: where SGLang is importable, its own csgmv kernels (its default GPU LoRA backend,
   :mod:`chameleon_kernels.gpu_check_sglang`) over its padded slot buffers: agreement with ours
   on part 1's batches, and part 2's decode steps and prefill timed, ours vs csgmv, eager and
   graph-replayed; where it is not (a machine with torch + triton only), the report says so.

``--cpu`` runs the same code at tiny shapes under the Triton interpreter, the "graph" part under
:class:`~chameleon_kernels.graph_guard.GraphDisciplineGuard` instead of a CUDA graph (what the
test suite runs). Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


def _import_package() -> None:
    """Run from a bare checkout: make ``kernels/`` importable as ``chameleon_kernels``."""
    if "chameleon_kernels" in sys.modules:
        return
    import importlib.util

    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location(
        "chameleon_kernels", here / "__init__.py", submodule_search_locations=[str(here)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chameleon_kernels"] = module
    spec.loader.exec_module(module)


@dataclasses.dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    q: int
    kv: int
    layers: int
    ranks: Tuple[int, ...]
    num_adapters: int
    decode_bs: Tuple[int, ...]
    prefill: Tuple[int, int]  # requests, tokens each
    check_layers: Tuple[int, ...]

    def modules(self) -> Dict[str, Tuple[int, List[int]]]:
        """module -> (input features, output slice bounds)."""
        q, kv, h, i = self.q, self.kv, self.hidden, self.intermediate
        return {
            "qkv_proj": (h, [0, q, q + kv, q + 2 * kv]),
            "o_proj": (q, [0, h]),
            "gate_up_proj": (h, [0, i, 2 * i]),
            "down_proj": (i, [0, h]),
        }


LLAMA3_8B = Shapes(
    4096, 14336, 4096, 1024, 32, (8, 16, 32, 64, 128), 32, (1, 16, 64), (8, 256), (0, 13, 31)
)
TINY = Shapes(32, 64, 32, 16, 2, (8, 16, 32), 6, (1, 4, 8), (2, 8), (0, 1))
TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}  # relative Frobenius error
PARTS = ("correctness", "graph", "timing", "sglang")


class Storage:
    """Per layer a K and a V buffer holding adapters rank-exact (A ``[stack*r, in]`` in K,
    B ``[out, r]`` in V), a location table, and host-side truth for the references."""

    def __init__(self, shapes: Shapes, dtype, device, capacity: int) -> None:
        import torch

        from chameleon_kernels.lora_table import DeviceLocationTable, alignment_for

        self.shapes, self.dtype, self.device = shapes, dtype, device
        self.modules = shapes.modules()
        per_rank = {
            part: sum(((len(b) - 1) * f if part == 0 else b[-1]) for f, b in self.modules.values())
            for part in (0, 1)
        }
        self.align = alignment_for(dtype, 64)
        slot = {
            part: max(shapes.ranks) * per_rank[part] + 64 * len(self.modules) for part in (0, 1)
        }
        self.slot = slot
        self.k = [
            torch.full((slot[0] * capacity,), float("nan"), dtype=dtype, device=device)
            for _ in range(shapes.layers)
        ]
        self.v = [
            torch.full((slot[1] * capacity,), float("nan"), dtype=dtype, device=device)
            for _ in range(shapes.layers)
        ]
        kinds = [(m, k) for m in sorted(self.modules) for k in ("A", "B")]
        self.table = DeviceLocationTable(kinds, shapes.layers, capacity + 1, device, self.align)
        self.weights: Dict[int, Dict[Tuple[str, int], Tuple[Any, Any]]] = {}
        self.ranks: Dict[int, int] = {}
        self.scalings: Dict[int, float] = {}

    def load(self, adapter: int, rank: int, scaling: float, seed: int) -> None:
        """Adapter ``adapter`` (1-based) into its slot of every layer, recorded in the table."""
        import torch

        gen = torch.Generator(device=self.device).manual_seed(seed)
        entries, weights = {}, {}
        for layer in range(self.shapes.layers):
            k, v = self.k[layer], self.v[layer]
            v_minus_k = (v.data_ptr() - k.data_ptr()) // k.element_size()
            cursor = [(adapter - 1) * self.slot[0], (adapter - 1) * self.slot[1]]
            for module in sorted(self.modules):
                fan_in, bounds = self.modules[module]
                stack = len(bounds) - 1
                a = (
                    torch.randn(
                        stack * rank, fan_in, generator=gen, device=self.device, dtype=torch.float32
                    )
                    .div_(fan_in**0.5)
                    .to(self.dtype)
                )
                b = (
                    torch.randn(
                        bounds[-1], rank, generator=gen, device=self.device, dtype=torch.float32
                    )
                    .div_(rank**0.5)
                    .to(self.dtype)
                )
                a_view = k[cursor[0] : cursor[0] + a.numel()].view(a.shape)
                b_view = v[cursor[1] : cursor[1] + b.numel()].view(b.shape)
                a_view.copy_(a)
                b_view.copy_(b)
                entries[((module, "A"), layer)] = (cursor[0], rank)
                entries[((module, "B"), layer)] = (v_minus_k + cursor[1], rank)
                weights[(module, layer)] = (a_view, b_view)
                cursor[0] += -(-a.numel() // 64) * 64
                cursor[1] += -(-b.numel() // 64) * 64
        self.table.set_adapter(adapter, entries, scaling)
        self.weights[adapter], self.ranks[adapter] = weights, rank
        self.scalings[adapter] = scaling

    def evict(self, adapter: int) -> None:
        self.table.clear(adapter)
        for a_view, b_view in self.weights.pop(adapter).values():
            a_view.fill_(float("nan"))
            b_view.fill_(float("nan"))
        self.ranks.pop(adapter)
        self.scalings.pop(adapter)


def lora_step(
    storage: Storage, plan, xs: Dict[str, Any], outs: Dict[str, Any], layers: Sequence[int]
) -> None:
    """Our kernels over every module of ``layers``: ``outs[module]`` (per layer) += LoRA(x)."""
    from chameleon_kernels import lora_table_triton as ltt

    max_rank = max(storage.shapes.ranks)
    for layer in layers:
        base = storage.k[layer]
        for module, (_, bounds) in storage.modules.items():
            a = ltt.table_shrink(
                xs[module],
                plan,
                storage.table,
                (module, "A"),
                layer,
                base,
                len(bounds) - 1,
                max_rank,
            )
            ltt.table_expand(
                a,
                plan,
                storage.table,
                (module, "B"),
                layer,
                base,
                bounds,
                outs[module][layer],
                max_rank,
            )


def reference(
    storage: Storage, segments: Dict[int, List[int]], xs, module: str, layer: int, base_out
):
    """float32 ``base_out + LoRA(x)`` computed per adapter segment."""
    import torch

    bounds = storage.modules[module][1]
    out = base_out.float().clone()
    for adapter, rows in segments.items():
        if adapter not in storage.weights:
            continue
        a_w, b_w = (w.float() for w in storage.weights[adapter][(module, layer)])
        idx = torch.tensor(rows, device=out.device)
        r = storage.ranks[adapter]
        shrunk = storage.scalings[adapter] * (xs[module][idx].float() @ a_w.T)
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            out[idx, lo:hi] += shrunk[:, i * r : (i + 1) * r] @ b_w[lo:hi].T
    return out


def rel_error(actual, expected) -> float:
    import torch

    return float(
        torch.linalg.vector_norm(actual.float() - expected)
        / torch.linalg.vector_norm(expected).clamp_min(1e-30)
    )


def token_segments(
    adapter_per_request: Sequence[int], tokens_per_request: Sequence[int]
) -> Dict[int, List[int]]:
    segments: Dict[int, List[int]] = {}
    row = 0
    for adapter, count in zip(adapter_per_request, tokens_per_request):
        if adapter:
            segments.setdefault(adapter, []).extend(range(row, row + count))
        row += count
    return segments


class Check:
    """One run of the device check (see the module docstring)."""

    def __init__(self, shapes: Shapes, dtype_name: str, device: str, seed: int) -> None:
        import torch

        self.torch = torch
        self.shapes, self.dtype_name = shapes, dtype_name
        self.dtype = getattr(torch, dtype_name)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rng = random.Random(seed)
        self.storage = Storage(shapes, self.dtype, self.device, shapes.num_adapters + 2)
        for adapter in range(1, shapes.num_adapters + 1):
            rank = shapes.ranks[(adapter - 1) % len(shapes.ranks)]
            self.storage.load(adapter, rank, self.rng.uniform(0.25, 2.0), seed + adapter)
        self.failures: List[str] = []

    # -- inputs --------------------------------------------------------------------------------
    def batch(self, adapter_per_request: Sequence[int], tokens_per_request: Sequence[int]):
        torch = self.torch
        n = sum(tokens_per_request)
        xs = {
            m: torch.randn(n, fan_in, device=self.device, dtype=self.dtype)
            for m, (fan_in, _) in self.storage.modules.items()
        }
        outs = {
            m: [
                torch.randn(n, b[-1], device=self.device, dtype=self.dtype)
                for _ in range(self.shapes.layers)
            ]
            for m, (_, b) in self.storage.modules.items()
        }
        return xs, outs

    def mix(self, num_requests: int, distinct: int) -> List[int]:
        """Adapters of ``num_requests`` requests drawn from ``distinct`` resident adapters
        (every one used when there are enough requests), one in eight on the base model."""
        resident = sorted(self.storage.weights)
        chosen = self.rng.sample(resident, min(distinct, len(resident)))
        mix = [chosen[i % len(chosen)] for i in range(num_requests)]
        self.rng.shuffle(mix)
        return [0 if num_requests > 1 and i % 8 == 7 else a for i, a in enumerate(mix)]

    def verify(
        self, label: str, segments, xs, before, after, rows: Optional[int] = None
    ) -> List[Dict[str, Any]]:
        results = []
        for layer in self.shapes.check_layers:
            for module in self.storage.modules:
                expected = reference(
                    self.storage, segments, xs, module, layer, before[module][layer]
                )
                actual = after[module][layer]
                if rows is not None:
                    expected, actual = expected[:rows], actual[:rows]
                err = rel_error(actual, expected)
                ok = err <= TOLERANCE[self.dtype_name] and bool(self.torch.isfinite(actual).all())
                if not ok:
                    self.failures.append(f"{label} {module} layer {layer}: rel error {err:.2e}")
                results.append(
                    {"case": label, "module": module, "layer": layer, "rel_error": err, "ok": ok}
                )
        return results

    # -- part 1 --------------------------------------------------------------------------------
    def correctness(self) -> List[Dict[str, Any]]:
        from chameleon_kernels.lora_table import SegmentBuffers

        results = []
        requests, each = self.shapes.prefill
        cases = [
            ("decode", self.mix(max(self.shapes.decode_bs), self.shapes.num_adapters), None),
            ("prefill", self.mix(requests, requests), each),
        ]
        for label, mix, each_tokens in cases:
            counts = [each_tokens or 1] * len(mix)
            buffers = SegmentBuffers(len(mix), sum(counts), self.device)
            plan = buffers.fill(mix, counts)
            xs, outs = self.batch(mix, counts)
            before = {m: [o.clone() for o in layer_outs] for m, layer_outs in outs.items()}
            lora_step(self.storage, plan, xs, outs, self.shapes.check_layers)
            results += self.verify(label, token_segments(mix, counts), xs, before, outs)
        return results

    # -- part 2 --------------------------------------------------------------------------------
    def _time(self, fn: Callable[[], None], reps: int) -> float:
        """Median seconds of ``fn`` (CUDA events on a GPU)."""
        torch = self.torch
        fn()
        samples = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        samples.sort()
        return samples[len(samples) // 2]

    def padded(self, num_layers: int):
        """Every adapter's weights padded to the largest rank, stacked: ``A [ids, stack*R, in]``
        and ``B [ids, out, R]`` per module, for ``num_layers`` layers (cycled by the timed
        references: each is far larger than any cache, so the traffic is that of distinct
        layers). Row 0 is the base model and free ids (zeros)."""
        torch = self.torch
        big_r = max(self.shapes.ranks)
        n = self.storage.table.capacity
        layers = []
        for layer in range(num_layers):
            per_module = {}
            for module, (fan_in, bounds) in self.storage.modules.items():
                stack = len(bounds) - 1
                a_pad = torch.zeros(n, stack * big_r, fan_in, device=self.device, dtype=self.dtype)
                b_pad = torch.zeros(n, bounds[-1], big_r, device=self.device, dtype=self.dtype)
                for adapter, weights in self.storage.weights.items():
                    a_w, b_w = weights[(module, layer)]
                    r = self.storage.ranks[adapter]
                    s = self.storage.scalings[adapter]
                    for i in range(stack):
                        a_pad[adapter, i * big_r : i * big_r + r] = a_w[i * r : (i + 1) * r] * s
                    b_pad[adapter, :, :r] = b_w
                per_module[module] = (a_pad, b_pad)
            layers.append(per_module)
        return layers

    def dense_gather(self, padded, idx, xs, outs) -> None:
        """Per token: gather its padded A/B, batched matmuls (no host work per call)."""
        torch = self.torch
        big_r = max(self.shapes.ranks)
        for layer in range(self.shapes.layers):
            weights = padded[layer % len(padded)]
            for module, (_, bounds) in self.storage.modules.items():
                a_pad, b_pad = weights[module]
                shrunk = torch.bmm(a_pad[idx], xs[module].unsqueeze(-1))  # [T, stack*R, 1]
                out = outs[module][layer]
                for i in range(len(bounds) - 1):
                    lo, hi = bounds[i], bounds[i + 1]
                    out[:, lo:hi] += torch.bmm(
                        b_pad[idx, lo:hi], shrunk[:, i * big_r : (i + 1) * big_r]
                    ).squeeze(-1)

    def dense_segments(self, padded, segments: Dict[int, List[int]], xs, outs) -> None:
        """Per adapter segment (host loop): padded matmuls, as SGLang's torch backend does."""
        torch = self.torch
        big_r = max(self.shapes.ranks)
        index = {a: torch.tensor(rows, device=self.device) for a, rows in segments.items()}
        for layer in range(self.shapes.layers):
            weights = padded[layer % len(padded)]
            for module, (_, bounds) in self.storage.modules.items():
                a_pad, b_pad = weights[module]
                out = outs[module][layer]
                for adapter, idx in index.items():
                    shrunk = xs[module][idx] @ a_pad[adapter].T
                    for i in range(len(bounds) - 1):
                        lo, hi = bounds[i], bounds[i + 1]
                        out[idx, lo:hi] += (
                            shrunk[:, i * big_r : (i + 1) * big_r] @ b_pad[adapter, lo:hi].T
                        )

    def timing_cases(self) -> List[Tuple[str, int, int, int]]:
        """(label, requests, tokens each, distinct adapters): decode batches of each size with
        one adapter, 8 and as many as the batch allows; one prefill of distinct adapters."""
        requests, each = self.shapes.prefill
        cases = [
            (f"decode bs={bs} adapters={d}", bs, 1, d)
            for bs in self.shapes.decode_bs
            for d in sorted({1, min(8, bs), min(self.shapes.num_adapters, bs)})
        ]
        cases.append((f"prefill {requests}x{each} adapters={requests}", requests, each, requests))
        return cases

    def timing(self, reps: int) -> List[Dict[str, Any]]:
        from chameleon_kernels.lora_table import SegmentBuffers

        torch = self.torch
        padded = self.padded(min(4, self.shapes.layers))
        layers = range(self.shapes.layers)
        results = []
        for label, bs, each_tokens, distinct in self.timing_cases():
            mix = self.mix(bs, distinct)
            counts = [each_tokens] * bs
            buffers = SegmentBuffers(bs, bs * each_tokens, self.device)
            decode = each_tokens == 1
            plan = buffers.fill(mix, counts, graph=decode)
            xs, outs = self.batch(mix, counts)
            idx = torch.tensor(
                [a for a, c in zip(mix, counts) for _ in range(c)], device=self.device
            )
            segments = token_segments(mix, counts)
            row = {
                "case": label,
                "tokens": sum(counts),
                "distinct_adapters": len(set(mix) - {0}),
                "ours_eager_s": self._time(
                    functools.partial(lora_step, self.storage, plan, xs, outs, layers), reps
                ),
                "dense_segments_s": self._time(
                    functools.partial(self.dense_segments, padded, segments, xs, outs), reps
                ),
            }
            if decode:
                row["dense_gather_s"] = self._time(
                    functools.partial(self.dense_gather, padded, idx, xs, outs), reps
                )
                if self.cuda:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        lora_step(self.storage, plan, xs, outs, layers)
                    row["ours_graph_s"] = self._time(graph.replay, reps)
                    del graph
            best_dense = min(v for k, v in row.items() if k.startswith("dense"))
            row["speedup_vs_best_dense"] = best_dense / min(
                row["ours_eager_s"], row.get("ours_graph_s", float("inf"))
            )
            results.append(row)
            del xs, outs
        del padded
        return results

    # -- part 3 --------------------------------------------------------------------------------
    def graph(self, replays: int) -> Dict[str, Any]:
        """Capture one decode step, replay it over changing mixes, loads and evictions."""
        from chameleon_kernels.graph_guard import GraphDisciplineGuard
        from chameleon_kernels.lora_table import SegmentBuffers

        torch = self.torch
        bs = max(self.shapes.decode_bs)
        buffers = SegmentBuffers(bs, bs, self.device)
        layers = range(self.shapes.layers)
        xs, outs = self.batch([0] * bs, [1] * bs)
        plan = buffers.fill(self.mix(bs, self.shapes.num_adapters), [1] * bs, graph=True)
        lora_step(self.storage, plan, xs, outs, layers)  # compile outside the capture
        captured = None
        if self.cuda:
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                lora_step(self.storage, plan, xs, outs, layers)
        captured_plan = plan
        fixed = None
        results, events = [], []
        free_ids = [
            a for a in range(1, self.shapes.num_adapters + 3) if a not in self.storage.weights
        ]
        for replay in range(replays):
            if replay % 2 == 1:  # evict one adapter; load another (other rank) in its place
                victim = self.rng.choice(sorted(self.storage.weights))
                self.storage.evict(victim)
                new_id = free_ids.pop(0) if free_ids and replay % 4 == 1 else victim
                if new_id != victim:
                    free_ids.append(victim)
                rank = self.rng.choice(self.shapes.ranks)
                self.storage.load(new_id, rank, self.rng.uniform(0.25, 2.0), 1000 + replay)
                events.append({"replay": replay, "evicted": victim, "loaded": new_id, "rank": rank})
            raw_bs = self.rng.randint(1, bs)
            mix = self.mix(raw_bs, self.rng.randint(1, self.shapes.num_adapters))
            new_plan = buffers.fill(mix, [1] * raw_bs, graph=True)
            assert new_plan.seg_adapter.data_ptr() == captured_plan.seg_adapter.data_ptr()
            for module, (fan_in, bounds) in self.storage.modules.items():
                xs[module].copy_(torch.randn(bs, fan_in, device=self.device, dtype=self.dtype))
                for layer in layers:
                    outs[module][layer].copy_(
                        torch.randn(bs, bounds[-1], device=self.device, dtype=self.dtype)
                    )
            before = {m: [o.clone() for o in layer_outs] for m, layer_outs in outs.items()}
            if captured is not None:
                captured.replay()
                torch.cuda.synchronize()
            else:  # a CPU: the captured grid, under the host-sync guard
                with GraphDisciplineGuard() as guard:
                    lora_step(self.storage, captured_plan, xs, outs, layers)
                if fixed is None:
                    fixed = guard.addresses()
                elif guard.addresses() != fixed:
                    self.failures.append(f"replay {replay} read buffers of other addresses")
            results += self.verify(
                f"replay {replay} bs={raw_bs}",
                token_segments(mix, [1] * raw_bs),
                xs,
                before,
                outs,
                rows=raw_bs,
            )
        return {
            "captured_bs": bs,
            "replays": replays,
            "cuda_graph": captured is not None,
            "events": events,
            "max_rel_error": max(r["rel_error"] for r in results),
            "ok": all(r["ok"] for r in results),
        }

    # -- part 4 --------------------------------------------------------------------------------
    def sglang(self, reps: int) -> Dict[str, Any]:
        """Ours against SGLang's csgmv kernels where SGLang is importable: agreement on part 1's
        batches (each also against the float32 reference), then the LoRA part of part 2's
        decode steps and prefill timed, both eager and (on a GPU) CUDA-graph replayed."""
        from chameleon_kernels.gpu_check_sglang import CsgmvStep, load_csgmv
        from chameleon_kernels.lora_table import SegmentBuffers

        kernels, why = load_csgmv()
        if kernels is None:
            return {"available": False, "reason": why}
        torch = self.torch
        if not self.cuda and self.dtype != torch.float32:
            return {
                "available": False,
                "reason": "the Triton interpreter computes tl.dot on 16-bit tiles as raw bits: "
                "here SGLang's csgmv is compared in float32 only (--dtype float32)",
            }
        layers = self.shapes.check_layers
        theirs_step = CsgmvStep(kernels, self.storage, layers)
        requests, each = self.shapes.prefill
        agreement = []
        for label, mix, each_tokens in (
            ("decode", self.mix(max(self.shapes.decode_bs), self.shapes.num_adapters), 1),
            ("prefill", self.mix(requests, requests), each),
        ):
            counts = [each_tokens] * len(mix)
            plan = SegmentBuffers(len(mix), sum(counts), self.device).fill(mix, counts)
            xs, before = self.batch(mix, counts)
            ours = {m: [o.clone() for o in outs] for m, outs in before.items()}
            theirs = {m: [o.clone() for o in outs] for m, outs in before.items()}
            lora_step(self.storage, plan, xs, ours, layers)
            theirs_step.step(theirs_step.batch_info(mix, counts, graph=False), xs, theirs, layers)
            segments = token_segments(mix, counts)
            for layer in layers:
                for module in self.storage.modules:
                    expected = reference(
                        self.storage, segments, xs, module, layer, before[module][layer]
                    )
                    row = {
                        "case": label,
                        "module": module,
                        "layer": layer,
                        "ours_rel_error": rel_error(ours[module][layer], expected),
                        "csgmv_rel_error": rel_error(theirs[module][layer], expected),
                        "ours_vs_csgmv": rel_error(
                            ours[module][layer], theirs[module][layer].float()
                        ),
                    }
                    row["ok"] = row["ours_vs_csgmv"] <= 2 * TOLERANCE[self.dtype_name]
                    if not row["ok"]:
                        self.failures.append(
                            f"csgmv {label} {module} layer {layer}: ours differ from SGLang's "
                            f"by {row['ours_vs_csgmv']:.2e}"
                        )
                    agreement.append(row)
        del theirs_step
        return {"available": True, "agreement": agreement, "timing": self._time_csgmv(reps)}

    def _time_csgmv(self, reps: int) -> List[Dict[str, Any]]:
        from chameleon_kernels.gpu_check_sglang import CsgmvStep, load_csgmv
        from chameleon_kernels.lora_table import SegmentBuffers

        torch = self.torch
        kernels, _ = load_csgmv()
        theirs_step = CsgmvStep(kernels, self.storage, range(min(4, self.shapes.layers)))
        layers = range(self.shapes.layers)
        rows = []
        cases = self.timing_cases()
        if not self.cuda:  # interpreted, the timings mean nothing: run the code path, two cases
            cases = [cases[-2], cases[-1]]
        for label, bs, each_tokens, distinct in cases:
            mix = self.mix(bs, distinct)
            counts = [each_tokens] * bs
            decode = each_tokens == 1
            plan = SegmentBuffers(bs, bs * each_tokens, self.device).fill(mix, counts, graph=decode)
            info = theirs_step.batch_info(mix, counts, graph=decode)
            xs, outs = self.batch(mix, counts)
            ours = functools.partial(lora_step, self.storage, plan, xs, outs, layers)
            theirs = functools.partial(theirs_step.step, info, xs, outs, layers)
            row = {
                "case": label,
                "tokens": sum(counts),
                "ours_eager_s": self._time(ours, reps),
                "csgmv_eager_s": self._time(theirs, reps),
            }
            if self.cuda and decode:
                for name, fn in (("ours_graph_s", ours), ("csgmv_graph_s", theirs)):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fn()
                    row[name] = self._time(graph.replay, reps)
                    del graph
            best = {
                who: min(v for k, v in row.items() if k.startswith(who))
                for who in ("ours", "csgmv")
            }
            row["ours_over_csgmv"] = best["ours"] / best["csgmv"]
            rows.append(row)
            del xs, outs
        return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-check.json")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCE))
    parser.add_argument(
        "--cpu", action="store_true", help="tiny shapes on the CPU under the Triton interpreter"
    )
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--replays", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default: all of {', '.join(PARTS)})",
    )
    args = parser.parse_args(argv)
    chosen = [p for p in args.parts.split(",") if p]
    if not chosen or set(chosen) - set(PARTS):
        parser.error(f"--parts takes some of {', '.join(PARTS)}")
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    started = time.perf_counter()
    _import_package()
    import torch
    import triton

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the interpreter check", file=sys.stderr)
        return 2
    shapes = TINY if args.cpu else LLAMA3_8B
    check = Check(shapes, args.dtype, "cpu" if args.cpu else "cuda", args.seed)
    report: Dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": "cpu (Triton interpreter)" if args.cpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "shapes": dataclasses.asdict(shapes),
    }
    parts: Dict[str, Callable[[], Any]] = {
        "correctness": check.correctness,
        "graph": lambda: check.graph(args.replays),
        "timing": lambda: check.timing(args.reps),
        "sglang": lambda: check.sglang(args.reps),
    }
    for name in chosen:
        part = parts[name]
        t0 = time.perf_counter()
        try:
            report[name] = part()
        except Exception as exc:  # a failed part is reported, the others still run
            check.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report[f"{name}_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {report[f'{name}_seconds']} s", flush=True)
    report["failures"] = check.failures
    report["passed"] = not check.failures
    report["seconds"] = round(time.perf_counter() - started, 2)
    Path(args.out).write_text(json.dumps(report, indent=1))
    if args.cpu:
        print("(interpreted kernels: the timings say nothing about a GPU)")
    for row in report.get("timing", []) if isinstance(report.get("timing"), list) else []:
        print(
            f"{row['case']:>34}: ours {row['ours_eager_s'] * 1e3:8.3f} ms"
            + (f" (graph {row['ours_graph_s'] * 1e3:.3f})" if "ours_graph_s" in row else "")
            + f", {row['speedup_vs_best_dense']:.2f}x faster than dense padded"
        )
    sglang = report.get("sglang")
    if isinstance(sglang, dict) and not sglang.get("available", True):
        print(f"sglang: not compared ({sglang['reason']})")
    for row in sglang.get("timing", []) if isinstance(sglang, dict) else []:
        print(
            f"{row['case']:>34}: ours / SGLang csgmv {row['ours_over_csgmv']:.2f}x"
            + (
                f" (graph {row['ours_graph_s'] * 1e3:.3f} vs {row['csgmv_graph_s'] * 1e3:.3f} ms)"
                if "csgmv_graph_s" in row
                else ""
            )
        )
    print(
        ("PASSED" if report["passed"] else "FAILED: " + "; ".join(check.failures[:5]))
        + f" ({report['seconds']} s) -> {args.out}"
    )
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
