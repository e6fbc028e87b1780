"""The adapter cache's GPU-side bookkeeping, on CPU tensors
(chameleon_sglang.memory.device_residency)."""

from __future__ import annotations

import pytest
import torch

from chameleon_sglang.cache.kv_layout import K_PART, plan_layout
from chameleon_sglang.memory.device_residency import (
    AdapterCopier,
    device_table_capacity,
    pinned,
    table_entries,
)

MODULES = {"qkv_proj": (3, 16, 24), "o_proj": (1, 16, 16)}  # stack, in, out


def _shapes(rank):
    shapes = []
    for module, (stack, fan_in, out) in MODULES.items():
        shapes += [((module, "A"), (stack * rank, fan_in)), ((module, "B"), (out, rank))]
    return shapes


@pytest.mark.parametrize("v_first", [False, True], ids=["v-after-k", "v-before-k"])
def test_table_offsets_find_every_matrix_from_the_k_buffer_start(v_first):
    """K and V of each layer are slices of one storage (V before or after K); every offset the
    table gets, taken from the K slice's start, lands on the matrix written by placement."""
    k_row, v_row, slots, run_start, rank = 12, 20, 64, 5, 4
    layers = [_shapes(rank), _shapes(rank)]
    layout = plan_layout(layers, k_row, v_row)
    storage = torch.zeros(2 * slots * (k_row + v_row) + 64)
    ks, vs = [], []
    cursor = 0
    for _ in layers:
        parts = []
        for row in (v_row, k_row) if v_first else (k_row, v_row):
            parts.append(storage[cursor : cursor + slots * row].view(slots, row))
            cursor += slots * row + 8
        v, k = parts if v_first else parts[::-1]
        ks.append(k)
        vs.append(v)
    truth = {}
    for layer, placement in enumerate(layout.layers):
        for key, where in placement.items():
            w = torch.randn(where.shape)
            block = (ks if where.part == K_PART else vs)[layer][run_start:].reshape(-1)
            block[where.offset : where.offset + w.numel()] = w.reshape(-1)
            truth[(key, layer)] = w
    v_minus_k = [v.data_ptr() // 4 - k.data_ptr() // 4 for k, v in zip(ks, vs)]
    entries = table_entries(layout, [run_start], [k_row] * 2, [v_row] * 2, v_minus_k)
    assert set(entries) == set(truth)
    for (key, layer), (offset, entry_rank) in entries.items():
        w = truth[(key, layer)]
        start = ks[layer].data_ptr() // 4 - storage.data_ptr() // 4 + offset
        assert torch.equal(storage[start : start + w.numel()].view(w.shape), w)
        assert entry_rank == rank


def test_a_module_without_its_b_matrix_gets_no_entry():
    layout = plan_layout([[(("o_proj", "A"), (4, 16))]], 8, 8)
    assert table_entries(layout, [0], [8], [8], [100]) == {}


def test_cpu_copies_are_synchronous_and_waiting_is_a_no_op():
    copier = AdapterCopier(torch.device("cpu"))
    assert not copier.asynchronous
    dst, src = torch.zeros(3), torch.arange(3.0)
    copier.copy(1, [(dst, src)])
    assert torch.equal(dst, src)
    copier.wait_for([1, 2])
    copier.forget(1)


def test_pinned_leaves_weights_alone_when_disabled():
    pairs = [("a", torch.ones(2, 3).t())]
    assert pinned(pairs, enabled=False)[0][1] is pairs[0][1]


def test_table_capacity_is_fixed_generously_and_counts_the_base_id():
    assert device_table_capacity(8, None) == 257
    assert device_table_capacity(8, 200) == 401
    assert device_table_capacity(300, 10) == 601
