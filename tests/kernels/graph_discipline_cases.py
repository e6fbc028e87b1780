"""The GPU serving path's forward under the CUDA-graph discipline guard, on a CPU.

Run by ``test_triton_interpreted.py`` in a fresh Python started with ``TRITON_INTERPRET=1``. The
real :class:`~chameleon_sglang.integration.lora_backend.ChameleonLoRABackend` runs its table path
(Triton kernels over a device location table, interpreted) against a pool double that keeps what the
adapter cache keeps on a GPU: per layer a K and a V buffer holding rank-exact matrices, a
:class:`~chameleon_kernels.lora_table.DeviceLocationTable`, ``layer_base`` and ``wait_ready``.

The sequence follows SGLang's CUDA-graph runner: ``init_decode_cuda_graph_batch_info`` once, an
eager warm-up step, a "capture" step at the largest batch size, then many "replays": for each,
``prepare_lora_batch`` on the host (outside the graph, as SGLang calls it), the launch grid kept
from capture (a replayed graph launches what was captured), and the decode step -- every LoRA
module of every layer -- under :class:`~chameleon_kernels.graph_guard.GraphDisciplineGuard`.
Between replays adapters are evicted (table cleared, memory poisoned with NaN) and others loaded
into that memory with other ranks. Each replay must match a float32 reference, synchronise
nothing with the host and read only the buffers whose addresses were fixed at capture.
"""

import dataclasses
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from chameleon_kernels import graph_guard
from chameleon_kernels import lora_table_triton as ltt
from chameleon_kernels.graph_guard import GraphDisciplineError, GraphDisciplineGuard
from chameleon_kernels.lora_table import DeviceLocationTable, alignment_for

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "run this module in a process started with TRITON_INTERPRET=1 "
        "(tests/kernels/test_triton_interpreted.py does)"
    )
assert ltt.HAS_TRITON and ltt.INTERPRETED

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from chameleon_sglang.integration import lora_backend  # noqa: E402

HIDDEN, INTER, NUM_LAYERS, MAX_RANK, MAX_BS = 32, 64, 2, 32, 8
# module -> (input features, output slice bounds)
MODULES = {
    "qkv_proj": (HIDDEN, [0, 32, 40, 48]),
    "o_proj": (HIDDEN, [0, HIDDEN]),
    "gate_up_proj": (HIDDEN, [0, INTER, 2 * INTER]),
    "down_proj": (INTER, [0, HIDDEN]),
}
KINDS = [(m, k) for m in sorted(MODULES) for k in ("A", "B")]
REGION = 16_384  # elements per adapter id per buffer
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
DEVICE = torch.device("cpu")


@dataclasses.dataclass
class FakeForwardBatch:
    """The host-side fields of SGLang's ForwardBatch the backend reads."""

    batch_size: int
    forward_mode: ForwardMode = ForwardMode.DECODE
    extend_seq_lens_cpu: Optional[List[int]] = None


class GpuLikePool:
    """What ChameleonLoRAPool keeps on a GPU: K/V buffers per layer holding adapters, the device
    location table, ``layer_base``/``wait_ready``. Adapter id ``i`` owns region ``i`` of each
    buffer (A in the K buffer, B in the V buffer); eviction poisons it with NaN."""

    def __init__(self, dtype: torch.dtype, capacity: int = 8) -> None:
        self.dtype = dtype
        self.max_lora_rank = MAX_RANK
        size = REGION * capacity
        self.k = [torch.full((size,), float("nan"), dtype=dtype) for _ in range(NUM_LAYERS)]
        self.v = [torch.full((size,), float("nan"), dtype=dtype) for _ in range(NUM_LAYERS)]
        self.device_table = DeviceLocationTable(
            KINDS, NUM_LAYERS, capacity, DEVICE, alignment_for(dtype, 64)
        )
        self.locations = None
        self.by_id: Dict[int, object] = {}
        self.weights: Dict[int, Dict[Tuple[str, int], Tuple[torch.Tensor, torch.Tensor]]] = {}
        self.scalings: Dict[int, float] = {}
        self.waited: List[List[int]] = []

    def layer_base(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def wait_ready(self, ids) -> None:
        self.waited.append(sorted(ids))

    def load(
        self,
        adapter: int,
        rank: int,
        scaling: float,
        gen: torch.Generator,
        modules: Sequence[str] = tuple(MODULES),
    ) -> None:
        entries, weights = {}, {}
        v_minus_k = [
            (v.data_ptr() - k.data_ptr()) // v.element_size() for k, v in zip(self.k, self.v)
        ]
        for layer in range(NUM_LAYERS):
            a_cursor = b_cursor = adapter * REGION
            for module in modules:
                fan_in, bounds = MODULES[module]
                stack = len(bounds) - 1
                a = torch.randn(stack * rank, fan_in, generator=gen) / fan_in**0.5
                b = torch.randn(bounds[-1], rank, generator=gen) / rank**0.5
                a, b = a.to(self.dtype), b.to(self.dtype)
                a_view = self.k[layer][a_cursor : a_cursor + a.numel()].view(a.shape)
                b_view = self.v[layer][b_cursor : b_cursor + b.numel()].view(b.shape)
                a_view.copy_(a)
                b_view.copy_(b)
                entries[((module, "A"), layer)] = (a_cursor, rank)
                entries[((module, "B"), layer)] = (v_minus_k[layer] + b_cursor, rank)
                weights[(module, layer)] = (a_view, b_view)
                a_cursor += -(-a.numel() // 64) * 64
                b_cursor += -(-b.numel() // 64) * 64
        self.device_table.set_adapter(adapter, entries, scaling)
        self.weights[adapter] = weights
        self.scalings[adapter] = scaling

    def evict(self, adapter: int) -> None:
        self.device_table.clear(adapter)
        for a_view, b_view in self.weights.pop(adapter).values():
            a_view.fill_(float("nan"))
            b_view.fill_(float("nan"))
        self.scalings.pop(adapter)


def handles() -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per (module, layer) the A and B handle tensors, tagged as the pool tags them."""
    out = {}
    for module, (fan_in, bounds) in MODULES.items():
        for layer in range(NUM_LAYERS):
            a = torch.zeros(1, (len(bounds) - 1) * MAX_RANK, fan_in)
            b = torch.zeros(1, bounds[-1], MAX_RANK)
            a.chameleon_key = (module, layer, "A")
            b.chameleon_key = (module, layer, "B")
            out[(module, layer)] = (a, b)
    return out


def make_backend(pool: GpuLikePool) -> lora_backend.ChameleonLoRABackend:
    backend = lora_backend.ChameleonLoRABackend(MAX_BS, torch.device("cuda"))  # no CPU warm-up
    backend.attach(pool)
    backend.init_decode_cuda_graph_batch_info(MAX_BS)
    return backend


def inputs(dtype: torch.dtype, bs: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    return {
        "x": torch.randn(bs, HIDDEN, generator=gen).to(dtype),
        "h": torch.randn(bs, INTER, generator=gen).to(dtype),
        **{
            f"base_{m}": torch.randn(bs, MODULES[m][1][-1], generator=gen).to(dtype)
            for m in MODULES
        },
    }


def decode_step(backend, hs, data) -> Dict[Tuple[str, int], torch.Tensor]:
    """Every LoRA module of every layer, called as SGLang's LoRA layers call the backend."""
    out = {}
    for layer in range(NUM_LAYERS):
        a, b = hs[("qkv_proj", layer)]
        out[("qkv_proj", layer)] = backend.run_qkv_lora(
            data["x"],
            a,
            b,
            output_offset=None,
            output_offset_cpu=QKV_OFFSETS,
            max_qkv_out_dim=32,
            base_output=data["base_qkv_proj"].clone(),
        )
        a, b = hs[("gate_up_proj", layer)]
        out[("gate_up_proj", layer)] = backend.run_gate_up_lora(
            data["x"],
            a,
            b,
            output_offset=None,
            output_offset_cpu=GATE_UP_OFFSETS,
            base_output=data["base_gate_up_proj"].clone(),
        )
        for module, x in (("o_proj", data["x"]), ("down_proj", data["h"])):
            a, b = hs[(module, layer)]
            shrunk = backend.run_lora_a_sgemm(x, a)
            out[(module, layer)] = backend.run_lora_b_sgemm(
                shrunk, b, base_output=data[f"base_{module}"].clone()
            )
    return out


QKV_OFFSETS = torch.tensor(MODULES["qkv_proj"][1], dtype=torch.int32)
GATE_UP_OFFSETS = torch.tensor(MODULES["gate_up_proj"][1], dtype=torch.int32)


def reference(
    pool: GpuLikePool, per_request: Sequence[int], data
) -> Dict[Tuple[str, int], torch.Tensor]:
    """float32, token by token (decode: one token per request)."""
    out = {}
    for module, (_, bounds) in MODULES.items():
        x = (data["h"] if module == "down_proj" else data["x"]).float()
        for layer in range(NUM_LAYERS):
            result = data[f"base_{module}"].float().clone()
            for t, adapter in enumerate(per_request):
                if adapter not in pool.weights or (module, layer) not in pool.weights[adapter]:
                    continue
                a_w, b_w = (w.float() for w in pool.weights[adapter][(module, layer)])
                rank = b_w.shape[1]
                shrunk = pool.scalings[adapter] * (x[t] @ a_w.T)
                for i in range(len(bounds) - 1):
                    lo, hi = bounds[i], bounds[i + 1]
                    result[t, lo:hi] += shrunk[i * rank : (i + 1) * rank] @ b_w[lo:hi].T
            out[(module, layer)] = result
    return out


def prepare(backend, pool, per_request: Sequence[int], graph: bool) -> None:
    """What SGLang's LoRA manager does before a forward (host side, outside any graph)."""
    capacity = pool.device_table.capacity
    ranks = [0] * capacity
    scalings = [0.0] * capacity
    for adapter in pool.weights:
        ranks[adapter] = MAX_RANK
        scalings[adapter] = pool.scalings[adapter]
    backend.prepare_lora_batch(
        FakeForwardBatch(len(per_request)), list(per_request), ranks, scalings, use_cuda_graph=graph
    )


def check(actual, expected, dtype) -> None:
    for key in expected:
        torch.testing.assert_close(
            actual[key].float(), expected[key], **TOL[dtype], msg=lambda m, key=key: f"{key}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_replays_with_changing_adapter_mixes_keep_graph_discipline(dtype):
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    pool = GpuLikePool(dtype)
    for adapter, rank in ((1, 8), (2, 16), (3, 32), (4, 8)):
        pool.load(adapter, rank, 0.5 + adapter / 4, gen)
    backend, hs = make_backend(pool), handles()

    # warm-up (eager, as SGLang runs the forward before capturing), then capture at MAX_BS
    warm = [1, 2, 0]
    prepare(backend, pool, warm, graph=False)
    data = inputs(dtype, len(warm), gen)
    check(decode_step(backend, hs, data), reference(pool, warm, data), dtype)
    captured_mix = [rng.choice([0, 1, 2, 3]) for _ in range(MAX_BS)]
    prepare(backend, pool, captured_mix, graph=True)
    captured = backend.batch_info.plan
    with GraphDisciplineGuard() as guard:
        data = inputs(dtype, MAX_BS, gen)
        out = decode_step(backend, hs, data)
    check(out, reference(pool, captured_mix, data), dtype)
    fixed = guard.addresses()
    assert set(fixed) == {"table_shrink", "table_expand"}
    graph = backend._graph
    expected = {
        t.data_ptr()
        for t in (
            *pool.device_table.buffers(),
            *pool.k,
            graph.seg_adapter,
            graph.seg_start,
            graph.order,
        )
    }
    assert set().union(*fixed.values()) == expected

    resident = [1, 2, 3, 4]
    for replay in range(10):
        if replay % 2 == 1:  # evict one adapter, load another into its id and memory
            victim = rng.choice(resident)
            pool.evict(victim)
            pool.load(
                victim,
                rng.choice([8, 16, 32]),
                rng.uniform(0.2, 2.0),
                gen,
                modules=rng.sample(sorted(MODULES), rng.randint(1, len(MODULES))),
            )
        bs = rng.randint(1, MAX_BS)
        mix = [rng.choice([0, *resident]) for _ in range(bs)]
        prepare(backend, pool, mix, graph=True)
        assert pool.waited[-1] == sorted(set(a for a in mix if a))
        plan = backend.batch_info.plan
        assert (plan.seg_adapter, plan.seg_start, plan.order) == (
            captured.seg_adapter,
            captured.seg_start,
            captured.order,
        )
        # a replay launches the captured grid
        backend.batch_info.plan = dataclasses.replace(
            plan, num_segments=captured.num_segments, max_segment_tokens=captured.max_segment_tokens
        )
        data = inputs(dtype, bs, gen)
        with GraphDisciplineGuard() as guard:
            out = decode_step(backend, hs, data)
        check(out, reference(pool, mix, data), dtype)
        assert guard.addresses() == fixed, f"replay {replay} read other buffers"


def test_the_guard_catches_a_host_sync_in_the_forward():
    """A forward that reads a device value on the host fails under the guard (a guard that
    cannot fail would prove nothing)."""
    pool = GpuLikePool(torch.float32)
    pool.load(1, 8, 1.0, torch.Generator().manual_seed(1))

    class Leaky(lora_backend.ChameleonLoRABackend):
        def run_lora_a_sgemm(self, x, weights, *args, **kwargs):
            self.batch_info.plan.seg_start.tolist()
            return super().run_lora_a_sgemm(x, weights, *args, **kwargs)

    backend = Leaky(MAX_BS, torch.device("cuda"))
    backend.attach(pool)
    backend.init_decode_cuda_graph_batch_info(MAX_BS)
    prepare(backend, pool, [1, 1], graph=True)
    a, _ = handles()[("o_proj", 0)]
    with pytest.raises(GraphDisciplineError, match="tolist"), GraphDisciplineGuard():
        backend.run_lora_a_sgemm(torch.randn(2, HIDDEN), a)


@pytest.mark.parametrize("call", ["item", "tensor", "cpu_copy"])
def test_the_guard_refuses_each_host_synchronisation(call):
    t = torch.arange(4)
    actions = {
        "item": lambda: t[0].item(),
        "tensor": lambda: torch.tensor([1, 2]),
        "cpu_copy": lambda: t.to("meta"),
    }
    with pytest.raises(GraphDisciplineError), GraphDisciplineGuard():
        actions[call]()
    actions[call]()  # fine outside the guard


def test_eager_buffers_that_grow_change_address_which_the_guard_shows(monkeypatch):
    """The address check bites: an eager batch larger than the eager buffers gets new ones (the
    reason captured graphs use the fixed graph buffers)."""
    monkeypatch.setattr(lora_backend, "EAGER_TOKENS", 4)
    pool = GpuLikePool(torch.float32)
    pool.load(1, 8, 1.0, torch.Generator().manual_seed(2))
    backend, hs = make_backend(pool), handles()
    a, _ = hs[("o_proj", 0)]
    seen = []
    for bs in (4, 9):
        prepare(backend, pool, [1] * bs, graph=False)
        with GraphDisciplineGuard() as guard:
            backend.run_lora_a_sgemm(torch.randn(bs, HIDDEN), a)
        seen.append(guard.addresses()["table_shrink"])
    assert seen[0] != seen[1]


def test_launch_outside_a_guard_records_nothing():
    """Outside a guard a launch is a plain context: host work is allowed and no guard records
    it. Inside one, the same launch is recorded with the addresses it reads."""
    guard = graph_guard.GraphDisciplineGuard()
    with graph_guard.launch("site", torch.zeros(1)):
        torch.tensor([1])  # no guard active: allowed
    assert guard.launches == [] and graph_guard._ACTIVE is None
    fixed = torch.zeros(1)
    with guard, graph_guard.launch("site", fixed):
        pass
    assert guard.launches == [("site", frozenset({fixed.data_ptr()}))]
