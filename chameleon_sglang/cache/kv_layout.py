"""Where an adapter's weights sit inside a run of KV-cache token slots (pure arithmetic).

SGLang's MHA KV pool gives every token slot one row in each layer's K buffer and one in its V
buffer. An adapter cached in KV memory takes a run of ``n`` consecutive slots; in layer ``l`` its
matrices are packed, whole and in order, first into the ``n`` K rows of that layer (one contiguous
block of ``n * k_row`` elements), then into the ``n`` V rows. Every matrix is therefore one
contiguous, rank-exact tensor that kernels read in place. ``n`` is the smallest run for which
every layer's matrices fit.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Hashable, List, Sequence, Tuple

K_PART = 0
V_PART = 1


@dataclasses.dataclass(frozen=True)
class Placement:
    """One matrix: which part of the run (K or V rows), its element offset there, its shape."""

    part: int
    offset: int
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        result = 1
        for dim in self.shape:
            result *= dim
        return result


@dataclasses.dataclass(frozen=True)
class AdapterLayout:
    """Run length in slots and, per layer, each matrix's placement (keyed as the caller keys)."""

    num_slots: int
    layers: Tuple[Dict[Hashable, Placement], ...]


def _numel(shape: Sequence[int]) -> int:
    result = 1
    for dim in shape:
        result *= int(dim)
    return result


def _pack(shapes: Sequence[Tuple[Hashable, Tuple[int, ...]]], k_capacity: int,
          v_capacity: int) -> Dict[Hashable, Placement] | None:
    placements: Dict[Hashable, Placement] = {}
    used = [0, 0]
    capacity = (k_capacity, v_capacity)
    part = K_PART
    for key, shape in shapes:
        numel = _numel(shape)
        if used[part] + numel > capacity[part] and part == K_PART:
            part = V_PART
        if used[part] + numel > capacity[part]:
            return None
        placements[key] = Placement(part, used[part], tuple(int(d) for d in shape))
        used[part] += numel
    return placements


def plan_layout(layer_shapes: Sequence[Sequence[Tuple[Hashable, Tuple[int, ...]]]],
                k_row: int, v_row: int) -> AdapterLayout:
    """The smallest run that holds every layer's matrices, packed in the given order.

    ``layer_shapes[l]`` lists ``(key, shape)`` of layer ``l``'s matrices; ``k_row``/``v_row``
    are the elements one token slot offers in a layer's K/V buffer. Raises ``ValueError`` for
    an adapter with no weights or non-positive row sizes.
    """
    if k_row <= 0 or v_row <= 0:
        raise ValueError(f"KV rows must hold > 0 elements, got k_row={k_row} v_row={v_row}")
    totals = [sum(_numel(shape) for _, shape in layer) for layer in layer_shapes]
    if not totals or max(totals) == 0:
        raise ValueError("an adapter with no weights cannot be cached")
    largest = max(max((_numel(s) for _, s in layer), default=0) for layer in layer_shapes)
    num_slots = max(-(-max(totals) // (k_row + v_row)), -(-largest // max(k_row, v_row)), 1)
    while True:
        packed: List[Dict[Hashable, Placement]] = []
        for layer in layer_shapes:
            placement = _pack(layer, num_slots * k_row, num_slots * v_row)
            if placement is None:
                break
            packed.append(placement)
        else:
            return AdapterLayout(num_slots, tuple(packed))
        num_slots += 1
