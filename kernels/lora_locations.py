"""Where resident adapters' matrices lie, as arrays the compiled decode kernels' plans gather.

:func:`~chameleon_kernels.lora_cached_numba.plan_small_groups` locates each group's matrix in
Python, per call: with tens of adapters in a decode batch and a shrink and an expand per module
and layer, that is a few milliseconds a step. A :class:`MatrixLocations` table is filled once per
residency instead (by the adapter cache's pool, when it copies an adapter in) and a call's plan is
three gathers by adapter id: :meth:`MatrixLocations.plan` over a :class:`SmallBatch`, which holds
what the batch's small groups share across every call of one forward pass.

Storages are per layer: two flat arrays (a layer's K and V buffers), all of one element type:
float32, or ``uint16`` for bf16/fp16 models (see :func:`~chameleon_kernels.lora_cached_numba.
storage_array`). A matrix's location
is its part (0: the first storage, 1: the second), element offset and ``dim`` (rows of an A
matrix, rank of a B matrix, 0: the adapter has no such matrix, and the kernels skip it).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Hashable, Sequence, Tuple

import numpy as np

from chameleon_kernels.lora_cached_numba import SmallGroupPlan


@dataclasses.dataclass(frozen=True)
class SmallBatch:
    """The small groups of a batch as arrays: token rows, group bounds over them, adapter ids
    and scalings. Shared by every plan of one forward pass."""

    rows: np.ndarray
    starts: np.ndarray
    stops: np.ndarray
    ids: np.ndarray
    scalings: np.ndarray

    @classmethod
    def of(
        cls, groups: Sequence[Tuple[int, int, int]], rows: np.ndarray, scalings: Dict[int, float]
    ) -> SmallBatch:
        """From ``(start, stop, adapter)`` groups over the batch rows ``rows``."""
        table = np.array(groups, dtype=np.int64).reshape(-1, 3)
        return cls(
            rows=rows,
            starts=np.ascontiguousarray(table[:, 0]),
            stops=np.ascontiguousarray(table[:, 1]),
            ids=np.ascontiguousarray(table[:, 2]),
            scalings=np.array([scalings.get(int(a), 1.0) for a in table[:, 2]], dtype=np.float32),
        )


class MatrixLocations:
    """Per matrix kind (e.g. ``("qkv_proj", "A")``), layer and adapter id: where it lies."""

    def __init__(
        self,
        storages: Sequence[Tuple[np.ndarray, np.ndarray]],
        kinds: Sequence[Hashable],
        capacity: int = 64,
    ) -> None:
        dtypes = {s.dtype for pair in storages for s in pair}
        if (
            len(dtypes) > 1
            or not dtypes <= {np.dtype(np.float32), np.dtype(np.uint16)}
            or any(s.ndim != 1 for pair in storages for s in pair)
        ):
            raise ValueError("storages must be flat arrays, all float32 or all uint16")
        self.storages = [tuple(pair) for pair in storages]
        self._kind_index = {kind: i for i, kind in enumerate(kinds)}
        shape = (len(self._kind_index), len(self.storages), max(1, capacity))
        self._part = np.zeros(shape, dtype=np.int64)
        self._offset = np.zeros(shape, dtype=np.int64)
        self._dim = np.zeros(shape, dtype=np.int64)

    @property
    def capacity(self) -> int:
        return self._dim.shape[2]

    def set(
        self, adapter_id: int, kind: Hashable, layer: int, part: int, offset: int, dim: int
    ) -> None:
        """Record a matrix: in storage ``part`` of ``layer``, from element ``offset``."""
        if part not in (0, 1) or offset < 0 or dim < 0:
            raise ValueError(f"bad location part={part} offset={offset} dim={dim}")
        if adapter_id >= self.capacity:
            self._grow(adapter_id + 1)
        k = self._kind_index[kind]
        self._part[k, layer, adapter_id] = part
        self._offset[k, layer, adapter_id] = offset
        self._dim[k, layer, adapter_id] = dim

    def clear(self, adapter_id: int) -> None:
        """Forget every matrix of ``adapter_id`` (its memory went back to the KV cache)."""
        if adapter_id < self.capacity:
            self._dim[:, :, adapter_id] = 0

    def plan(self, kind: Hashable, layer: int, batch: SmallBatch) -> SmallGroupPlan:
        """The plan of one call: every small group's matrix of ``kind`` in ``layer``. Raises
        IndexError for an adapter id beyond every id ever recorded."""
        k = self._kind_index[kind]
        ids = batch.ids
        return SmallGroupPlan(
            buffers=self.storages[layer],  # type: ignore[arg-type]
            rows=batch.rows,
            starts=batch.starts,
            stops=batch.stops,
            which=self._part[k, layer][ids],
            offsets=self._offset[k, layer][ids],
            dims=self._dim[k, layer][ids],
            scalings=batch.scalings,
        )

    def has(self, kind: Hashable) -> bool:
        return kind in self._kind_index

    def _grow(self, needed: int) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        pad = ((0, 0), (0, 0), (0, capacity - self.capacity))
        self._part = np.pad(self._part, pad)
        self._offset = np.pad(self._offset, pad)
        self._dim = np.pad(self._dim, pad)
