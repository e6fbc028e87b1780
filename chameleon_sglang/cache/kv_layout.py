"""Where an adapter's weights sit inside runs of KV-cache token slots (pure arithmetic).

SGLang's MHA KV pool gives every token slot one row in each layer's K buffer and one in its V
buffer. A run of ``n`` consecutive slots therefore offers, in each layer, one contiguous block of
``n * k_row`` elements (its K rows) and one of ``n * v_row`` (its V rows). Every matrix is placed
whole in one such block: one contiguous, rank-exact tensor that kernels read in place, located
by its own offset (kernels never assume an adapter's matrices are adjacent).

An adapter has two layouts:

- :func:`plan_layout`, one *piece*: the smallest run for which every layer's matrices fit,
  packed largest first into the K rows, else the V rows (first-fit decreasing);
- :func:`plan_split_layout`, several pieces, each a run of its own wherever free slots are:
  for fragmented memory. No piece is shorter than the largest matrix needs; the pieces may
  total a little more than the one-piece run.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Hashable, List, Sequence, Tuple

K_PART = 0
V_PART = 1


@dataclasses.dataclass(frozen=True)
class Placement:
    """One matrix: its piece, which part of it (K or V rows), its element offset there, its
    shape."""

    part: int
    offset: int
    shape: Tuple[int, ...]
    piece: int = 0

    @property
    def numel(self) -> int:
        result = 1
        for dim in self.shape:
            result *= dim
        return result


@dataclasses.dataclass(frozen=True)
class AdapterLayout:
    """Slots in all, each piece's run length, and per layer each matrix's placement (keyed as
    the caller keys)."""

    num_slots: int
    layers: Tuple[Dict[Hashable, Placement], ...]
    pieces: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.pieces:
            object.__setattr__(self, "pieces", (self.num_slots,))
        if sum(self.pieces) != self.num_slots or min(self.pieces) <= 0:
            raise ValueError(f"pieces {self.pieces} do not make {self.num_slots} slots")


def _numel(shape: Sequence[int]) -> int:
    result = 1
    for dim in shape:
        result *= int(dim)
    return result


def _largest_first(shapes: Sequence[Tuple[Hashable, Tuple[int, ...]]]) -> List[int]:
    """Indices of ``shapes``, largest matrix first (ties: in the given order)."""
    return sorted(range(len(shapes)), key=lambda i: (-_numel(shapes[i][1]), i))


def _pack(
    shapes: Sequence[Tuple[Hashable, Tuple[int, ...]]], k_capacity: int, v_capacity: int
) -> Dict[Hashable, Placement] | None:
    """First-fit decreasing into one run's K rows, then its V rows; None if they do not fit."""
    placements: Dict[Hashable, Placement] = {}
    used = [0, 0]
    capacity = (k_capacity, v_capacity)
    for i in _largest_first(shapes):
        key, shape = shapes[i]
        numel = _numel(shape)
        part = next((p for p in (K_PART, V_PART) if used[p] + numel <= capacity[p]), None)
        if part is None:
            return None
        placements[key] = Placement(part, used[part], tuple(int(d) for d in shape))
        used[part] += numel
    return placements


def plan_layout(
    layer_shapes: Sequence[Sequence[Tuple[Hashable, Tuple[int, ...]]]], k_row: int, v_row: int
) -> AdapterLayout:
    """The smallest run that holds every layer's matrices, packed first-fit decreasing.

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


def plan_split_layout(
    layer_shapes: Sequence[Sequence[Tuple[Hashable, Tuple[int, ...]]]], k_row: int, v_row: int
) -> AdapterLayout:
    """The adapter in as many pieces as first-fit decreasing makes, for fragmented memory.

    Per layer, matrices largest first go into the first piece whose K or V rows have room
    (pieces as long as the largest matrix needs, a new one when none has room); each piece is
    then cut to what its fullest layer uses. Every matrix lies whole in one piece. Same errors
    as :func:`plan_layout`.
    """
    if k_row <= 0 or v_row <= 0:
        raise ValueError(f"KV rows must hold > 0 elements, got k_row={k_row} v_row={v_row}")
    largest = max((_numel(s) for layer in layer_shapes for _, s in layer), default=0)
    if largest == 0:
        raise ValueError("an adapter with no weights cannot be cached")
    rows = (k_row, v_row)
    span = -(-largest // max(rows))
    capacity = (span * k_row, span * v_row)
    lengths: List[int] = []
    packed: List[Dict[Hashable, Placement]] = []
    for layer in layer_shapes:
        used: List[List[int]] = []
        placements: Dict[Hashable, Placement] = {}
        for i in _largest_first(layer):
            key, shape = layer[i]
            numel = _numel(shape)
            spot = next(
                (
                    (p, part)
                    for p in range(len(used))
                    for part in (K_PART, V_PART)
                    if used[p][part] + numel <= capacity[part]
                ),
                None,
            )
            if spot is None:
                used.append([0, 0])
                part = K_PART if numel <= capacity[K_PART] else V_PART
                spot = (len(used) - 1, part)
            piece, part = spot
            placements[key] = Placement(
                part, used[piece][part], tuple(int(d) for d in shape), piece
            )
            used[piece][part] += numel
        packed.append(placements)
        for piece, (k_used, v_used) in enumerate(used):
            need = max(-(-k_used // k_row), -(-v_used // v_row), 1)
            if piece == len(lengths):
                lengths.append(need)
            else:
                lengths[piece] = max(lengths[piece], need)
    return AdapterLayout(sum(lengths), tuple(packed), tuple(lengths))
