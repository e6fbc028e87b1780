"""Device metadata of the GPU LoRA path, on CPU tensors (chameleon_kernels.lora_table)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon_kernels.lora_table import (
    DeviceLocationTable,
    SegmentBuffers,
    alignment_for,
    group_by_adapter,
)

CPU = torch.device("cpu")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 6)), min_size=1, max_size=12))
def test_grouping_keeps_each_adapters_tokens_in_batch_order(requests):
    adapters = [a for a, _ in requests]
    counts = [c for _, c in requests]
    seg_adapters, starts, order = group_by_adapter(adapters, counts)
    per_token = [a for a, c in requests for _ in range(c)]
    assert seg_adapters == sorted({a for a in per_token if a > 0})
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] == len(order)
    for adapter, lo, hi in zip(seg_adapters, starts, starts[1:]):
        rows = order[lo:hi]
        assert rows == sorted(rows) and rows == [t for t, a in enumerate(per_token) if a == adapter]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(1, 3)), min_size=1, max_size=6), st.booleans()
)
def test_fill_writes_the_grouping_and_pads_with_empty_segments(requests, graph):
    buffers = SegmentBuffers(8, 24, CPU)
    before = buffers.packed.data_ptr()
    adapters, counts = [a for a, _ in requests], [c for _, c in requests]
    plan = buffers.fill(adapters, counts, graph=graph)
    seg_adapters, starts, order = group_by_adapter(adapters, counts)
    n = len(seg_adapters)
    assert plan.seg_adapter[:n].tolist() == seg_adapters and not plan.seg_adapter[n:].any()
    assert plan.seg_start[: n + 1].tolist() == starts
    assert (plan.seg_start[n + 1 :] == starts[-1]).all()  # later segments hold no tokens
    assert plan.order[: len(order)].tolist() == order
    assert plan.num_segments == (len(requests) if graph else n)
    assert plan.max_segment_tokens == (
        sum(counts) if graph else max((b - a for a, b in zip(starts, starts[1:])), default=0)
    )
    assert plan.active == bool(seg_adapters) and buffers.packed.data_ptr() == before


def test_a_batch_larger_than_the_buffers_is_refused():
    buffers = SegmentBuffers(2, 4, CPU)
    with pytest.raises(ValueError, match="exceeds"):
        buffers.fill([1, 1, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="exceeds"):
        buffers.fill([1], [5])
    with pytest.raises(ValueError):
        SegmentBuffers(0, 4, CPU)


def test_table_records_and_clears_adapters_in_place():
    table = DeviceLocationTable([("q", "A"), ("q", "B")], 2, 4, CPU, align=8)
    addresses = [t.data_ptr() for t in table.buffers()]
    table.set_adapter(2, {(("q", "A"), 1): (64, 16), (("q", "B"), 1): (-128, 16)}, 0.5)
    flat_offsets, flat_ranks = table.offsets.view(-1), table.ranks.view(-1)
    assert flat_offsets[table.row(("q", "A"), 1) + 2] == 64
    assert flat_offsets[table.row(("q", "B"), 1) + 2] == -128
    assert flat_ranks[table.row(("q", "B"), 1) + 2] == 16
    assert flat_ranks[table.row(("q", "A"), 0) + 2] == 0  # no entry: rank 0, skipped
    assert table.scalings[2] == 0.5
    table.clear(2)
    assert not table.ranks.any()
    assert [t.data_ptr() for t in table.buffers()] == addresses


@pytest.mark.parametrize("adapter, entry", [(0, (0, 8)), (4, (0, 8)), (1, (4, 8)), (1, (0, 12))])
def test_table_refuses_bad_ids_and_misaligned_entries_writing_nothing(adapter, entry):
    table = DeviceLocationTable([("q", "A")], 1, 4, CPU, align=8)
    with pytest.raises(ValueError):
        table.set_adapter(adapter, {(("q", "A"), 0): entry}, 1.0)
    assert not table.ranks.any() and not table.offsets.any()


def test_alignment_is_sixteen_bytes_where_rows_allow():
    assert alignment_for(torch.bfloat16, 4096) == 8
    assert alignment_for(torch.float32, 4096) == 4
    assert alignment_for(torch.bfloat16, 4100) == 4
    assert alignment_for(torch.float16, 33) == 1
