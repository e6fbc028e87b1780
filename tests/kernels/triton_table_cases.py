"""The location-table Triton kernels (chameleon_kernels.lora_table_triton) under the interpreter.

Run by ``test_lora_table_triton.py`` in a fresh Python started with ``TRITON_INTERPRET=1``.
Adapters are packed into two separate buffers per layer, as the cache packs a layer's K and V
rows: every offset is taken against the K buffer, so matrices in the V buffer sit at address
differences. Results are compared with a float32 reference computed token by token. Between
batches adapters are evicted and others loaded into the same memory, and the kernels follow the
table without any other change: what a replayed CUDA graph relies on.
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import triton  # noqa: F401  - a missing Triton must fail loudly

from chameleon_kernels import lora_table_triton as ltt
from chameleon_kernels.lora_table import DeviceLocationTable, SegmentBuffers, alignment_for

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "run this module in a process started with TRITON_INTERPRET=1 "
        "(tests/kernels/test_lora_table_triton.py does)"
    )
assert ltt.HAS_TRITON and ltt.INTERPRETED

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
HIDDEN = 32
SLICES = {1: [0, 48], 2: [0, 24, 48], 3: [0, 32, 40, 48]}
KIND_A, KIND_B = ("m", "A"), ("m", "B")
DEVICE = torch.device("cpu")


class Layer:
    """A layer's K and V buffers (separate allocations) and a bump allocator over each."""

    def __init__(self, dtype: torch.dtype, numel: int = 40_000) -> None:
        self.k = torch.full((numel,), float("nan"), dtype=dtype)  # NaN: stray reads show
        self.v = torch.full((numel,), float("nan"), dtype=dtype)
        self.cursor = [16, 40]  # aligned, uneven starts
        self.align = alignment_for(dtype, 64)

    def place(self, part: int, w: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Copy ``w`` into the K (0) or V (1) buffer; its view and offset against K."""
        buf = (self.k, self.v)[part]
        start = self.cursor[part]
        view = buf[start : start + w.numel()].view(w.shape)
        view.copy_(w)
        self.cursor[part] = start + -(-w.numel() // self.align) * self.align + self.align
        return view, (view.data_ptr() - self.k.data_ptr()) // w.element_size()


def make_adapter(
    layer: Layer,
    table: DeviceLocationTable,
    adapter: int,
    rank: int,
    stack: int,
    scaling: float,
    gen: torch.Generator,
    parts=(0, 1),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random A ``[stack*r, HIDDEN]`` and B ``[out, r]`` placed in ``layer``, recorded in the
    table as adapter ``adapter``; returns the placed views."""
    out = SLICES[stack][-1]
    a = (torch.randn(stack * rank, HIDDEN, generator=gen) / HIDDEN**0.5).to(layer.k.dtype)
    b = (torch.randn(out, rank, generator=gen) / rank**0.5).to(layer.k.dtype)
    a_view, a_off = layer.place(parts[0], a)
    b_view, b_off = layer.place(parts[1], b)
    table.set_adapter(adapter, {(KIND_A, 0): (a_off, rank), (KIND_B, 0): (b_off, rank)}, scaling)
    return a_view, b_view


def reference(
    x: torch.Tensor,
    per_token: Sequence[int],
    mats: Dict[int, Tuple],
    stack: int,
    max_rank: int,
    scalings: Dict[int, float],
    base: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 shrink output and expand result, token by token."""
    bounds = SLICES[stack]
    a_ref = torch.zeros(x.shape[0], stack * max_rank)
    out = torch.zeros(x.shape[0], bounds[-1]) if base is None else base.float().clone()
    for t, adapter in enumerate(per_token):
        if adapter not in mats:
            continue
        a_w, b_w = (m.float() for m in mats[adapter])
        r = b_w.shape[1]
        a = scalings[adapter] * (x[t].float() @ a_w.T)
        a_ref[t, : stack * r] = a
        for i in range(stack):
            lo, hi = bounds[i], bounds[i + 1]
            out[t, lo:hi] += a[i * r : (i + 1) * r] @ b_w[lo:hi].T
    return a_ref, out


def run(x, plan, table, layer, stack, max_rank, base_output, block_sizes=None):
    a = ltt.table_shrink(
        x, plan, table, KIND_A, 0, layer.k, stack, max_rank, block_sizes=block_sizes
    )
    out = ltt.table_expand(
        a,
        plan,
        table,
        KIND_B,
        0,
        layer.k,
        SLICES[stack],
        base_output,
        max_rank,
        block_sizes=block_sizes,
    )
    return a, out


def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.float(), expected, **TOL[dtype])


def tokens(requests: Sequence[Tuple[int, int]]) -> Tuple[List[int], List[int], List[int]]:
    adapters = [a for a, _ in requests]
    counts = [c for _, c in requests]
    return adapters, counts, [a for a, c in requests for _ in range(c)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("stack", [1, 2, 3])
@pytest.mark.parametrize("graph", [False, True], ids=["exact-grid", "graph-grid"])
def test_mixed_ranks_interleaved_tokens_match_the_reference(dtype, stack, graph):
    """Adapters of ranks 8/16/32 (A and B in different buffers for some), interleaved requests
    of several tokens, base-model requests, an adapter without this module's weights; with the
    grid sized to the batch or to the buffers (as under a captured graph)."""
    gen = torch.Generator().manual_seed(stack)
    layer = Layer(dtype)
    table = DeviceLocationTable([KIND_A, KIND_B], 1, 8, DEVICE, align=layer.align)
    scalings = {1: 0.5, 2: 2.0, 3: 1.0, 5: 1.5}
    mats = {
        1: make_adapter(layer, table, 1, 8, stack, 0.5, gen, parts=(0, 1)),
        2: make_adapter(layer, table, 2, 32, stack, 2.0, gen, parts=(1, 0)),
        3: make_adapter(layer, table, 3, 16, stack, 1.0, gen, parts=(1, 1)),
    }
    table.scalings[5] = 1.5  # adapter 5: a scaling, no matrices (rank 0 in the table)
    adapters, counts, per_token = tokens(
        [(2, 3), (1, 2), (0, 2), (3, 1), (1, 1), (5, 2), (2, 1), (3, 17)]
    )
    segments = SegmentBuffers(12, 40, DEVICE)
    plan = segments.fill(adapters, counts, graph=graph)
    x = torch.randn(sum(counts), HIDDEN, generator=gen).to(dtype)
    base = torch.randn(sum(counts), SLICES[stack][-1], generator=gen).to(dtype)
    a, out = run(x, plan, table, layer, stack, 32, base.clone())
    a_ref, out_ref = reference(x, per_token, mats, stack, 32, scalings, base)
    check(a, a_ref, dtype)
    untouched = [t for t, ad in enumerate(per_token) if ad not in mats]
    assert not a[untouched].any()
    check(out, out_ref, dtype)
    assert torch.equal(out[untouched], base[untouched])


def test_several_token_and_column_blocks():
    """Block sizes of 16 over a segment of 40 tokens, rank 32 and three slices: programs at
    every (token block, column block) combination, partial blocks masked."""
    gen = torch.Generator().manual_seed(9)
    layer = Layer(torch.float32)
    table = DeviceLocationTable([KIND_A, KIND_B], 1, 4, DEVICE, align=layer.align)
    mats = {
        1: make_adapter(layer, table, 1, 32, 3, 0.7, gen),
        2: make_adapter(layer, table, 2, 8, 3, 1.3, gen),
    }
    adapters, counts, per_token = tokens([(1, 40), (2, 3), (1, 1)])
    plan = SegmentBuffers(4, 64, DEVICE).fill(adapters, counts)
    x = torch.randn(sum(counts), HIDDEN, generator=gen)
    a, out = run(x, plan, table, layer, 3, 32, None, block_sizes=(16, 16, 16))
    a_ref, out_ref = reference(x, per_token, mats, 3, 32, {1: 0.7, 2: 1.3}, None)
    check(a, a_ref, torch.float32)
    check(out, out_ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loads_and_evictions_between_batches_are_followed_through_the_table(dtype):
    """The same segment buffers and table objects over a sequence of batches while adapters are
    evicted (table cleared, memory overwritten with NaN) and others loaded into that memory
    under reused ids with other ranks: every batch matches the reference of what is resident."""
    gen = torch.Generator().manual_seed(4)
    layer = Layer(dtype)
    table = DeviceLocationTable([KIND_A, KIND_B], 1, 6, DEVICE, align=layer.align)
    segments = SegmentBuffers(6, 32, DEVICE)
    addresses = {t.data_ptr() for t in (*table.buffers(), *segments.buffers())}
    resident = {
        1: make_adapter(layer, table, 1, 8, 2, 1.0, gen),
        2: make_adapter(layer, table, 2, 16, 2, 0.5, gen),
    }
    scalings = {1: 1.0, 2: 0.5}
    steps = [
        ("run", [(1, 1), (2, 1), (1, 1)]),
        ("evict", 1),
        ("run", [(2, 2), (0, 1)]),
        ("load", (1, 32, 2.0)),  # id 1 again, another adapter of rank 32
        ("run", [(1, 1), (2, 1), (1, 2)]),
        ("evict", 2),
        ("load", (3, 8, 0.25)),
        ("load", (2, 16, 3.0)),
        ("run", [(3, 1), (2, 1), (1, 1), (3, 1)]),
    ]
    for what, arg in steps:
        if what == "evict":
            a_view, b_view = resident.pop(arg)
            table.clear(arg)
            a_view.fill_(float("nan"))
            b_view.fill_(float("nan"))
            layer.cursor = [16, 40]  # the next loads reuse this memory
        elif what == "load":
            adapter, rank, scaling = arg
            resident[adapter] = make_adapter(layer, table, adapter, rank, 2, scaling, gen)
            scalings[adapter] = scaling
        else:
            adapters, counts, per_token = tokens(arg)
            plan = segments.fill(adapters, counts, graph=True)
            x = torch.randn(sum(counts), HIDDEN, generator=gen).to(dtype)
            a, out = run(x, plan, table, layer, 2, 32, None)
            a_ref, out_ref = reference(x, per_token, resident, 2, 32, scalings, None)
            check(a, a_ref, dtype)
            check(out, out_ref, dtype)
        assert {t.data_ptr() for t in (*table.buffers(), *segments.buffers())} == addresses


def test_empty_batches_and_base_only_batches_cost_nothing():
    layer = Layer(torch.float32)
    table = DeviceLocationTable([KIND_A, KIND_B], 1, 4, DEVICE, align=layer.align)
    segments = SegmentBuffers(4, 8, DEVICE)
    plan = segments.fill([0, 0], [2, 1])
    assert plan.num_segments == 0 and not plan.active
    x = torch.randn(3, HIDDEN)
    base = torch.randn(3, 48)
    a, out = run(x, plan, table, layer, 1, 16, base.clone())
    assert not a.any() and torch.equal(out, base)
    graph_plan = segments.fill([0, 0], [2, 1], graph=True)  # launched, does nothing
    a, out = run(x, graph_plan, table, layer, 1, 16, base.clone())
    assert not a.any() and torch.equal(out, base)
