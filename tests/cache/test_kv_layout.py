"""Packing adapter matrices into runs of KV slots (chameleon_sglang.cache.kv_layout)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon_sglang.cache.kv_layout import K_PART, V_PART, plan_layout


def _intervals(layout, layer):
    return sorted((p.part, p.offset, p.offset + p.numel) for p in layout.layers[layer].values())


shapes_strategy = st.lists(
    st.tuples(st.integers(1, 48), st.integers(1, 96)), min_size=1, max_size=6
)


@settings(max_examples=200, deadline=None)
@given(layers=st.lists(shapes_strategy, min_size=1, max_size=3), k_row=st.integers(1, 64),
       v_row=st.integers(1, 64))
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
@given(layers=st.lists(shapes_strategy, min_size=1, max_size=3), k_row=st.integers(1, 64),
       v_row=st.integers(1, 64))
def test_run_is_no_longer_than_needed(layers, k_row, v_row):
    """One slot fewer could not hold the largest layer's elements or its largest matrix."""
    named = [[(i, shape) for i, shape in enumerate(layer)] for layer in layers]
    layout = plan_layout(named, k_row, v_row)
    n = layout.num_slots
    lower = max(max(-(-sum(a * b for a, b in layer) // (k_row + v_row)) for layer in layers),
                max(-(-a * b // max(k_row, v_row)) for layer in layers for a, b in layer))
    assert n >= lower
    # greedy packing wastes at most one largest matrix per part
    largest = max(a * b for layer in layers for a, b in layer)
    assert (n - 1) * (k_row + v_row) < max(sum(a * b for a, b in layer) for layer in layers) \
        + 2 * largest + k_row + v_row


def test_adapter_without_weights_is_refused():
    with pytest.raises(ValueError):
        plan_layout([[]], 8, 8)
