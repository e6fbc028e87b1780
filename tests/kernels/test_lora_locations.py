"""Plans of the compiled decode kernels built from a location table
(chameleon_kernels.lora_locations), as the adapter cache's pool keeps one: same results as the
float32 reference, and as plans that locate each matrix one by one."""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest
import torch
from test_lora_cached import module_offsets, reference, seed_of, sharing
from test_lora_cached_numba import DTYPE_TOL, DTYPES, PathSpy, expand_reference

from chameleon_kernels import lora_cached_numba
from chameleon_kernels.lora_cached import expand, group_tokens, shrink
from chameleon_kernels.lora_locations import MatrixLocations, SmallBatch

pytestmark = pytest.mark.skipif(not lora_cached_numba.available(), reason="numba not installed")
RANKS = (8, 16, 32, 64, 128)


def _packed_layer(
    num_adapters: int,
    stack: int,
    hidden: int,
    out: int,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
):
    """Adapters 1..n packed as the cache packs a layer (A rows, then B as an [r, out] block),
    alternating between two storages; the table records where; also the matrices themselves."""
    storages = (torch.zeros(4_000_000, dtype=dtype), torch.zeros(4_000_000, dtype=dtype))
    table = MatrixLocations(
        [(lora_cached_numba.as_array(storages[0]), lora_cached_numba.as_array(storages[1]))],
        [("m", "A"), ("m", "B")],
        capacity=2,
    )
    A: Dict[int, torch.Tensor] = {}
    B: Dict[int, torch.Tensor] = {}
    cursor = [5, 11]  # unaligned starts
    for adapter in range(1, num_adapters + 1):
        r = RANKS[adapter % len(RANKS)]
        part = adapter % 2
        for kind, shape in (("A", (stack * r, hidden)), ("B", (r, out))):
            size = shape[0] * shape[1]
            block = storages[part][cursor[part] : cursor[part] + size].view(shape)
            block.copy_(torch.randn(shape, generator=gen) / shape[1] ** 0.5)
            table.set(adapter, ("m", kind), 0, part, cursor[part], shape[0])
            (A if kind == "A" else B)[adapter] = block if kind == "A" else block.t()
            cursor[part] += size + 7
    return table, A, B


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("pattern", ["distinct", "zipf", "interleaved", "with_base"])
@pytest.mark.parametrize("kind", ["o_proj", "qkv", "gate_up"])
def test_table_plans_match_the_reference(monkeypatch, pattern: str, kind: str, dtype: torch.dtype):
    """Decode batches of 24 requests over 12 adapters of mixed ranks (the table grows past its
    capacity as they are recorded): the compiled kernels, planned from the table, give the
    reference in every dtype."""
    spy = PathSpy(monkeypatch)
    gen = torch.Generator().manual_seed(seed_of("table", pattern, kind))
    offsets = module_offsets(kind, 64)
    stack = len(offsets) - 1
    table, A, B = _packed_layer(12, stack, 64, offsets[-1], gen, dtype)
    assert table.capacity >= 13
    scalings = {i: 0.5 + i / 10 for i in A}
    adapters = [None if a is None else a % 12 + 1 for a in sharing(pattern, 24, gen)]
    x = torch.randn(24, 64, generator=gen).to(dtype)
    groups = group_tokens(adapters, [1] * 24, scalings)
    plan_a = lambda batch: table.plan(("m", "A"), 0, batch)  # noqa: E731
    plan_b = lambda batch: table.plan(("m", "B"), 0, batch)  # noqa: E731
    a = shrink(x, groups, A.get, stack, 128, small_plan=plan_a)
    a_ref, _, _ = reference(x, adapters, [1] * 24, A, B, scalings, offsets, 128, stack)
    torch.testing.assert_close(a.float(), a_ref, **DTYPE_TOL[dtype])
    base = torch.randn(24, offsets[-1], generator=gen).to(dtype)
    out = expand(a, groups, B.get, offsets, base.clone(), small_plan=plan_b)
    # expand checked from the shrink output as computed (one rounding per op)
    out_ref = expand_reference(a, adapters, [1] * 24, B, scalings, offsets)
    torch.testing.assert_close(out.float(), base.float() + out_ref, **DTYPE_TOL[dtype])
    assert spy.compiled > 0


def test_table_plans_equal_plans_located_one_by_one():
    gen = torch.Generator().manual_seed(4)
    table, A, B = _packed_layer(6, 1, 32, 48, gen)
    scalings = {i: 1.0 + i for i in A}
    groups = group_tokens([3, 1, 6, 1, 2], [1] * 5, scalings)
    x = torch.zeros(5, 32)
    small = groups.by_size[0]
    for kind, weights, for_expand in (("A", A, False), ("B", B, True)):
        ours = table.plan(("m", kind), 0, groups.small_batch)
        theirs = lora_cached_numba.plan_small_groups(
            x, small, groups.row_index, weights.get, scalings, for_expand=for_expand
        )
        assert theirs is not None
        for g in range(len(small)):
            mine, found = ours.buffers[ours.which[g]], theirs.buffers[theirs.which[g]]
            assert mine.ctypes.data == found.ctypes.data  # the same storage
            assert (ours.offsets[g], ours.dims[g]) == (theirs.offsets[g], theirs.dims[g])
        np.testing.assert_array_equal(ours.scalings, theirs.scalings)


def test_cleared_adapters_contribute_nothing():
    """After ``clear`` (the adapter's memory went back to the KV cache) its groups cost nothing
    and leave their rows untouched, as an adapter without the module's weights does."""
    gen = torch.Generator().manual_seed(8)
    table, A, B = _packed_layer(3, 1, 32, 32, gen)
    table.clear(2)
    scalings = {i: 1.0 for i in A}
    groups = group_tokens([1, 2, 3], [1, 1, 1], scalings)
    x = torch.randn(3, 32, generator=gen)
    a = shrink(x, groups, A.get, 1, 128, small_plan=lambda b: table.plan(("m", "A"), 0, b))
    assert torch.count_nonzero(a[1]) == 0 and torch.count_nonzero(a[0]) > 0
    plan = table.plan(("m", "B"), 0, groups.small_batch)
    assert list(plan.dims) == [B[1].shape[1], 0, B[3].shape[1]]


def test_bad_locations_are_refused():
    table = MatrixLocations([(np.zeros(8, np.float32), np.zeros(8, np.float32))], [("m", "A")])
    with pytest.raises(ValueError):
        table.set(1, ("m", "A"), 0, 2, 0, 4)
    with pytest.raises(ValueError):
        MatrixLocations([(np.zeros(8), np.zeros(8, np.float32))], [("m", "A")])
    batch = SmallBatch.of([(0, 1, 500)], np.zeros(1, np.int64), {500: 1.0})
    with pytest.raises(IndexError):
        table.plan(("m", "A"), 0, batch)


def test_b_not_stored_transposed_is_served_by_torch(monkeypatch):
    """A contiguous [out, r] B cannot be streamed by rows: expand falls back, correctly."""
    spy = PathSpy(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    _, A, B = _packed_layer(4, 1, 32, 32, gen)
    B_rows: Dict[int, torch.Tensor] = {i: b.contiguous() for i, b in B.items()}
    scalings: Dict[int, float] = {i: 1.0 for i in A}
    groups = group_tokens([1, 2, 3, 4], [1] * 4, scalings)
    x = torch.randn(4, 32, generator=gen)
    a = shrink(x, groups, A.get, 1, 128)
    served_by_shrink = spy.compiled
    out = expand(a, groups, B_rows.get, [0, 32], None)
    assert spy.compiled == served_by_shrink
    _, out_ref, _ = reference(x, [1, 2, 3, 4], [1] * 4, A, B, scalings, [0, 32], 128, 1)
    torch.testing.assert_close(out, out_ref, **DTYPE_TOL[torch.float32])
