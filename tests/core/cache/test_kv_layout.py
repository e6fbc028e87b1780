"""Packing adapter matrices into runs of KV slots (chameleon_sglang.cache.kv_layout): one run,
or pieces in runs of their own."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon_sglang.cache.kv_layout import K_PART, V_PART, plan_layout, plan_split_layout


def _intervals(layout, layer):
    return sorted((p.part, p.offset, p.offset + p.numel) for p in layout.layers[layer].values())


shapes_strategy = st.lists(
    st.tuples(st.integers(1, 48), st.integers(1, 96)), min_size=1, max_size=6
)


@settings(max_examples=200, deadline=None)
@given(
    layers=st.lists(shapes_strategy, min_size=1, max_size=3),
    k_row=st.integers(1, 64),
    v_row=st.integers(1, 64),
)
def test_every_matrix_is_placed_whole_inside_its_part_without_overlap(layers, k_row, v_row):
    """Each matrix lies inside the run's K or V block of its layer and no two overlap."""
    named = [[(i, shape) for i, shape in enumerate(layer)] for layer in layers]
    layout = plan_layout(named, k_row, v_row)
    for layer_id, layer in enumerate(named):
        assert set(layout.layers[layer_id]) == {key for key, _ in layer}
        capacity = {K_PART: layout.num_slots * k_row, V_PART: layout.num_slots * v_row}
        previous_end = {K_PART: 0, V_PART: 0}
        for part, start, stop in _intervals(layout, layer_id):
            assert start >= previous_end[part] and stop <= capacity[part]
            previous_end[part] = stop


@settings(max_examples=200, deadline=None)
@given(
    layers=st.lists(shapes_strategy, min_size=1, max_size=3),
    k_row=st.integers(1, 64),
    v_row=st.integers(1, 64),
)
def test_run_is_no_longer_than_needed(layers, k_row, v_row):
    """One slot fewer could not hold the largest layer's elements or its largest matrix."""
    named = [[(i, shape) for i, shape in enumerate(layer)] for layer in layers]
    layout = plan_layout(named, k_row, v_row)
    n = layout.num_slots
    lower = max(
        max(-(-sum(a * b for a, b in layer) // (k_row + v_row)) for layer in layers),
        max(-(-a * b // max(k_row, v_row)) for layer in layers for a, b in layer),
    )
    assert n >= lower
    # greedy packing wastes at most one largest matrix per part
    largest = max(a * b for layer in layers for a, b in layer)
    assert (n - 1) * (k_row + v_row) < max(
        sum(a * b for a, b in layer) for layer in layers
    ) + 2 * largest + k_row + v_row


def test_adapter_without_weights_is_refused():
    for plan in (plan_layout, plan_split_layout):
        with pytest.raises(ValueError):
            plan([[]], 8, 8)


@settings(max_examples=300, deadline=None)
@given(
    layers=st.lists(shapes_strategy, min_size=1, max_size=3),
    k_row=st.integers(1, 64),
    v_row=st.integers(1, 64),
)
def test_split_layout_places_every_matrix_whole_in_one_piece(layers, k_row, v_row):
    """Each matrix lies inside the K or V block of one piece (its own run) of its layer, no two
    overlap; every piece holds something, and none is longer than the largest matrix needs."""
    named = [[(i, shape) for i, shape in enumerate(layer)] for layer in layers]
    layout = plan_split_layout(named, k_row, v_row)
    assert sum(layout.pieces) == layout.num_slots and min(layout.pieces) >= 1
    largest = max(a * b for layer in layers for a, b in layer)
    assert max(layout.pieces) <= -(-largest // max(k_row, v_row))
    used = set()
    for layer_id, layer in enumerate(named):
        assert set(layout.layers[layer_id]) == {key for key, _ in layer}
        ends = {}
        for p in sorted(
            layout.layers[layer_id].values(), key=lambda p: (p.piece, p.part, p.offset)
        ):
            capacity = layout.pieces[p.piece] * (k_row if p.part == K_PART else v_row)
            assert p.offset >= ends.get((p.piece, p.part), 0)
            assert p.offset + p.numel <= capacity
            ends[(p.piece, p.part)] = p.offset + p.numel
            used.add(p.piece)
    assert used == set(range(len(layout.pieces)))


def test_split_layout_of_real_shapes_costs_a_few_slots_more_than_one_run():
    """A rank-128 adapter of the tiny model (CPU storage: B as [r, out]): one run of 2432
    slots, or pieces of 1408 and 1216 (the largest matrix, gate_up's B, needs 1408)."""
    r, hidden, inter, qkv_out = 128, 128, 352, 256
    layer = [
        (("down_proj", "A"), (r, inter)),
        (("down_proj", "B"), (r, hidden)),
        (("gate_up_proj", "A"), (2 * r, hidden)),
        (("gate_up_proj", "B"), (r, 2 * inter)),
        (("o_proj", "A"), (r, hidden)),
        (("o_proj", "B"), (r, hidden)),
        (("qkv_proj", "A"), (3 * r, hidden)),
        (("qkv_proj", "B"), (r, qkv_out)),
    ]
    one, split = plan_layout([layer] * 2, 64, 64), plan_split_layout([layer] * 2, 64, 64)
    assert one.num_slots == 2432 and one.pieces == (2432,)
    assert split.pieces == (1408, 1216)
