"""Device-side state for LoRA kernels that find adapters through a location table (GPU path).

Two kinds of device memory, both allocated once, so a captured CUDA graph's kernels keep reading
the same addresses while what they hold changes between replays:

- :class:`DeviceLocationTable`: per matrix kind (``(module, "A"|"B")``), layer and adapter id, the
  element offset of the matrix relative to its layer's base buffer (the layer's K buffer: a matrix
  in the V buffer has the address difference folded into its offset) and its rank (0: the
  adapter has no such matrix, the kernels skip it); per adapter id its scaling. Written when the
  adapter cache loads or evicts an adapter (:meth:`DeviceLocationTable.set_adapter`,
  :meth:`~DeviceLocationTable.clear`), one host-to-device copy per array and load, on the current
  stream, so later kernels see it in stream order.
- :class:`SegmentBuffers`: one batch's tokens grouped by adapter id as three int32 arrays -- the
  adapter of each segment, the segment bounds, the batch row of each token in segment order --
  packed into one device buffer and filled by :meth:`SegmentBuffers.fill` with ONE host-to-device
  copy per batch (from a pinned host tensor where pinned memory exists). Segments past the batch's
  own are empty, so a kernel grid sized by the batch's shape (a graph captured at batch size B:
  B segments) does nothing for them, whatever adapter mix a replay brings.

Nothing here touches SGLang; the kernels are :mod:`chameleon_kernels.lora_table_triton`.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Hashable, List, Mapping, Sequence, Tuple

import torch

BASE_ADAPTER = 0
"""Adapter id 0 is the base model: rank 0 everywhere, its tokens get nothing."""


def alignment_for(dtype: torch.dtype, row_elements: int) -> int:
    """Elements every offset and rank is a multiple of: 16 bytes' worth when the KV row allows
    it (the kernels then tell the compiler, for vector loads), else 1."""
    align = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    while align > 1 and row_elements % align:
        align //= 2
    return align


class DeviceLocationTable:
    """Where each resident adapter's matrices lie, on the device (see the module docstring)."""

    def __init__(
        self,
        kinds: Sequence[Hashable],
        num_layers: int,
        capacity: int,
        device: torch.device,
        align: int = 1,
    ) -> None:
        if capacity < 2 or num_layers < 1 or not kinds:
            raise ValueError("a table needs kinds, layers and room for at least one adapter")
        self.kinds = list(kinds)
        self.kind_index: Dict[Hashable, int] = {k: i for i, k in enumerate(self.kinds)}
        self.num_layers = int(num_layers)
        self.capacity = int(capacity)
        self.align = int(align)
        self.device = torch.device(device)
        shape = (len(self.kinds), self.num_layers, self.capacity)
        self.offsets = torch.zeros(shape, dtype=torch.int64, device=self.device)
        self.ranks = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.scalings = torch.zeros(self.capacity, dtype=torch.float32, device=self.device)

    def row(self, kind: Hashable, layer: int) -> int:
        """Flat element index of ``(kind, layer, adapter 0)`` in :attr:`offsets`/:attr:`ranks`;
        a kernel adds the adapter id."""
        return (self.kind_index[kind] * self.num_layers + int(layer)) * self.capacity

    def set_adapter(
        self,
        adapter_id: int,
        entries: Mapping[Tuple[Hashable, int], Tuple[int, int]],
        scaling: float,
    ) -> None:
        """Record adapter ``adapter_id``: ``entries[(kind, layer)] = (offset, rank)``; kinds and
        layers it has no entry for get rank 0. Raises ValueError (nothing written) for an id out
        of range or an offset/rank that breaks the table's alignment."""
        if not 0 < adapter_id < self.capacity:
            raise ValueError(f"adapter id {adapter_id} outside 1..{self.capacity - 1}")
        offsets = torch.zeros((len(self.kinds), self.num_layers), dtype=torch.int64)
        ranks = torch.zeros((len(self.kinds), self.num_layers), dtype=torch.int32)
        for (kind, layer), (offset, rank) in entries.items():
            if offset % self.align or rank % self.align or rank < 0:
                raise ValueError(
                    f"adapter {adapter_id}: {kind} of layer {layer} at offset "
                    f"{offset} with rank {rank} breaks {self.align}-element "
                    f"alignment"
                )
            offsets[self.kind_index[kind], layer] = int(offset)
            ranks[self.kind_index[kind], layer] = int(rank)
        self.offsets[:, :, adapter_id].copy_(offsets)
        self.ranks[:, :, adapter_id].copy_(ranks)
        self.scalings[adapter_id] = float(scaling)

    def clear(self, adapter_id: int) -> None:
        """Forget ``adapter_id`` (its memory went back to the KV cache): rank 0 everywhere."""
        if 0 < adapter_id < self.capacity:
            self.ranks[:, :, adapter_id].zero_()

    def buffers(self) -> Tuple[torch.Tensor, ...]:
        """The device tensors kernels read (fixed addresses)."""
        return (self.offsets, self.ranks, self.scalings)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """What a launch needs of one batch: device views into :class:`SegmentBuffers` and the host
    figures that size the grid (known on the host, no device read)."""

    seg_adapter: torch.Tensor  # int32 [max_segments]
    seg_start: torch.Tensor  # int32 [max_segments + 1]
    order: torch.Tensor  # int32 [max_tokens]
    num_segments: int  # grid extent along segments (the buffers' size under graphs)
    max_segment_tokens: int  # grid extent along tokens
    num_tokens: int
    active: bool  # some token uses an adapter


def group_by_adapter(
    adapter_per_request: Sequence[int], tokens_per_request: Sequence[int]
) -> Tuple[List[int], List[int], List[int]]:
    """``(segment adapters, segment starts + end, token order)``: the tokens of requests with an
    adapter (id > 0), grouped by adapter id (ascending), batch order kept within a group."""
    rows: Dict[int, List[int]] = {}
    position = 0
    for adapter, count in zip(adapter_per_request, tokens_per_request):
        count = int(count)
        if adapter > BASE_ADAPTER and count > 0:
            rows.setdefault(int(adapter), []).extend(range(position, position + count))
        position += count
    adapters, starts, order = [], [0], []
    for adapter in sorted(rows):
        adapters.append(adapter)
        order.extend(rows[adapter])
        starts.append(len(order))
    return adapters, starts, order


class SegmentBuffers:
    """Per-batch grouping of tokens by adapter in one fixed device buffer (module docstring)."""

    def __init__(self, max_segments: int, max_tokens: int, device: torch.device) -> None:
        if max_segments < 1 or max_tokens < 1:
            raise ValueError("max_segments and max_tokens must be >= 1")
        self.max_segments = int(max_segments)
        self.max_tokens = int(max_tokens)
        self.device = torch.device(device)
        self._size = 2 * self.max_segments + 1 + self.max_tokens
        self.packed = torch.zeros(self._size, dtype=torch.int32, device=self.device)
        self.seg_adapter = self.packed[: self.max_segments]
        self.seg_start = self.packed[self.max_segments : 2 * self.max_segments + 1]
        self.order = self.packed[2 * self.max_segments + 1 :]
        self._pin = self.device.type == "cuda"

    def fill(
        self,
        adapter_per_request: Sequence[int],
        tokens_per_request: Sequence[int],
        graph: bool = False,
    ) -> BatchPlan:
        """Group the batch's tokens (host lists) and copy the result in with one host-to-device
        copy. ``graph``: the plan's grid is sized by the batch's shape alone (a segment per
        request, every token), not by how its requests share adapters, so launches captured
        for a batch size serve any adapter mix; else by its actual segments. Raises ValueError
        for a batch larger than the buffers."""
        adapters, starts, order = group_by_adapter(adapter_per_request, tokens_per_request)
        num_tokens = sum(int(c) for c in tokens_per_request)
        if len(adapter_per_request) > self.max_segments or num_tokens > self.max_tokens:
            raise ValueError(
                f"batch of {num_tokens} tokens in {len(adapter_per_request)} "
                f"requests exceeds {self.max_tokens} tokens / "
                f"{self.max_segments} segments"
            )
        end = starts[-1]
        host = torch.empty(self._size, dtype=torch.int32, pin_memory=self._pin)
        host[: len(adapters)] = torch.as_tensor(adapters, dtype=torch.int32)
        host[len(adapters) : self.max_segments] = BASE_ADAPTER
        seg = host[self.max_segments : 2 * self.max_segments + 1]
        seg[: len(starts)] = torch.as_tensor(starts, dtype=torch.int32)
        seg[len(starts) :] = end  # empty segments past the batch's own
        host[2 * self.max_segments + 1 : 2 * self.max_segments + 1 + len(order)] = torch.as_tensor(
            order, dtype=torch.int32
        )
        host[2 * self.max_segments + 1 + len(order) :] = 0
        self.packed.copy_(host, non_blocking=self._pin)
        longest = max((b - a for a, b in zip(starts, starts[1:])), default=0)
        return BatchPlan(
            seg_adapter=self.seg_adapter,
            seg_start=self.seg_start,
            order=self.order,
            num_segments=len(adapter_per_request) if graph else len(adapters),
            max_segment_tokens=num_tokens if graph else longest,
            num_tokens=num_tokens,
            active=bool(adapters),
        )

    def buffers(self) -> Tuple[torch.Tensor, ...]:
        return (self.packed,)
